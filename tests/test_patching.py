import pytest
import torch

from safereact_interp.activations import collect_residuals
from safereact_interp.directions import Directions, compute_directions
from safereact_interp.errors import ConfigError, TokenizationMismatchError
from safereact_interp.models import ModelPair
from safereact_interp.patching import (DirectionPatch, ResidualPatch, check_same_tokenization, layer_sweep,
                                       select_layers)
from safereact_interp.prompts import PromptSet, bundled_prompts
from safereact_interp.scoring import RefusalScoreConfig, RefusalScorer


@pytest.fixture(scope="module")
def one_token(tokenizer):
    """Single-token continuations: the score then depends only on the last prompt position's final residual."""
    words = [word for word in ("I", "Sure", "Here", "The", "A", "It") if len(tokenizer(word).input_ids) == 1]
    return RefusalScoreConfig(refusals=(words[0],), compliances=(words[1],))


@pytest.fixture(scope="module")
def harmful():
    return bundled_prompts("harmful").val.head(6)


def test_self_patch_is_noop(planted_pair, harmful):
    post = planted_pair.post
    positions = (-3, -2, -1)
    own = collect_residuals(post, harmful, range(4), positions=positions)
    scorer = RefusalScorer(post, harmful, batch_size=4, tail=3)
    clean = scorer.score()
    for index in range(4):
        patched = scorer.score([ResidualPatch(index, own.values[:, index], positions)])
        assert torch.allclose(patched, clean, atol=1e-5)


def test_patch_every_layer_gives_base_score(planted_pair, harmful, one_token):
    base, post = planted_pair.base, planted_pair.post
    activations = collect_residuals(base, harmful, range(4), positions=(-1,))
    base_score = RefusalScorer(base, harmful, config=one_token).score()
    post_scorer = RefusalScorer(post, harmful, config=one_token)
    patches = [ResidualPatch(layer, activations.values[:, layer], (-1,)) for layer in range(4)]
    assert not torch.allclose(post_scorer.score(), base_score, atol=1e-3)
    assert torch.allclose(post_scorer.score(patches), base_score, atol=1e-4)


def test_direction_patch_sets_projection(planted_pair, harmful):
    base, post = planted_pair.base, planted_pair.post
    unit = torch.nn.functional.normalize(torch.randn(post.d_model), dim=0)
    source = collect_residuals(base, harmful, [2], positions=(-1,)).values[:, 0]
    patch = DirectionPatch(2, source, unit, (-1,))
    patched = collect_residuals(post, harmful, [2], positions=(-1,),
                                interventions=[patch]).values[:, 0, 0]
    clean = collect_residuals(post, harmful, [2], positions=(-1,)).values[:, 0, 0]
    assert torch.allclose(patched @ unit, source[:, 0] @ unit, atol=1e-4)
    orthogonal = lambda x: x - (x @ unit)[:, None] * unit
    assert torch.allclose(orthogonal(patched), orthogonal(clean), atol=1e-4)


def test_sweep_fractions(planted_pair, harmful, one_token):
    directions = compute_directions(
        collect_residuals(planted_pair.base, bundled_prompts("harmful").train.head(8), range(4)).pooled(),
        collect_residuals(planted_pair.base, bundled_prompts("harmless").train.head(8), range(4)).pooled(),
        (0, 1, 2, 3))
    result = layer_sweep(planted_pair, harmful, directions, positions=(-1,), config=one_token, alphas=(0.0, 1.0))
    assert result.residual_fraction[-1] == pytest.approx(1.0, abs=1e-3)
    assert result.addition["scores"][0] == pytest.approx(result.score_post, abs=1e-5)
    selection = select_layers(result, [0.0, 0.1, 0.2, 0.3], [0, 1, 2, 3], k=2)
    assert len(selection["layers"]) == 2
    assert 3 not in selection["layers"]


def test_tokenization_mismatch_raises(tiny_model, tmp_path, tokenizer):
    from conftest import build_tiny_model
    from safereact_interp.models import load_model

    other = load_model(str(build_tiny_model(tmp_path / "other", tokenizer=tokenizer)))
    other.tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    with pytest.raises(TokenizationMismatchError, match="tokenizes differently"):
        check_same_tokenization(tiny_model, other, ["hello"])


def test_choose_addition_skips_zero_alpha():
    from safereact_interp.verify import choose_addition

    sweep = {"addition": {"layer": 5, "alphas": [0.0, 0.5, 1.0, 2.0], "fraction_restored": [0.0, 0.4, 1.2, 1.5]}}
    assert choose_addition(sweep) == (5, 1.0)
    sweep["addition"]["fraction_restored"] = [0.0, 0.4, 0.7, 0.6]
    assert choose_addition(sweep) == (5, 1.0)
    sweep["addition"]["fraction_restored"] = [0.0, -0.1, -0.3, -0.2]
    assert choose_addition(sweep) == (5, 0.5)
    sweep["addition"]["alphas"] = [0.0]
    with pytest.raises(ConfigError, match="positive alpha"):
        choose_addition(sweep)


def test_continuation_reuse_matches_full_passes(planted_pair, harmful, caplog):
    base, post = planted_pair.base, planted_pair.post
    positions = (-2, -1)
    source = collect_residuals(base, harmful, range(4), positions=positions)
    reusing = RefusalScorer(post, harmful, batch_size=4, tail=2)
    full = RefusalScorer(post, harmful, batch_size=4, tail=2, reuse_bytes=0)
    with caplog.at_level("INFO", logger="safereact_interp"):
        assert torch.allclose(reusing.score(), full.score(), atol=1e-6)
        for layer in range(4):
            patch = [ResidualPatch(layer, source.values[:, layer], positions)]
            assert torch.allclose(reusing.score(patch), full.score(patch), atol=1e-4)
    assert reusing._skip_checked is True
    assert full._skip_checked is False
    assert len(reusing._entering[0]) == post.n_layers
    assert "does not reproduce" not in caplog.text
