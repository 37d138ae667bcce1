"""LoRA plumbing shared by the repair, the refusal-LoRA baseline and the organism build.

peft injects LoRA layers into the HF model *before* a TransformerBridge wraps it (peft cannot
wrap the bridge's module wrappers). Because the bridge then renames the HF submodules, adapters
are saved under the parameter names recorded before wrapping, in peft's own file layout, so that
`PeftModel.from_pretrained` loads them unchanged.
"""

from __future__ import annotations

import logging
import random
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformer_lens.model_bridge.exceptions import StopAtLayerException
from transformers import DynamicCache, PreTrainedModel

from .artifacts import atomic_write_text, save_tensors
from .errors import ConfigError
from .prompts import encode, left_pad, length_sorted_batches, render_chat, shared_prefix_length, split_shared_prefix

logger = logging.getLogger(__name__)

# Projection names of the attention and MLP blocks in common architectures.
KNOWN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h",
                     "dense_4h_to_h", "fc1", "fc2", "out_proj", "qkv_proj", "gate_up_proj", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scaling, target module names and the layers that receive adapters."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modules"] = list(self.modules) if self.modules else None
        data["layers"] = list(self.layers) if self.layers else None
        return data


def lora_target_modules(hf_model: PreTrainedModel, requested: Sequence[str] | None = None) -> tuple[str, ...]:
    """The projection names that LoRA wraps: `requested`, or every known projection found.

    Raises `ConfigError` when the architecture has none of them (nothing LoRA can adapt).
    """
    linear_names = {name.rsplit(".", 1)[-1] for name, module in hf_model.named_modules()
                    if type(module).__name__ in ("Linear", "Conv1D")}
    if requested:
        missing = [name for name in requested if name not in linear_names]
        if missing:
            raise ConfigError(
                f"LoRA target modules {missing} are not linear layers of {type(hf_model).__name__}; "
                f"its linear layers are {sorted(linear_names)}")
        return tuple(requested)
    found = tuple(name for name in KNOWN_PROJECTIONS if name in linear_names)
    if not found:
        raise ConfigError(
            f"architecture {type(hf_model).__name__} has no attention or MLP projection that LoRA can "
            f"adapt (linear layers: {sorted(linear_names) or 'none'}); pass module names explicitly")
    return found


def add_lora(hf_model: PreTrainedModel, settings: LoraSettings, *, seed: int = 0):
    """Inject LoRA layers (peft) into `hf_model` and return the peft model; only LoRA weights train."""
    modules = lora_target_modules(hf_model, settings.modules)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(modules), layers_to_transform=list(settings.layers) if settings.layers else None,
        bias="none", task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(hf_model, config)


def lora_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """Trainable LoRA parameters by their peft name (recorded before any bridge renames them)."""
    return {name: parameter for name, parameter in peft_model.named_parameters() if parameter.requires_grad}


def adapter_key(name: str, adapter_name: str = "default") -> str:
    """peft's saved key for a parameter name: the adapter name is dropped from it."""
    return name.replace(f".{adapter_name}.", ".")


