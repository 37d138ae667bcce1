"""Batched, padding-aware collection of residual-stream activations through TransformerLens hooks.

Only what the analysis needs is kept: the hooked activation at the readout positions of each
prompt, copied out of the forward pass, never a full activation cache. Prompts are grouped by
length and left-padded, so the readout positions (negative offsets from the end) name the same
tokens in every row, and the forward pass stops after the deepest requested layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge.exceptions import StopAtLayerException
from transformers import DynamicCache

from .errors import ConfigError, LayerError
from .models import LoadedModel
from .prompts import (PromptSet, encode, left_pad, length_sorted_batches, render_chat, shared_prefix_length,
                      split_shared_prefix)


def resid_hook_name(layer: int) -> str:
    """Hook name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def check_layers(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Validate layer indices (negative ones count from the end) and return them non-negative."""
    checked = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise LayerError(f"layer index {layer!r} is not an integer")
        resolved = layer + n_layers if layer < 0 else layer
        if not 0 <= resolved < n_layers:
            raise LayerError(
                f"layer index {layer} is out of range: the model has {n_layers} layers, "
                f"so use 0..{n_layers - 1} (or -{n_layers}..-1)"
            )
        checked.append(resolved)
    if not checked:
        raise LayerError("no layers given; pass at least one layer index")
    if len(set(checked)) != len(checked):
        raise LayerError(f"layer indices {list(layers)} name a layer twice; pass each layer once")
    return tuple(checked)


def check_positions(positions: Sequence[int]) -> tuple[int, ...]:
    """Validate readout positions: distinct negative offsets from the end of the prompt."""
    positions = tuple(positions)
    if not positions:
        raise ConfigError("no readout positions given; use for example (-1,) for the last prompt token")
    for position in positions:
        if not isinstance(position, int) or position >= 0:
            raise ConfigError(
                f"readout position {position!r} must be a negative offset from the end of the "
                "prompt (-1 is the last prompt token)"
            )
    if len(set(positions)) != len(positions):
        raise ConfigError(f"readout positions {positions} repeat an offset")
    return positions


@dataclass(frozen=True)
class ResidualActivations:
    """Residual-stream activations h_l(x) of a prompt set at chosen layers and readout positions."""

    layers: tuple[int, ...]
    positions: tuple[int, ...]
    values: Float[Tensor, "prompt layer position d_model"]

    def __len__(self) -> int:
        return self.values.shape[0]

    def pooled(self) -> Float[Tensor, "prompt layer d_model"]:
        """h_l(x): the mean over readout positions (the activation itself for one position)."""
        return self.values.mean(dim=2)

    def layer(self, layer: int) -> Float[Tensor, "prompt d_model"]:
        """Pooled activations at one layer index (an entry of `layers`)."""
        if layer not in self.layers:
            raise LayerError(f"layer {layer} was not collected; collected layers are {list(self.layers)}")
        return self.pooled()[:, self.layers.index(layer)]


def rendered_ids(model: LoadedModel, prompts: PromptSet | Sequence[str], *,
                 system_prompt: str | None = None, response_prefix: str = "") -> list[list[int]]:
    """Token ids of prompts rendered with the model's chat template."""
    texts = prompts.texts if isinstance(prompts, PromptSet) else list(prompts)
    if not texts:
        raise ConfigError("the prompt set is empty; pass at least one prompt")
    rendered = render_chat(model.tokenizer, texts, system_prompt=system_prompt,
                           response_prefix=response_prefix)
    return encode(model.tokenizer, rendered)


def prefill_shared_prefix(model: LoadedModel, sequences: Sequence[Sequence[int]], prefix_hooks: Sequence = (), *,
                          keep: int = 1
                          ) -> tuple[DynamicCache, Tensor, Tensor, Tensor]:
    """Run the token prefix that all `sequences` share once, as a batch of one, into a key/value cache
    repeated for every row.

    Returns the cache, the rest of each sequence left-padded, the attention mask over prefix and
    rest, and the rest's position ids. The last `keep` tokens of the shortest sequence stay in the
    rest, so that readout positions up to -keep fall there.

    The padding sits between the shared prefix and each row's own tokens, where the mask hides it,
    and position ids count only real tokens, so every row computes what it would alone.
    `prefix_hooks` run during the prefix pass (interventions that act on every position).
    """
    device = model.device
    shared = shared_prefix_length(sequences, keep=keep)
    prefix, ids, mask, positions = (tensor.to(device) for tensor in split_shared_prefix(
        sequences, shared, model.tokenizer.pad_token_id))
    cache = DynamicCache()
    if shared:
        with model.hooked(list(prefix_hooks)) as network:
            try:
                network(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                        position_ids=torch.arange(shared, device=device)[None], past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            except StopAtLayerException:
                pass  # a hook ended the pass after the deepest layer the caller reads
        cache.batch_repeat_interleave(len(sequences))
    return cache, ids, mask, positions


@torch.inference_mode()
def collect_activations(
    model: LoadedModel,
    prompts: PromptSet | Sequence[str],
    hook_names: Sequence[str],
    *,
    positions: Sequence[int] = (-1,),
    batch_size: int = 16,
    system_prompt: str | None = None,
    response_prefix: str = "",
    stop_after: str | None = None,
    interventions: Sequence = (),
    progress: Callable[[int], None] | None = None,
) -> dict[str, Float[Tensor, "prompt position d_model"]]:
    """Run the model over the prompts and keep each named hook's activation at the readout positions.

    `interventions` (see `scoring.Intervention`) change the pass, for example a directional
    ablation or a patch. `stop_after` names the hook after which the forward pass stops, which
    skips the later blocks and the unembedding.
    """
    positions = check_positions(positions)
    sequences = rendered_ids(model, prompts, system_prompt=system_prompt, response_prefix=response_prefix)
    shortest = min(len(sequence) for sequence in sequences)
    if -min(positions) > shortest:
        raise ConfigError(
            f"readout position {min(positions)} reaches before the start of the shortest prompt "
            f"({shortest} tokens); use offsets of at most {shortest}"
        )

    position_index = torch.tensor(positions)
    # Readout and patched positions must lie after the prompt prefix that a batch shares.
    keep = max([-min(positions)] + [-min(intervention.positions) for intervention in interventions
                                    if intervention.positions])
    outputs = {name: [None] * len(sequences) for name in hook_names}

    def stop(activation: Tensor, hook) -> Tensor:
        raise StopAtLayerException(activation)

    for batch in length_sorted_batches([len(sequence) for sequence in sequences], batch_size):
        rows = torch.tensor(batch)
        prefix_hooks = [hook for intervention in interventions if intervention.positions is None
                        for hook in intervention.hooks(rows[:1], 1, 0, 0)]
        if stop_after is not None:
            prefix_hooks.append((stop_after, stop))
        cache, ids, mask, position_ids = prefill_shared_prefix(
            model, [sequences[index] for index in batch], prefix_hooks, keep=keep)
        width, prompt_end = ids.shape[1], mask.shape[1]
        captured: dict[str, Tensor] = {}

        def make_hook(name: str) -> Callable:
            def hook(activation: Tensor, hook) -> Tensor:
                captured[name] = activation[:, width + position_index].detach().float().cpu()
                if name == stop_after:
                    raise StopAtLayerException(activation)
                return activation
            return hook

        hooks = [hook for intervention in interventions
                 for hook in intervention.hooks(rows, 1, prompt_end - width, prompt_end)]
        hooks += [(name, make_hook(name)) for name in hook_names]
        with model.hooked(hooks) as network:
            try:
                network(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
            except StopAtLayerException:
                pass
        for name in hook_names:
            for row, index in enumerate(batch):
                outputs[name][index] = captured[name][row]
        if progress is not None:
            progress(len(batch))
    return {name: torch.stack(values) for name, values in outputs.items()}


def collect_residuals(
    model: LoadedModel,
    prompts: PromptSet | Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    positions: Sequence[int] = (-1,),
    batch_size: int = 16,
    system_prompt: str | None = None,
    response_prefix: str = "",
    interventions: Sequence = (),
    progress: Callable[[int], None] | None = None,
) -> ResidualActivations:
    """Collect the residual stream after each block in `layers` (all layers when None)."""
    layers = check_layers(range(model.n_layers) if layers is None else layers, model.n_layers)
    names = [resid_hook_name(layer) for layer in layers]
    captured = collect_activations(
        model, prompts, names, positions=positions, batch_size=batch_size,
        system_prompt=system_prompt, response_prefix=response_prefix,
        stop_after=resid_hook_name(max(layers)),
        interventions=interventions, progress=progress,
    )
    values = torch.stack([captured[name] for name in names], dim=1)
    return ResidualActivations(layers=layers, positions=tuple(positions), values=values)
