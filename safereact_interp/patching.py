"""Activation patching, directional ablation and activation addition, scored by the refusal score.

Activation patching runs the post-trained model P on harmful prompts while the residual stream
after block l, at the readout positions, is replaced by the base model B's activations on the
same prompts. If refusal comes back, the information B uses to refuse is carried there and P's
later layers can still act on it. The fraction restored is
    (score_patched - score_P) / (score_B - score_P).
Direction patching replaces only the component along B's safety direction r̂^B_l, directional
ablation projects r̂^B_l out of every layer's residual stream, and activation addition adds
alpha * r^B_l at one layer. Every sweep reuses one cached prompt context per batch, so a layer
costs one forward pass over the readout and continuation tokens of each batch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .activations import check_layers, check_positions, collect_residuals, resid_hook_name
from .directions import Directions
from .errors import ConfigError, TokenizationMismatchError
from .models import LoadedModel, ModelPair
from .parallel import side_job
from .progress import ProgressFactory, no_progress
from .prompts import PromptSet, encode, render_chat
from .scoring import Hook, RefusalScoreConfig, RefusalScorer


def _local_columns(positions: Sequence[int], start: int, prompt_end: int) -> Tensor:
    """Columns of the readout positions inside a pass that starts at column `start`."""
    return torch.tensor([prompt_end + position - start for position in positions])


@dataclass
class ResidualPatch:
    """Replace the residual stream after block `layer` at the readout positions with `source`.

    `source[i]` holds the activations of prompt i at `positions` (from another model or run).
    """

    layer: int
    source: Float[Tensor, "prompt position d_model"]
    positions: tuple[int, ...]

    def hooks(self, rows: Int[Tensor, "batch"], repeat: int, start: int, prompt_end: int) -> list[Hook]:
        columns = _local_columns(self.positions, start, prompt_end)
        replacement = self.source[rows].repeat_interleave(repeat, dim=0)

        def hook(activation: Tensor, hook) -> Tensor:
            patched = activation.clone()
            patched[:, columns] = replacement.to(activation.device, activation.dtype)
            return patched

        return [(resid_hook_name(self.layer), hook)]


@dataclass
class DirectionPatch:
    """Replace only the component along a unit direction: h + (<src, u> - <h, u>) u at the readout positions."""

    layer: int
    source: Float[Tensor, "prompt position d_model"]
    unit: Float[Tensor, "d_model"]
    positions: tuple[int, ...]

    def hooks(self, rows: Int[Tensor, "batch"], repeat: int, start: int, prompt_end: int) -> list[Hook]:
        columns = _local_columns(self.positions, start, prompt_end)
        source_projection = (self.source[rows].float() @ self.unit.float()).repeat_interleave(repeat, dim=0)

        def hook(activation: Tensor, hook) -> Tensor:
            unit = self.unit.to(activation.device, activation.dtype)
            patched = activation.clone()
            current = patched[:, columns] @ unit
            shift = source_projection.to(activation.device, activation.dtype) - current
            patched[:, columns] = patched[:, columns] + shift[..., None] * unit
            return patched

        return [(resid_hook_name(self.layer), hook)]


@dataclass
class DirectionalAblation:
    """Project a unit direction out of the residual stream after each given block, at every position:
    h <- h - <h, u_l> u_l."""

    units: dict[int, Float[Tensor, "d_model"]]
    positions: None = None

    def hooks(self, rows: Int[Tensor, "batch"], repeat: int, start: int, prompt_end: int) -> list[Hook]:
        hooks = []
        for layer, unit in self.units.items():
            def hook(activation: Tensor, hook, unit=unit) -> Tensor:
                unit = unit.to(activation.device, activation.dtype)
                return activation - (activation @ unit)[..., None] * unit
            hooks.append((resid_hook_name(layer), hook))
        return hooks


@dataclass
class ActivationAddition:
    """Add `vector` (for example alpha * r^B_l) to the residual stream after block `layer` at every position."""

    layer: int
    vector: Float[Tensor, "d_model"]
    positions: None = None

    def hooks(self, rows: Int[Tensor, "batch"], repeat: int, start: int, prompt_end: int) -> list[Hook]:
        def hook(activation: Tensor, hook) -> Tensor:
            return activation + self.vector.to(activation.device, activation.dtype)
        return [(resid_hook_name(self.layer), hook)]


def ablation_of(directions: Directions, layers: Sequence[int] | None = None) -> DirectionalAblation:
    """Directional ablation of `directions` at the given layers (all of its layers by default)."""
    chosen = directions.layers if layers is None else layers
    return DirectionalAblation({layer: directions.unit_at(layer) for layer in chosen})


def check_same_tokenization(first: LoadedModel, second: LoadedModel, prompts: PromptSet | Sequence[str], *,
                            system_prompt: str | None = None) -> None:
    """Raise `TokenizationMismatchError` unless every prompt has the same token ids in both models."""
    texts = prompts.texts if isinstance(prompts, PromptSet) else list(prompts)
    first_ids = encode(first.tokenizer, render_chat(first.tokenizer, texts, system_prompt=system_prompt))
    second_ids = encode(second.tokenizer, render_chat(second.tokenizer, texts, system_prompt=system_prompt))
    for index, (one, two) in enumerate(zip(first_ids, second_ids)):
        if one != two:
            raise TokenizationMismatchError(
                f"prompt {index} ({texts[index][:60]!r}) tokenizes differently in {first.spec} "
                f"({len(one)} tokens) and {second.spec} ({len(two)} tokens); activation patching needs "
                "identical tokens: use a post-trained model with the base model's tokenizer and chat template")


def fraction_restored(score: float, score_source: float, score_target: float) -> float:
    """(score - score_target) / (score_source - score_target); NaN when the two models score the same."""
    gap = score_source - score_target
    if abs(gap) < 1e-9:
        return float("nan")
    return (score - score_target) / gap


@dataclass(frozen=True)
class PatchingResult:
    """Refusal scores of the layer sweeps and interventions; every score is a mean over prompts."""

    layers: list[int]
    positions: list[int]
    n_prompts: int
    score_base: float
    score_post: float
    residual_scores: list[float]
    residual_fraction: list[float]
    direction_scores: list[float]
    direction_fraction: list[float]
    ablation: dict[str, float]
    addition: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    scorer: dict = field(default_factory=dict)
    per_prompt: dict[str, list] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PatchingResult:
        names = cls.__dataclass_fields__.keys()
        return cls(**{name: data[name] for name in names if name in data})


def _mean(scores: Tensor) -> float:
    return float(scores.mean())


def layer_sweep(
    pair: ModelPair,
    prompts: PromptSet,
    directions: Directions,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] = (-1,),
    config: RefusalScoreConfig = RefusalScoreConfig(),
    batch_size: int = 16,
    alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    addition_layer: int | None = None,
    progress: ProgressFactory = no_progress,
    parallel: bool = False,
) -> PatchingResult:
    """Activation patching base -> post-trained at every layer, direction patching, directional
    ablation of the base safety direction (in both models) and activation addition at one layer.

    `directions` are the base model's safety directions. `addition_layer` defaults to the layer
    where residual patching restores the most. With `parallel`, half of the layers are patched in a
    forked process on CPU (see `parallel.side_job`); scores match serial ones up to float rounding.
    """
    layers = check_layers(directions.layers if layers is None else layers, pair.post.n_layers)
    positions = check_positions(positions)
    check_same_tokenization(pair.base, pair.post, prompts, system_prompt=config.system_prompt)
    tail = -min(positions)

    base_activations = collect_residuals(pair.base, prompts, layers, positions=positions, batch_size=batch_size,
                                         system_prompt=config.system_prompt)
    post_scorer = RefusalScorer(pair.post, prompts, config=config, batch_size=batch_size, tail=tail)
    base_scorer = RefusalScorer(pair.base, prompts, config=config, batch_size=batch_size, tail=tail)
    scores_post = post_scorer.score()
    scores_base = base_scorer.score()
    score_post, score_base = _mean(scores_post), _mean(scores_base)

    def patch_layers(indices: Sequence[int], progress: ProgressFactory) -> dict[int, tuple[Tensor, Tensor]]:
        """Per-prompt scores of residual and direction patching at `layers[index]`, by index."""
        patched = {}
        with progress("activation patching", 2 * len(indices)) as advance:
            for index in indices:
                layer, source = layers[index], base_activations.values[:, index]
                residual_scores = post_scorer.score([ResidualPatch(layer, source, positions)])
                advance(1)
                direction_scores = post_scorer.score([DirectionPatch(layer, source, directions.unit_at(layer),
                                                                     positions)])
                advance(1)
                patched[index] = (residual_scores, direction_scores)
        return patched

    ablation_all = ablation_of(directions)
    indices = range(len(layers))
    with side_job(lambda progress: patch_layers(indices[1::2], progress), "activation patching of half the layers",
                  progress=progress, enabled=parallel) as other_half:
        patched = patch_layers(indices[0::2], other_half.watch(progress))
        ablated_base = _mean(base_scorer.score([ablation_all]))
        ablated_post = _mean(post_scorer.score([ablation_all]))
        patched.update(other_half.result())

    per_prompt: dict[str, list] = {"base": scores_base.tolist(), "post": scores_post.tolist(),
                                   "residual": [patched[index][0].tolist() for index in indices],
                                   "direction": [patched[index][1].tolist() for index in indices]}
    residual = [_mean(patched[index][0]) for index in indices]
    direction = [_mean(patched[index][1]) for index in indices]
    residual_fraction = [fraction_restored(score, score_base, score_post) for score in residual]
    direction_fraction = [fraction_restored(score, score_base, score_post) for score in direction]

    # Fraction of the base-post gap in refusal score that ablation removes from the base model.
    ablation = {"base": ablated_base, "post": ablated_post,
                "base_fraction_removed": fraction_restored(score_base - ablated_base + score_post,
                                                           score_base, score_post)}

    if addition_layer is None:
        finite = [(value, layer) for value, layer in zip(residual_fraction, layers) if not np.isnan(value)]
        addition_layer = max(finite)[1] if finite else layers[len(layers) // 2]
    vector = directions.at(addition_layer)
    # Adding alpha = 0 changes nothing, so that score is the clean one.
    addition_scores = [score_post if alpha == 0 else _mean(post_scorer.score([ActivationAddition(addition_layer,
                                                                                                  alpha * vector)]))
                       for alpha in alphas]
    addition = {"layer": addition_layer, "alphas": list(alphas), "scores": addition_scores,
                "fraction_restored": [fraction_restored(score, score_base, score_post) for score in addition_scores]}

    return PatchingResult(
        layers=list(layers), positions=list(positions), n_prompts=len(prompts), score_base=score_base,
        score_post=score_post, residual_scores=residual, residual_fraction=residual_fraction,
        direction_scores=direction, direction_fraction=direction_fraction, ablation=ablation, addition=addition,
        scorer=config.to_dict(), per_prompt=per_prompt)


def select_layers(patching: PatchingResult, layer_scores: Sequence[float], diagnosis_layers: Sequence[int], *,
                  k: int = 3, min_gap: int | None = None, n_layers: int | None = None) -> dict:
    """Choose k layers for the repair from the patching sweep and the diagnosis ranking.

    combined_l = clip(fraction restored by patching at l, 0, 1) * (0.5 + 0.5 * diagnosis score_l / max score)
    Layers are taken greedily by combined score, at least `min_gap` apart (default n_layers // 10), so
    the adapters spread over the depth where the mechanism can be reactivated. The last layer is skipped:
    its residual stream feeds only the unembedding.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    n_layers = n_layers or (max(patching.layers) + 1)
    min_gap = max(1, n_layers // 10) if min_gap is None else min_gap
    diagnosis = dict(zip(diagnosis_layers, layer_scores))
    top = max([value for value in layer_scores if value is not None and not np.isnan(value)] + [0.0])
    combined = {}
    for layer, fraction in zip(patching.layers, patching.residual_fraction):
        if layer == n_layers - 1 or fraction is None or np.isnan(fraction):
            continue
        weight = 0.5 + 0.5 * (diagnosis.get(layer, 0.0) / top if top > 0 else 0.0)
        combined[layer] = float(np.clip(fraction, 0.0, 1.0) * weight)
    chosen: list[int] = []
    for layer in sorted(combined, key=lambda item: (-combined[item], -item)):
        if all(abs(layer - other) >= min_gap for other in chosen):
            chosen.append(layer)
        if len(chosen) == k:
            break
    return {"layers": sorted(chosen), "k": k, "min_gap": min_gap, "combined_scores": combined,
            "rule": "clip(fraction restored, 0, 1) * (0.5 + 0.5 * diagnosis score / max diagnosis score), "
                    f"greedy, layers at least {min_gap} apart, last layer excluded"}