def save_adapter(peft_model, folder: str | Path, parameters: dict[str, torch.nn.Parameter], *,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` as peft's `save_pretrained` does.

    `parameters` maps peft names to the LoRA parameters (see `lora_parameters`); `dtype` optionally
    casts the saved weights (float16 halves the file).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {adapter_key(name): parameter.detach().to(dtype or parameter.dtype)
               for name, parameter in parameters.items()}
    save_tensors(folder / "adapter_model.safetensors", tensors)
    config = peft_model.peft_config["default"]
    config_dict = config.to_dict()
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    import json

    atomic_write_text(folder / "adapter_config.json", json.dumps(config_dict, indent=2, default=str))
    return folder


def count_parameters(model: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> tuple[int, int]:
    """(trainable, total) parameter counts; total excludes the LoRA weights themselves."""
    trainable = sum(parameter.numel() for parameter in parameters.values())
    total = sum(parameter.numel() for parameter in model.parameters())
    return trainable, total - trainable


# ---- frozen bottom layers ---------------------------------------------------------------------
#
# LoRA on layers first..last leaves every layer below `first` frozen and adapter-free, so for a
# fixed training sequence its hidden state entering layer `first` never changes. Training computes
# it once per sequence and then starts each forward pass at layer `first`: the embedding's output is
# replaced by the stored hidden state and the layers below pass it through. A model for which this
# shortcut does not reproduce the full pass (an architecture that rescales the embedding inside its
# forward, say) is detected on the first batch and trained with full passes instead.

class _StopForward(Exception):
    pass


def _original(module: torch.nn.Module) -> torch.nn.Module:
    """Return the HF module under any TransformerBridge wrappers."""
    while module._modules.get("_original_component") is not None:
        module = module._modules["_original_component"]
    return module


_found_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_layers(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    """Find the transformer blocks of a HF causal LM (under peft and bridge wrappers), in order.

    The search walks every module, and training calls this every step, so the result is cached per model.
    """
    found = _found_layers.get(hf_model)
    if found is None:
        found = _found_layers[hf_model] = _search_decoder_layers(hf_model)
    return found


def _search_decoder_layers(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    config = getattr(hf_model, "config", None)
    count = getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", None)
    lists = [module for module in hf_model.modules()
             if isinstance(module, torch.nn.ModuleList) and (count is None or len(module) == count)]
    if not lists:
        raise ConfigError(f"cannot find the transformer blocks of {type(hf_model).__name__}: no module list "
                          "has one entry per layer; LoRA training needs a standard HF decoder model")
    return [_original(layer) for layer in max(lists, key=len)]


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def hidden_entering(hf_model: torch.nn.Module, sequences: Sequence[Sequence[int]], layer: int, *,
                    pad_id: int, batch_size: int = 16, left: bool = True) -> list[torch.Tensor]:
    """Compute the hidden state entering block `layer` at every token of each sequence.

    The passes stop after block `layer - 1`. Batches are grouped by length and padded on the side
    that training pads (`left`); with left padding the prompt prefix that a batch shares runs once.
    Each result comes back without its padding, in the order of `sequences`.
    """
    blocks = decoder_layers(hf_model)
    captured: list[torch.Tensor] = []

    def stop(module, args, output):
        captured.append(_layer_output(output))
        raise _StopForward

    def run(**inputs) -> torch.Tensor:
        try:
            hf_model(**inputs)
        except _StopForward:
            pass
        return captured.pop().detach()

    device = next(hf_model.parameters()).device
    handle = blocks[layer - 1].register_forward_hook(stop)
    results: list[torch.Tensor | None] = [None] * len(sequences)
    try:
        for batch in length_sorted_batches([len(sequence) for sequence in sequences], batch_size):
            chunk = [list(sequences[index]) for index in batch]
            if not left:
                ids, mask, _ = collate_right_padded([(sequence, sequence) for sequence in chunk], pad_id)
                hidden = run(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                for row, index in enumerate(batch):
                    results[index] = hidden[row, :len(chunk[row])].clone()
                continue
            shared = shared_prefix_length(chunk)
            prefix, ids, mask, positions = (tensor.to(device) for tensor in split_shared_prefix(chunk, shared, pad_id))
            cache = None
            if shared:
                cache = DynamicCache()
                prefix_hidden = run(input_ids=prefix, position_ids=positions.new_tensor(range(shared))[None],
                                    past_key_values=cache, use_cache=True)[0]
                cache.batch_repeat_interleave(len(chunk))
            hidden = run(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=cache is not None)
            for row, index in enumerate(batch):
                rest = hidden[row, ids.shape[1] - (len(chunk[row]) - shared):]
                results[index] = torch.cat([prefix_hidden, rest]) if shared else rest.clone()
    finally:
        handle.remove()
    return results


def pad_hidden(hidden: Sequence[torch.Tensor], width: int, left: bool = True) -> torch.Tensor:
    """Stack per-sequence hidden states into a [batch, width, d] tensor padded like the token ids."""
    batch = torch.zeros(len(hidden), width, hidden[0].shape[-1], dtype=hidden[0].dtype, device=hidden[0].device)
    for row, values in enumerate(hidden):
        columns = slice(width - len(values), width) if left else slice(0, len(values))
        batch[row, columns] = values
    return batch


@contextmanager
def start_at_layer(hf_model: torch.nn.Module, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Make forward passes of `hf_model` inside the block start at block `layer` with `hidden`
    [batch, width, d] as its input. The hook replaces the embedding output, and the blocks below
    pass it through unchanged."""
    blocks = decoder_layers(hf_model)
    embedding = _original(hf_model.get_input_embeddings())

    def replace(module, args, output):
        if output.shape[:2] != hidden.shape[:2]:
            raise ConfigError(f"stored hidden states {tuple(hidden.shape)} do not fit the batch {tuple(output.shape)}")
        return hidden.to(output.dtype)

    def passthrough(*args, **kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    # A block may already carry its own instance-level forward (accelerate's device hooks set one),
    # so that one is put back afterwards rather than deleted.
    previous = [block.__dict__.get("forward") for block in blocks[:layer]]
    handle = embedding.register_forward_hook(replace)
    for block in blocks[:layer]:
        block.forward = passthrough
    try:
        yield
    finally:
        handle.remove()
        for block, forward in zip(blocks[:layer], previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


# ---- supervised fine-tuning on (prompt, response) pairs ----------------------------------------

@dataclass(frozen=True)
class SFTExample:
    """A user prompt and the response the model should learn to give."""

    prompt: str
    response: str
    ends: bool = True  # append EOS: False for responses cut off mid-answer


@dataclass
class SFTResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def tokenize_examples(tokenizer, examples: Sequence[SFTExample], *, system_prompt: str | None = None,
                      max_length: int = 256) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 on the prompt) of each example, response ending with EOS."""
    rendered = render_chat(tokenizer, [example.prompt for example in examples], system_prompt=system_prompt)
    prompts = encode(tokenizer, rendered)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    items = []
    for prompt_ids, example in zip(prompts, examples):
        response_ids = tokenizer(example.response, add_special_tokens=False).input_ids
        if example.ends:
            response_ids = response_ids + eos
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        items.append((ids, labels))
    return items


def collate_right_padded(items: Sequence[tuple[list[int], list[int]]], pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) pairs into input_ids, attention_mask and labels tensors."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, item_labels) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(item_labels)] = torch.tensor(item_labels)
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def left_pad_labels(labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Left-pad label lists with -100 (ignored by the loss), aligned with `left_pad`'s ids."""
    width = max(len(row) for row in labels)
    padded = torch.full((len(labels), width), -100, dtype=torch.long)
    for index, row in enumerate(labels):
        if len(row):
            padded[index, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
    return padded


def logits_needed(labels: torch.Tensor) -> int:
    """Count the final columns of a left-padded batch that need logits, from the column before the
    first labelled token of any row to the end."""
    labelled = labels != -100
    width = labels.shape[1]
    first = torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), torch.full_like(labels[:, 0], width))
    return max(2, min(width, width - int(first.min()) + 1))


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, where `logits` belong to the last
    `logits.shape[1]` columns of the left-padded `labels`."""
    kept = logits.shape[1]
    targets = labels[:, labels.shape[1] - kept + 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)


@dataclass(frozen=True)
class PackedBatch:
    """Several sequences' tokens after a shared prefix, laid end to end in one row without padding.

    `mask` lets each token attend to the prefix and to the earlier tokens of its own sequence only,
    and `positions` count from the end of the prefix in every sequence, so each sequence computes
    what it would alone. Training steps use it because padding to the longest sequence of a batch
    costs as much compute as real tokens."""

    ids: torch.Tensor  # [1, total]
    positions: torch.Tensor  # [1, total]
    mask: torch.Tensor  # [1, 1, total, prefix + total], 0 where attended and the dtype's minimum elsewhere
    lengths: tuple[int, ...]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Split a packed [1, total, ...] tensor into its sequences, left-padded with zeros to
        [batch, max length, ...]."""
        width = max(self.lengths)
        rows = []
        for values in packed[0].split(list(self.lengths)):
            padding = [0, 0] * (values.dim() - 1) + [width - len(values), 0]
            rows.append(torch.nn.functional.pad(values, padding))
        return torch.stack(rows)

    def concat(self, per_sequence: Sequence[torch.Tensor]) -> torch.Tensor:
        """Lay per-sequence tensors ([length, ...] each, in batch order) end to end as [1, total, ...]."""
        return torch.cat(list(per_sequence))[None]


def pack_sequences(rests: Sequence[Sequence[int]], shared: int, *, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> PackedBatch:
    """Pack the token lists `rests` (each sequence without its first `shared` tokens) into one row."""
    lengths = tuple(len(rest) for rest in rests)
    if not lengths or min(lengths) < 1:
        raise ConfigError("every packed sequence needs at least one token after the shared prefix")
    ids = torch.tensor([[token for rest in rests for token in rest]], dtype=torch.long, device=device)
    within = torch.cat([torch.arange(length) for length in lengths])
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    visible = (segment[:, None] == segment[None, :]) & (within[:, None] >= within[None, :])
    visible = torch.cat([torch.ones(len(within), shared, dtype=torch.bool), visible], dim=1)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return PackedBatch(ids=ids, positions=(within + shared)[None].to(device), mask=mask[None, None].to(device),
                       lengths=lengths)


@dataclass
class FrozenPrefix:
    """A token prefix that every training sequence shares, with what the frozen blocks below
    `first` make of it: their keys and values, and the hidden state entering block `first`."""

    ids: torch.Tensor  # [1, prefix]
    first: int
    lower: list[tuple[torch.Tensor, torch.Tensor]]
    entering: torch.Tensor | None  # [1, prefix, d]


@torch.no_grad()
def frozen_prefix(network: torch.nn.Module, ids: Sequence[int], first: int) -> FrozenPrefix:
    """Run `ids` through the blocks below `first` once; training steps then start the prefix at `first`."""
    device = next(network.parameters()).device
    prefix = torch.tensor([list(ids)], dtype=torch.long, device=device)
    if first == 0:
        return FrozenPrefix(prefix, 0, [], None)
    captured: list[torch.Tensor] = []

    def stop(module, args, output):
        captured.append(_layer_output(output))
        raise _StopForward

    cache = DynamicCache()
    handle = decoder_layers(network)[first - 1].register_forward_hook(stop)
    try:
        network(input_ids=prefix, position_ids=torch.arange(prefix.shape[1], device=device)[None],
                past_key_values=cache, use_cache=True)
    except _StopForward:
        pass
    finally:
        handle.remove()
    lower = [(cache.layers[index].keys, cache.layers[index].values) for index in range(first)]
    return FrozenPrefix(prefix, first, lower, captured[0].detach())


def prefix_cache(network: torch.nn.Module, prefix: torch.Tensor | FrozenPrefix, rows: int) -> DynamicCache:
    """Run a token prefix that every row shares once, as a batch of one (with gradients when
    training), and return its key/value cache repeated for `rows` rows.

    With a `FrozenPrefix` the pass starts at its first block. The stored keys and values of the
    blocks below go into the cache after the pass, because before it they would make the model
    count the prefix as already seen."""
    frozen = prefix if isinstance(prefix, FrozenPrefix) else None
    ids = frozen.ids if frozen is not None else prefix
    cache = DynamicCache()
    context = nullcontext()
    if frozen is not None and frozen.first > 0:
        context = start_at_layer(network, frozen.first, frozen.entering)
    with context:
        try:
            network(input_ids=ids, attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(ids.shape[1], device=ids.device)[None], past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        except StopAtLayerException:
            pass  # a hook ended the pass after the deepest layer that the caller reads
    for index, (keys, values) in enumerate(frozen.lower if frozen is not None else []):
        cache.update(keys, values, index)
    cache.batch_repeat_interleave(rows)
    return cache


def train_sft(peft_model, tokenizer, examples: Sequence[SFTExample], *, steps: int, batch_size: int = 8,
              learning_rate: float = 5e-4, seed: int = 0, system_prompt: str | None = None,
              on_step: Callable[[int, float], None] | None = None, frozen_below: int = 0) -> SFTResult:
    """Fine-tune the LoRA weights with cross-entropy on the response tokens.

    Batches are drawn by a seeded shuffle that cycles through the examples; the learning rate
    decays linearly to zero over `steps`. Each step packs its examples into one row without padding
    (see `PackedBatch`), runs the chat template's prefix, which every example shares, once, and
    computes logits only where responses are. `frozen_below` > 0 means
    that the blocks below it carry no adapter: their output is computed once per example and each
    step starts there (see `start_at_layer`). The first step checks these shortcuts against a
    plain forward pass and drops them if the loss differs.
    """
    import time

    if steps < 1:
        raise ConfigError(f"training steps must be at least 1, got {steps}")
    if not examples:
        raise ConfigError("no training examples given")
    items = tokenize_examples(tokenizer, examples, system_prompt=system_prompt)
    sequences = [ids for ids, _ in items]
    prompt_lengths = [next((column for column, label in enumerate(labels) if label != -100), len(labels))
                      for _, labels in items]
    # The shared prefix ends before the first response token of every example.
    shared = max(0, min(shared_prefix_length(sequences), min(prompt_lengths) - 1))
    pad_id = tokenizer.pad_token_id
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    rng = random.Random(seed)
    order: list[int] = []
    result = SFTResult()
    device = next(peft_model.parameters()).device
    start = time.perf_counter()
    hidden = None
    if frozen_below > 0:
        try:
            hidden = hidden_entering(peft_model, sequences, frozen_below, pad_id=pad_id, left=True)
        except ConfigError as error:
            logger.info("training with full passes: %s", error)
    prefix = None
    if shared:
        prefix = frozen_prefix(peft_model, sequences[0][:shared], frozen_below if hidden is not None else 0)
    shortcut = True
    dtype = peft_model.get_input_embeddings().weight.dtype
    peft_model.train()
    for step in range(steps):
        if len(order) < batch_size:
            shuffled = list(range(len(items)))
            rng.shuffle(shuffled)
            order.extend(shuffled)
        rows = order[:batch_size]
        del order[:batch_size]

        def forward(short: bool) -> torch.Tensor:
            if not short:
                ids, mask = left_pad([sequences[index] for index in rows], pad_id)
                labels = left_pad_labels([items[index][1] for index in rows]).to(device)
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = peft_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), logits_to_keep=logits_needed(labels)).logits
                return response_loss(logits, labels)
            packed = pack_sequences([sequences[index][shared:] for index in rows], shared, dtype=dtype, device=device)
            # Token t of a sequence predicts its token t + 1, so the last one of each predicts nothing.
            targets = torch.cat([torch.tensor(items[index][1][shared + 1:] + [-100]) for index in rows]).to(device)
            scored = (targets != -100).nonzero().squeeze(-1)
            cache = prefix_cache(peft_model, prefix, 1) if prefix is not None else None
            context = nullcontext()
            if hidden is not None:
                context = start_at_layer(peft_model, frozen_below,
                                         packed.concat([hidden[index][shared:] for index in rows]).to(device))
            with context:
                logits = peft_model(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                                    past_key_values=cache, use_cache=cache is not None, logits_to_keep=scored).logits
            return torch.nn.functional.cross_entropy(logits[0].float(), targets[scored])

        if step == 0 and not shortcut_matches(forward, lambda value: value):
            logger.info("the packed batch, the shared prefix or the start at block %d does not reproduce the full "
                        "pass of this model; training with full passes", frozen_below)
            shortcut = False
        loss = forward(shortcut)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, result.losses[-1])
    peft_model.eval()
    result.seconds = time.perf_counter() - start
    return result


def same_up_to_rounding(expected: torch.Tensor, actual: torch.Tensor, tolerance: float = 1e-4) -> bool:
    """Check that two tensors agree to `tolerance` relative to the norm of each vector (last dimension).

    Residual streams hold a few tokens whose activations are thousands of times larger than the rest,
    so elementwise tolerances either fail on rounding next to them or miss real differences elsewhere.
    Scalars and 1-d tensors are compared relative to their largest magnitude (at least 1).
    """
    expected, actual = expected.float(), actual.float()
    if expected.shape != actual.shape:
        return False
    if expected.numel() == 0:
        return True
    if expected.dim() < 2:
        return bool((expected - actual).abs().max() <= tolerance * expected.abs().max().clamp_min(1.0))
    difference = (expected - actual).norm(dim=-1)
    return bool((difference <= tolerance * expected.norm(dim=-1).clamp_min(1e-6)).all())


def shortcut_matches(forward: Callable[[bool], object], values: Callable[[object], object], tolerance: float = 1e-4) -> bool:
    """Check that `forward(True)` (the shortcut) gives the values of `forward(False)` (the full pass)."""
    with torch.no_grad():
        try:
            full, shortcut = values(forward(False)), values(forward(True))
        except Exception as error:  # blocks of some architectures cannot be passed through, so no shortcut
            logger.debug("the shortcut pass failed: %s", error)
            return False
    pairs = zip(full, shortcut) if isinstance(full, (list, tuple)) else [(full, shortcut)]
    return all(same_up_to_rounding(expected, actual, tolerance) for expected, actual in pairs)
