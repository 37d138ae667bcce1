import json
import re

import pytest
import torch

from safereact_interp.errors import ConfigError, LayerError, RunFolderError
from safereact_interp.prompts import PromptSet, bundled_prompts
from safereact_interp.repair import RepairConfig, batch_indices, repair
from safereact_interp.training import LoraSettings, add_lora, lora_target_modules


@pytest.fixture(scope="module")
def repair_inputs():
    harmful = bundled_prompts("harmful").train.head(8)
    retain = PromptSet("harmless", bundled_prompts("harmless").train.head(8).prompts, "retain")
    return harmful, retain


def run_repair(planted_pair, planted_post_dir, repair_inputs, output, **overrides):
    harmful, retain = repair_inputs
    settings = dict(layers=(1, 3), steps=6, batch_size=4, learning_rate=5e-3, checkpoint_every=2, retain_weight=10.0)
    settings.update(overrides.pop("config", {}))
    return repair(planted_pair.base, str(planted_post_dir), harmful, retain, RepairConfig(**settings), output=output,
                  post=planted_pair.post, load_options={"dtype": "float32", "device": "cpu"}, **overrides)


def test_alignment_loss_falls(planted_pair, planted_post_dir, repair_inputs, tmp_path):
    result = run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r", config={"steps": 12})
    first, last = result.log[0], result.log[-1]
    assert last["align_loss"] < 0.7 * first["align_loss"]
    assert last["retain_loss"] < 0.1
    assert result.trainable_parameter_fraction < 0.5


def test_adapter_reloads_identically(planted_pair, planted_post_dir, repair_inputs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(planted_post_dir), tmp_path / "r" / "adapter")
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = result.model.hf_model(ids).logits
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(planted_post_dir)(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-4)


def test_resume_matches_uninterrupted(planted_pair, planted_post_dir, repair_inputs, tmp_path):
    from safetensors.torch import load_file

    run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "whole")
    partial = run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "resumed", stop_after=4)
    assert not (tmp_path / "resumed" / "adapter").exists()
    assert len(partial.log) == 4
    run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "resumed")
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(6))


def test_checkpoint_with_other_settings_raises(planted_pair, planted_post_dir, repair_inputs, tmp_path):
    run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r", stop_after=2)
    with pytest.raises(RunFolderError, match="other repair settings"):
        run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r", config={"rank": 4})


def test_layers_out_of_range(planted_pair, planted_post_dir, repair_inputs, tmp_path):
    with pytest.raises(LayerError, match="out of range"):
        run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r", config={"layers": (1, 9)})


def test_unknown_modules_raise(planted_pair, planted_post_dir, repair_inputs, tmp_path):
    with pytest.raises(ConfigError, match="not linear layers"):
        run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r", config={"modules": ("qkv_linear",)})


def test_architecture_without_projections_raises():
    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))

    with pytest.raises(ConfigError, match="no attention or MLP projection"):
        lora_target_modules(Scalar())


def test_config_validation():
    with pytest.raises(ConfigError, match="mode"):
        RepairConfig(layers=(1,), mode="logits")
    with pytest.raises(ConfigError, match="steps"):
        RepairConfig(layers=(1,), steps=0)


def test_batches_deterministic_and_cover_all():
    seen = [index for step in range(5) for index in batch_indices(10, 4, step, seed=3)]
    assert seen == [index for step in range(5) for index in batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10))


def test_start_at_layer_matches_full_pass(planted_pair, repair_inputs):
    from safereact_interp.activations import rendered_ids
    from safereact_interp.prompts import left_pad
    from safereact_interp.training import hidden_entering, pad_hidden, start_at_layer

    post = planted_pair.post
    sequences = rendered_ids(post, repair_inputs[0])[:4]
    hidden = hidden_entering(post.hf_model, sequences, 2, pad_id=post.tokenizer.pad_token_id)
    ids, mask = left_pad(sequences, post.tokenizer.pad_token_id)
    with torch.no_grad():
        full = post.hf_model(input_ids=ids, attention_mask=mask).logits
        with start_at_layer(post.hf_model, 2, pad_hidden(hidden, ids.shape[1])):
            short = post.hf_model(input_ids=ids, attention_mask=mask).logits
        after = post.hf_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(short[real], full[real], atol=1e-5)
    assert torch.equal(after, full)  # the blocks are restored on leaving


def test_repair_uses_layer_shortcut(planted_pair, planted_post_dir, repair_inputs, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="safereact_interp"):
        result = run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "r", config={"steps": 2})
    assert len(result.log) == 2
    assert "does not reproduce the full pass" not in caplog.text
    shared = re.search(r"(\d+) prompt tokens shared by every sequence", caplog.text)
    assert shared and int(shared.group(1)) > 0


def test_repair_shortcut_gives_the_losses_of_full_passes(planted_pair, planted_post_dir, repair_inputs, tmp_path,
                                                          monkeypatch):
    from safereact_interp import repair as repair_module

    short = run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "short", config={"steps": 3})
    monkeypatch.setattr(repair_module, "shortcut_matches", lambda forward, values: False)
    full = run_repair(planted_pair, planted_post_dir, repair_inputs, tmp_path / "full", config={"steps": 3})
    for one, two in zip(short.log, full.log):
        assert one["align_loss"] == pytest.approx(two["align_loss"], rel=1e-4)
        assert one["retain_loss"] == pytest.approx(two["retain_loss"], rel=1e-3, abs=1e-7)


