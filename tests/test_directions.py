import pytest
import torch

from safereact_interp.directions import Directions, compute_directions, cosine_similarity
from safereact_interp.errors import ConfigError, DirectionError


def planted(n=200, d=32, layers=3, shift=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(layers, d, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    negative = torch.randn(n, layers, d, generator=generator)
    positive = torch.randn(n, layers, d, generator=generator) + shift * direction
    return positive, negative, direction


@pytest.mark.parametrize("method", ["diff_means", "pca", "probe"])
def test_recovers_planted_direction(method):
    positive, negative, direction = planted()
    found = compute_directions(positive, negative, (0, 1, 2), method)
    assert (cosine_similarity(found.vectors, direction) > 0.9).all()


def test_diff_means_norm_matches_shift():
    positive, negative, _ = planted(n=2000, shift=3.0)
    found = compute_directions(positive, negative, (0, 1, 2))
    assert torch.allclose(found.norms(), torch.full((3,), 3.0), atol=0.25)


def test_identical_means_raise():
    activations = torch.randn(10, 2, 8)
    with pytest.raises(DirectionError, match="identical mean activations at layer 4"):
        compute_directions(activations, activations.clone(), (4, 5))


def test_too_few_prompts_raise():
    with pytest.raises(DirectionError, match="at least 2"):
        compute_directions(torch.randn(1, 1, 4), torch.randn(5, 1, 4), (0,))


def test_unknown_method_raises():
    with pytest.raises(ConfigError, match="unknown direction method"):
        compute_directions(torch.randn(4, 1, 4), torch.randn(4, 1, 4), (0,), "svd")


def test_save_load_roundtrip(tmp_path):
    directions = Directions((3, 7), torch.randn(2, 16), "diff_means")
    directions.save(tmp_path / "d.safetensors")
    loaded = Directions.load(tmp_path / "d.safetensors")
    assert loaded.layers == (3, 7)
    assert torch.equal(loaded.vectors, directions.vectors)
