import pytest
import torch

from safereact_interp.errors import ConfigError
from safereact_interp.judges import ClassifierJudge, GuardJudge, load_judge
from safereact_interp.scoring import RefusalPhraseJudge


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    """A tiny BERT classifier whose bias always predicts label 1 ("refusal")."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("judge")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "compliance", 1: "refusal"},
                        label2id={"compliance": 0, "refusal": 1}, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_classifier_refusal_label(classifier_dir):
    judge = ClassifierJudge(str(classifier_dir), refusal_labels=["refusal"])
    assert judge.judge(["p1", "p2", "p3"], ["Sure.", "No.", "Here you go."]) == [True, True, True]


def test_classifier_compliance_label(classifier_dir):
    judge = ClassifierJudge(str(classifier_dir), compliance_labels=["refusal"], input_format="response")
    assert judge.judge(["p"], ["anything"]) == [False]


def test_classifier_unknown_label(classifier_dir):
    judge = ClassifierJudge(str(classifier_dir), refusal_labels=["declined"])
    with pytest.raises(ConfigError, match="not labels of"):
        judge.judge(["p"], ["r"])


def test_classifier_needs_one_label_kind():
    with pytest.raises(ConfigError, match="exactly one"):
        ClassifierJudge("x", refusal_labels=["a"], compliance_labels=["b"])


def test_guard_judge_reads_output(tiny_model_dir):
    judge = GuardJudge(str(tiny_model_dir), max_new_tokens=3)
    verdicts = judge.judge(["a prompt", "another"], ["a response", "another response"])
    assert len(verdicts) == 2
    assert all(isinstance(verdict, bool) for verdict in verdicts)


def test_load_judge_specs(classifier_dir):
    assert isinstance(load_judge(None), RefusalPhraseJudge)
    judge = load_judge(f"classifier:{classifier_dir}:refusal")
    assert judge.refusal_labels == ["refusal"]
    assert load_judge(f"harm-classifier:{classifier_dir}:compliance").compliance_labels == ["compliance"]
    assert isinstance(load_judge("guard:/some/guard"), GuardJudge)
    with pytest.raises(ConfigError, match="invalid judge"):
        load_judge("llm")
