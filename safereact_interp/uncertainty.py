"""Bootstrap confidence intervals by prompt resampling.

Each quantity is recomputed on prompt sets drawn with replacement from the original ones. The base
and the post-trained model share each draw, since they saw the same prompts. The interval is the
2.5th and 97.5th percentile over the draws. Directions are refitted on every draw, so the
intervals of the direction similarity include the noise of the direction estimate; separability and
probe accuracy resample the held-out prompts; rates resample per-prompt outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor



@dataclass(frozen=True)
class BootstrapConfig:
    """Number of resamples, confidence level and seed."""

    n_resamples: int = 200
    confidence: float = 0.95
    seed: int = 0

    def percentiles(self) -> tuple[float, float]:
        tail = 100 * (1 - self.confidence) / 2
        return tail, 100 - tail


def interval(values: np.ndarray, config: BootstrapConfig) -> tuple[float, float]:
    """Percentile interval of bootstrap values (NaN draws ignored)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    low, high = np.percentile(values, config.percentiles())
    return float(low), float(high)


def rate_interval(outcomes: Sequence[bool], config: BootstrapConfig = BootstrapConfig()) -> tuple[float, float]:
    """Interval of a rate (refusal rate, accuracy) from per-prompt outcomes."""
    outcomes = np.asarray(outcomes, dtype=float)
    if outcomes.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(config.seed)
    draws = rng.integers(0, outcomes.size, size=(config.n_resamples, outcomes.size))
    return interval(outcomes[draws].mean(axis=1), config)


def _resample(n: int, rng: np.random.Generator) -> Tensor:
    return torch.from_numpy(rng.integers(0, n, size=n))


def auroc_columns(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUROC of positive against negative scores for every column at once (Mann-Whitney U / n_p n_n)."""
    n_positive, n_negative = len(positive), len(negative)
    ranks = rankdata(np.concatenate([positive, negative]), axis=0)
    rank_sum = ranks[:n_positive].sum(axis=0)
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def layer_intervals(
    base_harmful: Float[Tensor, "n_h layer d_model"], base_harmless: Float[Tensor, "n_n layer d_model"],
    post_harmful: Float[Tensor, "n_h layer d_model"], post_harmless: Float[Tensor, "n_n layer d_model"],
    base_harmful_val: Float[Tensor, "v_h layer d_model"], base_harmless_val: Float[Tensor, "v_n layer d_model"],
    post_harmful_val: Float[Tensor, "v_h layer d_model"], post_harmless_val: Float[Tensor, "v_n layer d_model"],
    config: BootstrapConfig = BootstrapConfig(), *, from_layer: int = 0,
) -> dict:
    """Intervals of direction similarity and separability per layer, and of their means from `from_layer` on.

    Returns {"direction_similarity": [[low, high] per layer], "separability_base": ..., "separability_post":
    ..., "mean_similarity": [low, high], "mean_separability_post": [low, high]}.
    """
    rng = np.random.default_rng(config.seed)
    n_layers = base_harmful.shape[1]
    similarity = np.zeros((config.n_resamples, n_layers))
    separability = {"base": np.zeros((config.n_resamples, n_layers)), "post": np.zeros((config.n_resamples, n_layers))}
    for draw in range(config.n_resamples):
        harmful_rows, harmless_rows = _resample(len(base_harmful), rng), _resample(len(base_harmless), rng)
        base_direction = base_harmful[harmful_rows].mean(0) - base_harmless[harmless_rows].mean(0)
        post_direction = post_harmful[harmful_rows].mean(0) - post_harmless[harmless_rows].mean(0)
        similarity[draw] = torch.nn.functional.cosine_similarity(base_direction, post_direction, dim=-1).numpy()
        units = base_direction / base_direction.norm(dim=-1, keepdim=True)
        val_harmful, val_harmless = _resample(len(base_harmful_val), rng), _resample(len(base_harmless_val), rng)
        for name, harmful, harmless in (("base", base_harmful_val, base_harmless_val),
                                        ("post", post_harmful_val, post_harmless_val)):
            # <h_l, r̂_l> for every prompt and layer: (prompt, layer).
            harmful_scores = (harmful[val_harmful] * units).sum(-1).numpy()
            harmless_scores = (harmless[val_harmless] * units).sum(-1).numpy()
            separability[name][draw] = auroc_columns(harmful_scores, harmless_scores)

    def per_layer(values: np.ndarray) -> list[list[float]]:
        return [list(interval(values[:, layer], config)) for layer in range(n_layers)]

    late = slice(min(from_layer, n_layers - 1), n_layers)
    return {
        "direction_similarity": per_layer(similarity),
        "separability_base": per_layer(separability["base"]),
        "separability_post": per_layer(separability["post"]),
        "mean_similarity": list(interval(similarity[:, late].mean(axis=1), config)),
        "mean_separability_post": list(interval(separability["post"][:, late].mean(axis=1), config)),
        "n_resamples": config.n_resamples,
        "confidence": config.confidence,
    }


def accuracy_intervals(correct: Sequence[Sequence[bool]], config: BootstrapConfig = BootstrapConfig()
                       ) -> list[list[float]]:
    """Per-layer [low, high] intervals of an accuracy from per-prompt correctness (layers x prompts)."""
    return [list(rate_interval(row, config)) for row in correct]


def drop_interval(base_refused: Sequence[bool], post_refused: Sequence[bool],
                  config: BootstrapConfig = BootstrapConfig()) -> tuple[float, float]:
    """Interval of the drop in refusal rate between two models on the same prompts (paired resampling)."""
    base = np.asarray(base_refused, dtype=float)
    post = np.asarray(post_refused, dtype=float)
    rng = np.random.default_rng(config.seed)
    draws = rng.integers(0, base.size, size=(config.n_resamples, base.size))
    return interval(base[draws].mean(axis=1) - post[draws].mean(axis=1), config)