def test_shortcut_mismatch_detected():
    from safereact_interp.training import shortcut_matches

    assert shortcut_matches(lambda short: torch.ones(3), lambda value: value)
    assert not shortcut_matches(lambda short: torch.ones(3) * (2 if short else 1), lambda value: value)

    def broken(short):
        if short:
            raise RuntimeError("blocks do not pass through")
        return torch.ones(3)

    assert not shortcut_matches(broken, lambda value: value)


def test_rounding_check_is_relative_to_each_vector():
    from safereact_interp.training import same_up_to_rounding

    activations = torch.randn(6, 64)
    activations[0] *= 1e4  # a "massive activation" token
    rounded = activations + 1e-3 * torch.randn(6, 64) * torch.tensor([100.0, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2])[:, None]
    assert same_up_to_rounding(activations, rounded)
    wrong = activations.clone()
    wrong[3] += 0.5  # a real difference in an ordinary token
    assert not same_up_to_rounding(activations, wrong)
    assert same_up_to_rounding(torch.tensor(2.5), torch.tensor(2.50001))
    assert not same_up_to_rounding(torch.tensor(2.5), torch.tensor(2.6))


def test_sft_shortcut_matches_full_passes(planted_post_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safereact_interp.models import prepare_tokenizer
    from safereact_interp.training import SFTExample, train_sft

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(planted_post_dir))
    examples = [SFTExample(text, "I cannot help with that.") for text in bundled_prompts("harmful").train.texts[:6]]
    losses = {}
    for frozen in (0, 2):
        model = add_lora(AutoModelForCausalLM.from_pretrained(planted_post_dir), LoraSettings(rank=4, layers=(2, 3)))
        losses[frozen] = train_sft(model, tokenizer, examples, steps=4, batch_size=3, learning_rate=1e-2,
                                   frozen_below=frozen).losses
    assert losses[0] == pytest.approx(losses[2], abs=1e-4)


def test_start_at_layer_restores_instance_forward(planted_pair):
    from safereact_interp.training import decoder_layers, start_at_layer

    post = planted_pair.post
    block = decoder_layers(post.hf_model)[0]
    original = block.forward

    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    block.forward = wrapped
    try:
        with start_at_layer(post.hf_model, 2, torch.zeros(1, 3, post.d_model)):
            assert block.forward is not wrapped
        assert block.forward is wrapped
    finally:
        del block.forward


def test_sft_first_loss_matches_plain_loss(planted_post_dir, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safereact_interp.models import prepare_tokenizer
    from safereact_interp.training import SFTExample, collate_right_padded, tokenize_examples, train_sft

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(planted_post_dir))
    examples = [SFTExample(text, response) for text, response in
                zip(bundled_prompts("harmful").train.texts[:4], ("No.", "I cannot help with that.", "Sorry, no.", "I won't."))]
    model = add_lora(AutoModelForCausalLM.from_pretrained(planted_post_dir), LoraSettings(rank=4, layers=(2, 3)))
    with torch.no_grad():
        ids, mask, labels = collate_right_padded(tokenize_examples(tokenizer, examples), tokenizer.pad_token_id)
        expected = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    with caplog.at_level("INFO"):
        # one batch contains every example, so the first loss is the plain loss over all of them
        first = train_sft(model, tokenizer, examples, steps=1, batch_size=4, frozen_below=2).losses[0]
    assert first == pytest.approx(expected, abs=1e-5)
    assert "full passes" not in caplog.text


def test_packed_batch_computes_each_sequence_alone(planted_post_dir):
    """Sequences laid end to end in one row, after a shared prefix, give what each gives alone."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from safereact_interp.training import pack_sequences, prefix_cache

    model = AutoModelForCausalLM.from_pretrained(planted_post_dir).eval()
    prefix, rests = [3, 8, 13], [[21, 34], [55, 89, 144, 233], [7]]
    packed = pack_sequences(rests, len(prefix), dtype=torch.float32)
    assert packed.lengths == (2, 4, 1)
    assert packed.ids.tolist() == [[21, 34, 55, 89, 144, 233, 7]]
    assert packed.positions.tolist() == [[3, 4, 3, 4, 5, 6, 3]]
    with torch.no_grad():
        cache = prefix_cache(model, torch.tensor([prefix]), 1)
        logits = model(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                       past_key_values=cache, use_cache=True).logits
        rows = packed.unpack(logits)
        for row, rest in enumerate(rests):
            alone = model(input_ids=torch.tensor([prefix + rest]), past_key_values=DynamicCache()).logits[0, len(prefix):]
            assert torch.allclose(rows[row, rows.shape[1] - len(rest):], alone, atol=1e-5)
            assert torch.all(rows[row, :rows.shape[1] - len(rest)] == 0)  # left padding
    values = [torch.randn(length, 5) for length in packed.lengths]
    assert torch.equal(packed.unpack(packed.concat(values))[1], values[1])
    with pytest.raises(ConfigError, match="at least one token"):
        pack_sequences([[1], []], 2, dtype=torch.float32)
