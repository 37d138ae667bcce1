import pytest
import torch

from safereact_interp.prompts import bundled_prompts, encode, render_chat
from safereact_interp.scoring import (RefusalPhraseJudge, RefusalScoreConfig, RefusalScorer, generate,
                                      kl_divergence, refusal_scores)


def full_pass_score(model, text, config):
    """The refusal score of one prompt computed directly, without batching or caching."""
    prompt_ids = encode(model.tokenizer, render_chat(model.tokenizer, [text]))[0]
    if config.response_prefix:
        prompt_ids = prompt_ids + model.tokenizer(config.response_prefix, add_special_tokens=False).input_ids

    def mean_log_prob(continuation):
        ids = model.tokenizer(continuation, add_special_tokens=False).input_ids
        sequence = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model.hf_model(sequence).logits[0].float(), -1)
        picked = [log_probs[len(prompt_ids) - 1 + index, token] for index, token in enumerate(ids)]
        return torch.stack(picked).mean()

    refusal = torch.stack([mean_log_prob(text) for text in config.refusals]).mean()
    compliance = torch.stack([mean_log_prob(text) for text in config.compliances]).mean()
    return float(refusal - compliance)


def test_cached_score_matches_full_pass(tiny_model):
    texts = bundled_prompts("harmful").train.texts[:5]
    config = RefusalScoreConfig()
    scores = RefusalScorer(tiny_model, texts, config=config, batch_size=3, tail=4).score()
    for index, text in enumerate(texts):
        assert abs(scores[index] - full_pass_score(tiny_model, text, config)) < 1e-4


def test_cached_score_with_prefix(tiny_model):
    texts = bundled_prompts("harmless").train.texts[:4]
    config = RefusalScoreConfig(refusals=("I cannot help with that.", "No"), compliances=("Sure",),
                                response_prefix="<think>\n")
    scores = RefusalScorer(tiny_model, texts, config=config, batch_size=3, tail=3).score()
    for index, text in enumerate(texts):
        assert abs(scores[index] - full_pass_score(tiny_model, text, config)) < 1e-4


def test_empty_continuation_rejected(tiny_model):
    import pytest

    from safereact_interp.errors import ConfigError

    with pytest.raises(ConfigError, match="have no tokens"):
        RefusalScorer(tiny_model, ["a prompt"], config=RefusalScoreConfig(refusals=("",)))


def test_score_independent_of_batching(tiny_model):
    texts = bundled_prompts("harmless").train.texts[:6]
    batched = refusal_scores(tiny_model, texts, batch_size=6)
    single = torch.cat([refusal_scores(tiny_model, [text], batch_size=1) for text in texts])
    assert torch.allclose(batched, single, atol=1e-4)


def test_score_reused_cache_is_stable(tiny_model):
    scorer = RefusalScorer(tiny_model, bundled_prompts("harmful").train.texts[:4], batch_size=2)
    assert torch.equal(scorer.score(), scorer.score())


def test_generate_matches_hf_greedy(tiny_model):
    texts = bundled_prompts("harmless").train.texts[:5]
    responses = generate(tiny_model, texts, max_new_tokens=6, batch_size=5)
    for text, response in zip(texts, responses):
        ids = encode(tiny_model.tokenizer, render_chat(tiny_model.tokenizer, [text]))[0]
        with torch.no_grad():
            output = tiny_model.hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                                  pad_token_id=tiny_model.tokenizer.pad_token_id)
        expected = tiny_model.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        assert response == expected


def test_phrase_judge_views():
    judge = RefusalPhraseJudge()
    whole = RefusalPhraseJudge(view="whole")
    responses = ["I’m sorry, but no.", "Sure, here it is.",
                 "<think>\nI can't do that... or can I\n</think>\nHere is how.", "<think>\nI cannot help"]
    assert judge.judge([""] * 4, responses) == [True, False, False, True]
    assert whole.judge([""] * 4, responses) == [True, False, True, True]


def test_phrase_judge_knows_bundled_refusals():
    from safereact_interp.prompts import refusal_texts

    texts = refusal_texts()
    assert RefusalPhraseJudge().judge([""] * len(texts), texts) == [True] * len(texts)


def test_kl_to_itself_is_zero(tiny_model):
    texts = bundled_prompts("harmless").test.texts[:3]
    assert abs(kl_divergence(tiny_model, tiny_model, texts, ["An answer.", "Another one.", "Third."])) < 1e-6


def test_addition_generation_batch_independent(tiny_model):
    from safereact_interp.patching import ActivationAddition

    texts = bundled_prompts("harmful").test.texts[:5]
    addition = [ActivationAddition(1, 3.0 * torch.ones(tiny_model.d_model))]
    batched = generate(tiny_model, texts, max_new_tokens=5, batch_size=5, interventions=addition)
    single = [generate(tiny_model, [text], max_new_tokens=5, batch_size=1, interventions=addition)[0] for text in texts]
    plain = generate(tiny_model, texts, max_new_tokens=5, batch_size=5)
    assert batched == single
    assert batched != plain


def test_shared_prefix_length():
    from safereact_interp.prompts import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # one token of each row is kept
    assert shared_prefix_length([[1, 2], [3, 4]]) == 0
    assert shared_prefix_length([[7]]) == 0


def test_kl_matches_per_prompt_and_caches(planted_pair):
    from safereact_interp.prompts import encode, render_chat

    base, post = planted_pair.base, planted_pair.post
    texts = bundled_prompts("harmless").test.texts[:5]
    answers = ["Yes.", "Here is a longer answer with more words.", "No", "A medium answer here.", "Fine."]
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt_ids, answer in zip(encode(post.tokenizer, render_chat(post.tokenizer, texts)), answers):
            answer_ids = post.tokenizer(answer, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt_ids + answer_ids])
            scored = slice(len(prompt_ids) - 1, ids.shape[1] - 1)
            reference = torch.log_softmax(post.hf_model(ids).logits[0, scored].float(), -1)
            mine = torch.log_softmax(base.hf_model(ids).logits[0, scored].float(), -1)
            total += float((reference.exp() * (reference - mine)).sum())
            count += len(answer_ids)
    cache: dict = {}
    first = kl_divergence(base, post, texts, answers, batch_size=3, reference_cache=cache)
    assert first == pytest.approx(total / count, rel=1e-4)
    assert sorted(key for key in cache if key != "signature") == [0, 1]
    assert kl_divergence(base, post, texts, answers, batch_size=3, reference_cache=cache) == pytest.approx(first, rel=1e-6)
    assert kl_divergence(post, post, texts, answers, batch_size=3, reference_cache=cache) == pytest.approx(0.0, abs=1e-6)


def test_resid_post_hooks_match_bridge(tiny_model):
    ids = tiny_model.tokenizer(["A short test sentence.", "Another one"], return_tensors="pt", padding=True)
    vector = torch.randn(tiny_model.d_model)
    seen = []

    def add(activation, hook):
        seen.append(hook.name)
        return activation + vector

    hooks = [("blocks.1.hook_resid_post", add)]
    with torch.no_grad():
        with tiny_model.hooked(hooks) as network:
            assert network is tiny_model.plain_model
            fast = network(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
        with tiny_model.bridge.hooks(fwd_hooks=hooks):
            bridged = tiny_model.hf_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
        clean = tiny_model.plain_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    real = ids.attention_mask.bool()
    assert seen[0] == "blocks.1.hook_resid_post"
    assert torch.allclose(fast[real], bridged[real], atol=1e-5)
    assert not torch.allclose(fast[real], clean[real], atol=1e-3)
