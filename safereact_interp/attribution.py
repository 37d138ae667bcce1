"""Component attribution of the safety signal and of the norm growth between base and post-trained model.

The residual stream after block l is the sum of what every earlier component wrote into it:
h_l = h_{l-1} + attn_l + mlp_l, and the attention output is the sum of its heads. So each
component's share of a linear readout can be read off exactly:
- safety signal: d^M_{l,c} = <mean_H c(x) - mean_N c(x), r̂^B_l>, the part of the harmful-minus-
  harmless difference along the base safety direction that component c of block l writes;
- norm growth: g^M_{l,c} = mean_x <c(x), ĥ^M_l(x)>, the part of ||h^M_l(x)|| that c contributes
  along the residual's own direction (the contributions of the previous residual, the attention
  and the MLP add up to the norm).
Comparing the post-trained model P with the base model B per component (P - B) shows which
attention layers, heads and MLPs amplified the residual stream and which changed the safety signal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import check_layers, check_positions, collect_activations
from .directions import Directions
from .models import LoadedModel, ModelPair, eager_attention
from .prompts import PromptSet


def _hook_names(layer: int) -> dict[str, str]:
    return {"resid": f"blocks.{layer}.hook_resid_post", "attn": f"blocks.{layer}.attn.hook_out",
            "mlp": f"blocks.{layer}.mlp.hook_out", "heads": f"blocks.{layer}.attn.hook_result"}


@dataclass(frozen=True)
class Attribution:
    """Per-layer contributions of attention and MLP (and heads) in both models, and their change.

    `safety[model][component]` and `norm[model][component]` are lists over `layers`; `heads[model]`
    is a layers x heads table of safety-signal contributions (empty when the bridge exposes no
    per-head outputs for the architecture).
    """

    layers: list[int]
    positions: list[int]
    safety: dict[str, dict[str, list[float]]]
    norm: dict[str, dict[str, list[float]]]
    heads: dict[str, list[list[float]]] = field(default_factory=dict)
    n_prompts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Attribution:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def top_heads(self, k: int = 10) -> list[dict]:
        """Heads with the largest change (post - base) of their safety-signal contribution."""
        if not self.heads:
            return []
        change = torch.tensor(self.heads["change"])
        order = change.abs().flatten().argsort(descending=True)[:k]
        n_heads = change.shape[1]
        return [{"layer": self.layers[int(index) // n_heads], "head": int(index) % n_heads,
                 "change": float(change.flatten()[index])} for index in order]


def _collect(model: LoadedModel, prompts: PromptSet, layers: Sequence[int], positions: tuple[int, ...],
             heads: bool, batch_size: int) -> dict[str, Tensor]:
    names = []
    for layer in layers:
        hooks = _hook_names(layer)
        names += [hooks["resid"], hooks["attn"], hooks["mlp"]] + ([hooks["heads"]] if heads else [])
    with eager_attention(model):
        return collect_activations(model, prompts, names, positions=positions, batch_size=batch_size)


def _supports_heads(model: LoadedModel, layer: int) -> bool:
    return _hook_names(layer)["heads"] in model.bridge.hook_dict and hasattr(model.bridge, "set_use_attn_result")


def component_attribution(pair: ModelPair, harmful: PromptSet, harmless: PromptSet, base_directions: Directions, *,
                          layers: Sequence[int] | None = None, positions: Sequence[int] = (-1,),
                          heads: bool = True, batch_size: int = 16) -> Attribution:
    """Attribute the safety signal and the norm growth of both models to attention, MLP and heads."""
    layers = check_layers(base_directions.layers if layers is None else layers, pair.base.n_layers)
    positions = check_positions(positions)
    heads = heads and all(_supports_heads(model, layers[0]) for model in (pair.base, pair.post))
    safety: dict[str, dict[str, list[float]]] = {}
    norm: dict[str, dict[str, list[float]]] = {}
    head_table: dict[str, list[list[float]]] = {}
    for name, model in (("base", pair.base), ("post", pair.post)):
        if heads:
            model.bridge.set_use_attn_result(True)
        try:
            harmful_acts = _collect(model, harmful, layers, positions, heads, batch_size)
            harmless_acts = _collect(model, harmless, layers, positions, heads, batch_size)
        finally:
            if heads:
                model.bridge.set_use_attn_result(False)
        safety[name] = {"attn": [], "mlp": []}
        norm[name] = {"attn": [], "mlp": [], "previous": []}
        head_rows = []
        for layer in layers:
            hooks = _hook_names(layer)
            unit = base_directions.unit_at(layer) if layer in base_directions.layers else None
            residual = torch.cat([harmful_acts[hooks["resid"]], harmless_acts[hooks["resid"]]])
            residual_unit = residual / residual.norm(dim=-1, keepdim=True)
            for component in ("attn", "mlp"):
                difference = harmful_acts[hooks[component]].mean(dim=(0, 1)) - harmless_acts[hooks[component]].mean(dim=(0, 1))
                safety[name][component].append(float(difference @ unit) if unit is not None else float("nan"))
                written = torch.cat([harmful_acts[hooks[component]], harmless_acts[hooks[component]]])
                norm[name][component].append(float((written * residual_unit).sum(-1).mean()))
            previous = residual - torch.cat([harmful_acts[hooks["attn"]] + harmful_acts[hooks["mlp"]],
                                             harmless_acts[hooks["attn"]] + harmless_acts[hooks["mlp"]]])
            norm[name]["previous"].append(float((previous * residual_unit).sum(-1).mean()))
            if heads and unit is not None:
                per_head = (harmful_acts[hooks["heads"]].mean(dim=(0, 1)) - harmless_acts[hooks["heads"]].mean(dim=(0, 1)))
                head_rows.append((per_head @ unit).tolist())
        if head_rows:
            head_table[name] = head_rows
    for table in (safety, norm):
        table["change"] = {component: [post - base for post, base in zip(table["post"][component], table["base"][component])]
                           for component in table["base"]}
    if head_table:
        head_table["change"] = [[post - base for post, base in zip(post_row, base_row)]
                                for post_row, base_row in zip(head_table["post"], head_table["base"])]
    return Attribution(layers=list(layers), positions=list(positions), safety=safety, norm=norm, heads=head_table,
                       n_prompts={"harmful": len(harmful), "harmless": len(harmless)})
