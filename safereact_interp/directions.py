"""Safety (and capability) directions per layer.

The safety direction of model M at layer l is the difference in means of its activations on
harmful and harmless prompts, r^M_l = mean_{x in H} h^M_l(x) - mean_{x in N} h^M_l(x). Two
alternatives estimate the same axis differently: `pca` takes the first principal component of
paired differences, `probe` the weight vector of a logistic-regression probe. Both are rescaled to
the length of the difference in means projected on them, so norms stay comparable across methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .artifacts import load_tensors, save_tensors
from .errors import ConfigError, DirectionError

logger = logging.getLogger(__name__)

DirectionMethod = Literal["diff_means", "pca", "probe"]
METHODS: tuple[DirectionMethod, ...] = ("diff_means", "pca", "probe")
# Below this norm (relative to the activations' mean norm) a direction counts as zero.
_ZERO_NORM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Directions:
    """One direction vector per layer (unnormalised), with the method that produced it."""

    layers: tuple[int, ...]
    vectors: Float[Tensor, "layer d_model"]
    method: DirectionMethod

    def __post_init__(self) -> None:
        if self.vectors.shape[0] != len(self.layers):
            raise ConfigError(
                f"{self.vectors.shape[0]} direction vectors for {len(self.layers)} layers")

    def unit(self) -> Float[Tensor, "layer d_model"]:
        """r̂_l = r_l / ||r_l||."""
        return self.vectors / self.vectors.norm(dim=-1, keepdim=True)

    def norms(self) -> Float[Tensor, "layer"]:
        return self.vectors.norm(dim=-1)

    def at(self, layer: int) -> Float[Tensor, "d_model"]:
        if layer not in self.layers:
            raise ConfigError(f"no direction at layer {layer}; directions exist for layers {list(self.layers)}")
        return self.vectors[self.layers.index(layer)]

    def unit_at(self, layer: int) -> Float[Tensor, "d_model"]:
        vector = self.at(layer)
        return vector / vector.norm()

    def save(self, path: str | Path) -> None:
        save_tensors(path, {"vectors": self.vectors.float(),
                            "layers": torch.tensor(self.layers, dtype=torch.long)})

    @classmethod
    def load(cls, path: str | Path, method: DirectionMethod = "diff_means") -> Directions:
        tensors = load_tensors(path)
        return cls(layers=tuple(int(layer) for layer in tensors["layers"]), vectors=tensors["vectors"],
                   method=method)


def diff_in_means(
    positive: Float[Tensor, "n_pos layer d_model"], negative: Float[Tensor, "n_neg layer d_model"]
) -> Float[Tensor, "layer d_model"]:
    """r_l = mean(positive) - mean(negative), per layer."""
    return positive.mean(dim=0) - negative.mean(dim=0)


def _pca_direction(positive: Tensor, negative: Tensor, reference: Tensor, seed: int) -> Tensor:
    """First principal component of randomly paired differences, signed like `reference`."""
    generator = torch.Generator().manual_seed(seed)
    count = min(len(positive), len(negative))
    first = positive[torch.randperm(len(positive), generator=generator)[:count]]
    second = negative[torch.randperm(len(negative), generator=generator)[:count]]
    differences = (first - second).double()
    # Uncentred: the component should capture the mean shift, not only the spread around it.
    _, _, right = torch.linalg.svd(differences, full_matrices=False)
    component = right[0].float()
    return component if torch.dot(component, reference) >= 0 else -component


def _probe_direction(positive: Tensor, negative: Tensor, reference: Tensor, seed: int) -> Tensor:
    from sklearn.linear_model import LogisticRegression

    features = torch.cat([positive, negative]).numpy()
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    scale = features.std(axis=0) + 1e-6
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(features / scale, labels)
    weight = torch.from_numpy(probe.coef_[0] / scale).float()
    weight = weight / weight.norm()
    return weight if torch.dot(weight, reference) >= 0 else -weight


def compute_directions(
    positive: Float[Tensor, "n_pos layer d_model"],
    negative: Float[Tensor, "n_neg layer d_model"],
    layers: tuple[int, ...],
    method: DirectionMethod = "diff_means",
    *,
    seed: int = 0,
    check_zero: bool = True,
) -> Directions:
    """Direction per layer separating `positive` from `negative` activations.

    diff_means: r_l = mean_pos h_l - mean_neg h_l. pca and probe: a unit vector u_l from paired
    differences or a logistic-regression probe, scaled to r_l = <mean difference, u_l> u_l.
    Raises `DirectionError` when a direction has (numerically) zero norm, because the two sets have
    identical means there.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown direction method {method!r}; use one of {', '.join(METHODS)}")
    if len(positive) < 2 or len(negative) < 2:
        raise DirectionError(
            f"need at least 2 prompts on each side to compute a direction, got {len(positive)} and "
            f"{len(negative)}; pass more prompts")
    positive, negative = positive.float(), negative.float()
    means = diff_in_means(positive, negative)

    if check_zero:
        scale = torch.cat([positive, negative]).norm(dim=-1).mean(dim=0)
        relative = means.norm(dim=-1) / scale.clamp_min(1e-12)
        for index, layer in enumerate(layers):
            if relative[index] < _ZERO_NORM_TOLERANCE:
                raise DirectionError(
                    f"the two prompt sets have identical mean activations at layer {layer} "
                    f"(direction norm {means[index].norm():.3g}), so the direction is undefined; "
                    "check that the harmful and harmless prompt sets differ")

    if method == "diff_means":
        return Directions(layers, means, method)

    vectors = []
    for index in range(len(layers)):
        finder = _pca_direction if method == "pca" else _probe_direction
        unit = finder(positive[:, index], negative[:, index], means[index], seed)
        vectors.append(torch.dot(means[index], unit) * unit)
    return Directions(layers, torch.stack(vectors), method)


def cosine_similarity(
    first: Float[Tensor, "layer d_model"], second: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "layer"]:
    """cos(first_l, second_l) per layer."""
    return torch.nn.functional.cosine_similarity(first.float(), second.float(), dim=-1)


def project(
    activations: Float[Tensor, "... d_model"], unit: Float[Tensor, "d_model"]
) -> Float[Tensor, "..."]:
    """<h, r̂>: the component of each activation along a unit direction."""
    return activations.float() @ unit.float()
