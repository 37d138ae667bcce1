"""SafeReAct repair: LoRA adapters on chosen layers that realign the post-trained model's
representations of harmful prompts with the base model's, while keeping its new ability.

Alignment loss on harmful train prompts, at the chosen layers and the post-instruction positions:
    L_align = mean || h^{P'}_l(x) / mu^P_l - h^B_l(x) / mu^B_l ||^2
where mu^M_l is model M's mean activation norm at layer l (over the harmful train prompts at those
positions), so amplification by post-training does
not dominate the distance. The `direction` mode aligns only the projection on r̂^B_l. Retain loss
on harmless and capability train prompts, at every token t of the chosen layers:
    L_retain = mean_t || h^{P'}_l(x)_t - h^P_l(x)_t ||^2 / || h^P_l(x)_t ||^2   (+ optional KL of next-token distributions)
The retain distance is relative per token because some tokens (often the first) carry activations
far larger than the rest, which would otherwise dominate the mean.
Total: w_align L_align + w_retain L_retain (+ w_kl KL). Only the LoRA weights train.

Batches are a pure function of (seed, step), and checkpoints hold the LoRA weights and the
optimizer state, so a run resumed from a checkpoint ends with the same adapter as one that was
never interrupted.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from .activations import (check_layers, check_positions, collect_residuals, prefill_shared_prefix, resid_hook_name,
                          rendered_ids)
from .artifacts import atomic_write_text, load_tensors, read_json, save_tensors, write_json
from .directions import Directions
from .errors import ConfigError, RunFolderError
from .models import LoadedModel, load_unwrapped, wrap_model
from .prompts import PromptSet, left_pad, length_sorted_batches, shared_prefix_length, split_shared_prefix
from .training import (FrozenPrefix, LoraSettings, add_lora, count_parameters, frozen_prefix, lora_parameters,
                       pack_sequences, pad_hidden, prefix_cache, save_adapter, shortcut_matches, start_at_layer)

logger = logging.getLogger(__name__)

RepairMode = Literal["activation", "direction"]


@dataclass(frozen=True)
class RepairConfig:
    """Settings of a SafeReAct repair.

    `layers` are the chosen (aligned) layers; LoRA adapters go on `lora_layers`, by default every
    layer from the first to the last chosen one. `positions` are the alignment readout positions
    (default: the post-instruction positions of the chat template).
    """

    layers: tuple[int, ...]
    lora_layers: tuple[int, ...] | None = None
    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] | None = None
    steps: int = 120
    batch_size: int = 8
    learning_rate: float = 2e-3
    align_weight: float = 1.0
    retain_weight: float = 10.0
    kl_weight: float = 0.0
    mode: RepairMode = "activation"
    positions: tuple[int, ...] | None = None
    checkpoint_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("the repair needs at least one chosen layer")
        if self.mode not in ("activation", "direction"):
            raise ConfigError(f"unknown repair mode {self.mode!r}; use activation or direction")
        for name in ("steps", "batch_size", "checkpoint_every", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"repair {name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "align_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"repair {name} must be positive, got {getattr(self, name)}")
        for name in ("retain_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"repair {name} must not be negative, got {getattr(self, name)}")

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        if self.lora_layers:
            return tuple(self.lora_layers)
        return tuple(range(min(self.layers), max(self.layers) + 1))

    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, modules=self.modules, layers=self.adapter_layers)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["adapter_layers"] = list(self.adapter_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RepairConfig:
        known = cls.__dataclass_fields__.keys()
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items() if key in known}
        return cls(**values)


@dataclass
class RepairTargets:
    """What the losses compare against, computed once before training."""

    harmful_ids: list[list[int]]
    retain_ids: list[list[int]]
    base_harmful: Float[Tensor, "prompt layer position d_model"]
    post_retain: list[Float[Tensor, "seq layer d_model"]]
    base_norm: Float[Tensor, "layer"]
    post_norm: Float[Tensor, "layer"]
    units: Float[Tensor, "layer d_model"] | None = None
    # hidden state entering the first adapter layer at every token (None: full passes)
    harmful_hidden: list[Float[Tensor, "seq d_model"]] | None = None
    retain_hidden: list[Float[Tensor, "seq d_model"]] | None = None


@dataclass
class RepairResult:
    """The repaired model (post-trained model + trained LoRA) and its training record."""

    model: LoadedModel
    config: RepairConfig
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0

    @property
    def trainable_parameter_fraction(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch at `step`: consecutive slices of seeded per-epoch permutations."""
    per_epoch = n_items
    start = step * batch_size
    indices = []
    while len(indices) < min(batch_size, n_items):
        epoch, offset = divmod(start + len(indices), per_epoch)
        order = list(range(n_items))
        random.Random(seed * 100003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


def _capture_layers(model: LoadedModel, ids: Tensor, mask: Tensor, layers: Sequence[int], *,
                    need_logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
    """Forward pass with gradients, returning resid_post at `layers` (and logits if asked)."""
    captured: dict[int, Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(activation: Tensor, hook) -> Tensor:
            captured[layer] = activation
            if layer == deepest and not need_logits:
                # Nothing after the deepest chosen layer enters the loss: skip it and the unembedding.
                raise StopAtLayerException(activation)
            return activation
        return hook

    logits = model.bridge.run_with_hooks(
        ids, attention_mask=mask, fwd_hooks=[(resid_hook_name(layer), make_hook(layer)) for layer in layers],
        return_type="logits" if need_logits else None)
    return captured, (logits if need_logits else None)


def _forward(model: LoadedModel, sequences: list[list[int]], layers: Sequence[int], entering: list[Tensor] | None,
             first: int, *, prefix: FrozenPrefix | None = None, need_logits: bool = False
             ) -> tuple[dict[int, Tensor], Tensor | None, Tensor]:
    """Forward pass with gradients over `sequences`, returning the residual stream after `layers`
    ([batch, column, d]), the logits if asked, and the attention mask of those columns.

    Without `entering`, the batch is left-padded and runs from the embeddings. With `entering`
    (each sequence's stored hidden states entering block `first`), the pass starts at that block.
    With `prefix` as well, the tokens that every sequence starts with run once as a batch of one,
    and the columns are the shared prefix, then padding, then each row's own tokens.
    """
    device = model.device
    pad_id = model.tokenizer.pad_token_id
    if entering is None or prefix is None or need_logits:
        ids, mask = left_pad(sequences, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if entering is None:
            captured, logits = _capture_layers(model, ids, mask, layers, need_logits=need_logits)
        else:
            with start_at_layer(model.hf_model, first, pad_hidden(entering, ids.shape[1]).to(device)):
                captured, logits = _capture_layers(model, ids, mask, layers, need_logits=need_logits)
        return captured, logits, mask

    shared = prefix.ids.shape[1]
    # The losses read the real columns from the padded mask, so it is built even though the pass runs packed.
    _, _, mask, _ = split_shared_prefix(sequences, shared, pad_id)
    packed = pack_sequences([sequence[shared:] for sequence in sequences], shared, dtype=model.hf_model.dtype,
                            device=device)
    in_prefix: dict[int, Tensor] = {}
    in_rest: dict[int, Tensor] = {}
    with model.bridge.hooks(fwd_hooks=_capturing(layers, in_prefix)):
        cache = prefix_cache(model.hf_model, prefix, 1)
    rest = packed.concat([values[shared:] for values in entering]).to(device)
    with start_at_layer(model.hf_model, first, rest), model.bridge.hooks(fwd_hooks=_capturing(layers, in_rest)):
        try:
            model.hf_model(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        except StopAtLayerException:
            pass
    captured = {layer: torch.cat([in_prefix[layer].expand(len(sequences), -1, -1), packed.unpack(in_rest[layer])],
                                 dim=1)
                for layer in layers}
    return captured, None, mask.to(device)


def _capturing(layers: Sequence[int], into: dict[int, Tensor]) -> list:
    """Hooks that store the residual stream after each of `layers` in `into` and end the pass after the deepest."""
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(activation: Tensor, hook) -> Tensor:
            into[layer] = activation
            if layer == deepest:
                raise StopAtLayerException(activation)
            return activation
        return hook

    return [(resid_hook_name(layer), make_hook(layer)) for layer in layers]


def _post_passes(post: LoadedModel, sequences: list[list[int]], layers: Sequence[int], first: int,
                 batch_size: int) -> tuple[list[Tensor], list[Tensor] | None]:
    """Run the post-trained model once over each sequence and return its activations at `layers`
    (every token, [seq, layer, d]) and, when `first` > 0, the hidden state entering block `first`.

    Batches are grouped by length, and the prompt prefix that a batch shares runs once."""
    captured_layers = sorted(set(layers) | ({first - 1} if first > 0 else set()))
    activations: list[Tensor | None] = [None] * len(sequences)
    entering: list[Tensor | None] | None = [None] * len(sequences) if first > 0 else None

    with torch.inference_mode():
        for batch in length_sorted_batches([len(sequence) for sequence in sequences], batch_size):
            chunk = [sequences[index] for index in batch]
            in_prefix: dict[int, Tensor] = {}
            in_rest: dict[int, Tensor] = {}
            cache, ids, mask, positions = prefill_shared_prefix(post, chunk, _capturing(captured_layers, in_prefix))
            with post.hooked(_capturing(captured_layers, in_rest)) as network:
                try:
                    network(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                  use_cache=True, logits_to_keep=1)
                except StopAtLayerException:
                    pass
            for row, index in enumerate(batch):
                columns = slice(ids.shape[1] - (len(sequences[index]) - (mask.shape[1] - ids.shape[1])), None)

                def whole(layer: int) -> Tensor:
                    rest = in_rest[layer][row, columns]
                    return torch.cat([in_prefix[layer][0], rest]) if in_prefix else rest

                activations[index] = torch.stack([whole(layer) for layer in layers], dim=1).float().cpu()
                if entering is not None:
                    entering[index] = whole(first - 1).clone()
    return activations, entering


def prepare_targets(base: LoadedModel, post: LoadedModel, harmful: PromptSet, retain: PromptSet,
                    config: RepairConfig, positions: tuple[int, ...], *, system_prompt: str | None = None,
                    base_directions: Directions | None = None, batch_size: int = 16) -> RepairTargets:
    """Compute the loss targets: base activations on harmful prompts, post-trained activations on
    retain prompts, and norms.

    Also stores the post-trained model's hidden states entering the first adapter layer. Training
    starts there, because the blocks below it carry no adapter.
    """
    layers = config.layers
    first = min(config.adapter_layers)
    base_acts = collect_residuals(base, harmful, layers, positions=positions, batch_size=batch_size,
                                  system_prompt=system_prompt)
    harmful_ids = rendered_ids(post, harmful, system_prompt=system_prompt)
    post_harmful, harmful_hidden = _post_passes(post, harmful_ids, layers, first, batch_size)
    readout = torch.tensor(positions)
    post_at_positions = torch.stack([values[readout] for values in post_harmful])  # [prompt, position, layer, d]
    base_norm = base_acts.values.norm(dim=-1).mean(dim=(0, 2))
    post_norm = post_at_positions.norm(dim=-1).mean(dim=(0, 1))

    retain_ids = rendered_ids(post, retain, system_prompt=system_prompt)
    post_retain, retain_hidden = _post_passes(post, retain_ids, layers, first, batch_size)

    units = None
    if config.mode == "direction":
        if base_directions is None:
            raise ConfigError("the direction mode needs the base model's safety directions")
        units = torch.stack([base_directions.unit_at(layer) for layer in layers])
    return RepairTargets(harmful_ids=harmful_ids, retain_ids=retain_ids, base_harmful=base_acts.values,
                         post_retain=post_retain, base_norm=base_norm, post_norm=post_norm, units=units,
                         harmful_hidden=harmful_hidden, retain_hidden=retain_hidden)


def alignment_loss(current: dict[int, Tensor], rows: list[int], width: int, targets: RepairTargets,
                   config: RepairConfig, positions: tuple[int, ...]) -> Tensor:
    """L_align over the batch: normalised squared distance to the base model (or its projection)."""
    losses = []
    columns = torch.tensor([width + position for position in positions])
    for index, layer in enumerate(config.layers):
        mine = current[layer][:, columns].float() / targets.post_norm[index]
        goal = targets.base_harmful[rows, index].to(mine.device) / targets.base_norm[index]
        if config.mode == "direction":
            unit = targets.units[index].to(mine.device)
            losses.append(((mine @ unit - goal @ unit) ** 2).mean())
        else:
            losses.append(((mine - goal) ** 2).sum(-1).mean())
    return torch.stack(losses).mean()


def retain_loss(current: dict[int, Tensor], rows: list[int], mask: Tensor, targets: RepairTargets,
                config: RepairConfig) -> Tensor:
    """L_retain over the batch: squared distance to the post-trained model relative to its norm, every
    real token (the columns that `mask` marks, in sequence order)."""
    total, count = 0.0, 0
    for row, index in enumerate(rows):
        real = mask[row].bool()
        goal = targets.post_retain[index]
        for layer_index, layer in enumerate(config.layers):
            mine = current[layer][row, real].float()
            target = goal[:, layer_index].to(mine.device)
            relative = ((mine - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-12)
            total = total + relative.sum()
            count += relative.shape[0]
    return total / max(count, 1)


def _checkpoint_dir(output: Path) -> Path:
    return output / "checkpoint"


def save_checkpoint(output: Path, step: int, parameters: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, config: RepairConfig) -> None:
    """Write LoRA weights, optimizer state and the step; state.json, written last, marks it complete."""
    folder = _checkpoint_dir(output)
    save_tensors(folder / "lora.safetensors", {name: parameter.detach() for name, parameter in parameters.items()})
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    save_tensors(folder / "optimizer.safetensors", tensors)
    write_json(folder / "state.json", {"step": step, "config": config.to_dict(),
                                       "param_groups": state["param_groups"]})


def load_checkpoint(output: Path, parameters: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    config: RepairConfig) -> int:
    """Restore a checkpoint into the parameters and optimizer; return the next step (0 if none)."""
    folder = _checkpoint_dir(output)
    if not (folder / "state.json").is_file():
        return 0
    state = read_json(folder / "state.json")
    if state["config"] != config.to_dict():
        raise RunFolderError(
            f"the checkpoint in {folder} was written with other repair settings; delete {folder} (or pass "
            "--restart) to start over with the new settings")
    weights = load_tensors(folder / "lora.safetensors")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(weights[name])
    tensors = load_tensors(folder / "optimizer.safetensors")
    optimizer_state = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    return int(state["step"])


def repair(
    base: LoadedModel,
    post_spec: str,
    harmful: PromptSet,
    retain: PromptSet,
    config: RepairConfig,
    *,
    output: str | Path,
    post: LoadedModel | None = None,
    post_adapter: str | None = None,
    base_directions: Directions | None = None,
    system_prompt: str | None = None,
    load_options: dict | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    stop_after: int | None = None,
) -> RepairResult:
    """Train SafeReAct LoRA adapters on the post-trained model and save them to `output/adapter`.

    The post-trained model is loaded anew from `post_spec` (with `post_adapter` merged) so LoRA can
    be injected before the bridge wraps it; `post`, if given, is the already loaded post-trained
    model used for the retain targets. Checkpoints go to `output/checkpoint` every
    `config.checkpoint_every` steps and a run resumes from the latest one; `output/log.jsonl`
    records both losses per step. `stop_after` ends training after that many steps in this call
    (used to test interruption).
    """
    output = Path(output)
    load_options = load_options or {}
    layers = check_layers(config.layers, base.n_layers)
    if tuple(layers) != tuple(config.layers):
        config = RepairConfig(**{**asdict(config), "layers": layers})
    check_layers(config.adapter_layers, base.n_layers)
    from .prompts import post_instruction_positions

    positions = check_positions(config.positions or post_instruction_positions(base.tokenizer, system_prompt))
    if len(harmful) < 1 or len(retain) < 1:
        raise ConfigError("the repair needs harmful prompts for alignment and retain prompts")

    hf_model, tokenizer = load_unwrapped(post_spec, adapter=post_adapter, **load_options)
    peft_model = add_lora(hf_model, config.lora(), seed=config.seed)
    parameters = lora_parameters(peft_model)
    trainable, total = count_parameters(peft_model, parameters)
    model = wrap_model(peft_model.base_model.model, tokenizer, name="repaired", spec=post_spec)
    reference = post or wrap_model(*load_unwrapped(post_spec, adapter=post_adapter, **load_options),
                                   name="post", spec=post_spec)
    targets = prepare_targets(base, reference, harmful, retain, config, positions, system_prompt=system_prompt,
                              base_directions=base_directions)

    optimizer = torch.optim.AdamW(list(parameters.values()), lr=config.learning_rate, weight_decay=0.0)
    output.mkdir(parents=True, exist_ok=True)
    start_step = load_checkpoint(output, parameters, optimizer, config)
    log_path = output / "log.jsonl"
    log = []
    if start_step and log_path.is_file():
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        log = [entry for entry in log if entry["step"] < start_step]
    atomic_write_text(log_path, "".join(json.dumps(entry) + "\n" for entry in log))

    need_logits = config.kl_weight > 0
    pad_id = tokenizer.pad_token_id
    first = min(config.adapter_layers)
    shortcut = targets.harmful_hidden is not None
    # Readout positions stay out of the shared prefix; the KL term needs logits at every column.
    shared = 0 if need_logits else shared_prefix_length(targets.harmful_ids + targets.retain_ids,
                                                        keep=max(1, -min(positions)))
    prefix = frozen_prefix(model.hf_model, targets.harmful_ids[0][:shared], first) if shared and shortcut else None
    logger.debug("training from block %d; %d prompt tokens shared by every sequence", first, shared)
    device = model.device
    started = time.perf_counter()
    model.hf_model.train()
    with log_path.open("a", encoding="utf-8") as log_file:
        for step in range(start_step, config.steps):
            if stop_after is not None and step >= start_step + stop_after:
                break
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * (1.0 - step / config.steps)

            rows = batch_indices(len(targets.harmful_ids), config.batch_size, step, config.seed)
            retain_rows = batch_indices(len(targets.retain_ids), config.batch_size, step, config.seed + 1)
            harmful_batch = [targets.harmful_ids[index] for index in rows]
            retain_batch = [targets.retain_ids[index] for index in retain_rows]

            def passes(short: bool):
                """(harmful, retain) results; on the shortcut both batches share one pass."""
                if not short:
                    return (_forward(model, harmful_batch, layers, None, first),
                            _forward(model, retain_batch, layers, None, first, need_logits=need_logits))
                entering = ([targets.harmful_hidden[index] for index in rows]
                            + [targets.retain_hidden[index] for index in retain_rows])
                if need_logits:
                    return (_forward(model, harmful_batch, layers, entering[:len(rows)], first),
                            _forward(model, retain_batch, layers, entering[len(rows):], first, need_logits=True))
                captured, _, mask = _forward(model, harmful_batch + retain_batch, layers, entering, first,
                                             prefix=prefix)
                split = len(rows)
                return (({layer: values[:split] for layer, values in captured.items()}, None, mask[:split]),
                        ({layer: values[split:] for layer, values in captured.items()}, None, mask[split:]))

            def real_tokens(results):
                return [result[0][layer][result[2].bool()] for result in results for layer in layers]

            if step == start_step and shortcut and not shortcut_matches(passes, real_tokens):
                logger.info("starting at block %d with a shared prefix does not reproduce the full pass of this "
                            "model; training with full passes", first)
                shortcut = False
            (current, _, mask), (retained, logits, retain_mask) = passes(shortcut)
            align = alignment_loss(current, rows, current[layers[0]].shape[1], targets, config, positions)
            keep = retain_loss(retained, retain_rows, retain_mask, targets, config)
            loss = config.align_weight * align + config.retain_weight * keep
            kl_value = 0.0
            if need_logits:
                ids, _ = left_pad(retain_batch, pad_id)
                with torch.no_grad(), peft_model.disable_adapter():
                    reference_logits = model.bridge(ids.to(device), attention_mask=retain_mask)
                real = retain_mask.bool()
                reference_log_probs = torch.log_softmax(reference_logits.float()[real], dim=-1)
                kl = (reference_log_probs.exp() * (reference_log_probs - torch.log_softmax(logits.float()[real], -1))).sum(-1).mean()
                loss = loss + config.kl_weight * kl
                kl_value = float(kl.detach())

            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            entry = {"step": step, "align_loss": float(align.detach()), "retain_loss": float(keep.detach()), "kl": kl_value,
                     "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                     "seconds": round(time.perf_counter() - started, 2)}
            log.append(entry)
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            if on_step is not None:
                on_step(step, entry)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save_checkpoint(output, step + 1, parameters, optimizer, config)
    model.hf_model.eval()

    seconds = time.perf_counter() - started
    finished = bool(log) and log[-1]["step"] + 1 == config.steps
    if finished:
        save_adapter(peft_model, output / "adapter", parameters)
        write_json(output / "config.json", {"repair": config.to_dict(), "post_model": post_spec,
                                            "post_adapter": post_adapter, "base_model": base.spec,
                                            "positions": list(positions), "trainable_parameters": trainable,
                                            "total_parameters": total})
    return RepairResult(model=model, config=config, log=log, seconds=seconds, trainable_parameters=trainable,
                        total_parameters=total)
