import pytest
import torch

from safereact_interp.activations import check_layers, collect_residuals
from safereact_interp.errors import ConfigError, LayerError
from safereact_interp.patching import DirectionalAblation
from safereact_interp.prompts import bundled_prompts


def test_batched_equals_alone(tiny_model):
    texts = ["Hi", "Tell me a long story about a dragon, a knight and a castle by the sea, please."]
    batched = collect_residuals(tiny_model, texts, positions=(-3, -1), batch_size=2)
    for index, text in enumerate(texts):
        alone = collect_residuals(tiny_model, [text], positions=(-3, -1), batch_size=1)
        assert torch.allclose(batched.values[index], alone.values[0], atol=1e-5)


def test_matches_hf_hidden_states(tiny_model):
    text = bundled_prompts("harmless").train.texts[0]
    activations = collect_residuals(tiny_model, [text], layers=[0, 2])
    ids = tiny_model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        hidden = tiny_model.hf_model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(activations.values[0, 0, 0], hidden[1][0, -1], atol=1e-5)
    assert torch.allclose(activations.values[0, 1, 0], hidden[3][0, -1], atol=1e-5)


def test_shape(tiny_model):
    prompts = bundled_prompts("harmful").train.head(5)
    activations = collect_residuals(tiny_model, prompts, layers=[1, 3], positions=(-2, -1), batch_size=2)
    assert activations.values.shape == (5, 2, 2, tiny_model.d_model)
    assert activations.pooled().shape == (5, 2, tiny_model.d_model)


def test_layer_out_of_range(tiny_model):
    with pytest.raises(LayerError, match="layer index 4 is out of range: the model has 4 layers"):
        collect_residuals(tiny_model, ["hello"], layers=[4])


def test_negative_layers_resolve():
    assert check_layers([-1, 0], 4) == (3, 0)


def test_duplicate_layers_raise():
    with pytest.raises(LayerError, match="twice"):
        check_layers([1, 1], 4)


def test_positions_must_be_negative(tiny_model):
    with pytest.raises(ConfigError, match="negative offset"):
        collect_residuals(tiny_model, ["hello"], positions=(0,))


def test_empty_prompt_set(tiny_model):
    with pytest.raises(ConfigError, match="empty"):
        collect_residuals(tiny_model, [])


def test_ablation_removes_planted_direction(tiny_model):
    unit = torch.randn(tiny_model.d_model)
    unit = unit / unit.norm()
    texts = bundled_prompts("harmless").train.texts[:4]
    ablated = collect_residuals(tiny_model, texts, layers=[2], positions=(-3, -2, -1),
                                interventions=[DirectionalAblation({2: unit})])
    clean = collect_residuals(tiny_model, texts, layers=[2], positions=(-3, -2, -1))
    assert (clean.values @ unit).abs().max() > 1e-2
    assert (ablated.values @ unit).abs().max() < 1e-5
