"""Load models as a Hugging Face model plus a TransformerLens `TransformerBridge`, and check pairs.

A model comes from a hub id, a local folder, a GGUF file or the bundled model organism
(`organism:base`, `organism:post`). The HF model does the computation; the bridge wraps its
modules in place and gives them TransformerLens hook names (`blocks.{l}.hook_resid_post`). So
generation through the HF model and hooks through the bridge act on the same weights.

Booting the bridge renames the HF model's submodules, so `LoadedModel` records the original
parameter names first; exports and LoRA adapters are written under those names.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .artifacts import atomic_write_text, save_tensors
from .errors import ModelLoadError, PairMismatchError

logger = logging.getLogger(__name__)

ORGANISM_PREFIX = "organism:"
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Source of a model's weights: its kind and location."""

    kind: Literal["hub", "local", "gguf", "organism"]
    location: str
    gguf_file: str | None = None


@dataclass(eq=False)
class LoadedModel:
    """A causal LM ready for analysis: HF model, tokenizer and TransformerBridge on one set of weights."""

    name: str
    spec: str
    hf_model: PreTrainedModel
    tokenizer: Any
    bridge: Any
    parameter_names: dict[int, str] = field(repr=False, default_factory=dict)
    adapter: str | None = None

    _plain: Any = field(default=None, repr=False, init=False)

    @property
    def plain_model(self) -> PreTrainedModel:
        """The HF module tree without the bridge's wrappers, sharing every parameter with `hf_model`.

        Generation and scoring without hooks run through it, skipping the wrappers' per-module
        overhead. It falls back to `hf_model` when the unwrapped tree does not reproduce its logits.
        """
        if self._plain is None:
            self._plain = _plain_view(self.hf_model, self.tokenizer)
        return self._plain

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @contextmanager
    def hooked(self, hooks: list | tuple = ()) -> Iterator[torch.nn.Module]:
        """Yield the module to call with TransformerLens-named `hooks` ((name, function) pairs) active.

        Hooks on the residual stream after a block (`blocks.{l}.hook_resid_post`) run as PyTorch
        forward hooks on `plain_model`, which skips the bridge's per-module wrappers. Any other hook
        name runs through the bridge on `hf_model`. The functions get the activation and an object
        with the hook's `name`.
        """
        if not hooks:
            yield self.plain_model
            return
        layers = [_RESID_POST.fullmatch(name) for name, _ in hooks]
        plain = self.plain_model
        if plain is self.hf_model or not all(layers):
            with self.bridge.hooks(fwd_hooks=list(hooks)):
                yield self.hf_model
            return
        from .training import decoder_layers

        blocks = decoder_layers(plain)
        handles = []
        for (name, function), match in zip(hooks, layers):
            def forward_hook(module, args, output, function=function, point=_HookName(name)):
                if isinstance(output, tuple):
                    return (function(output[0], point),) + tuple(output[1:])
                return function(output, point)
            handles.append(blocks[int(match.group(1))].register_forward_hook(forward_hook))
        try:
            yield plain
        finally:
            for handle in handles:
                handle.remove()

    def clean_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the weights under the parameter names they had before the bridge wrapped them."""
        params = {}
        for parameter in self.hf_model.parameters():
            name = self.parameter_names.get(id(parameter))
            if name is not None:
                params[name] = parameter.detach()
        return params

    def export(self, folder: str | Path) -> Path:
        """Save the weights (safetensors), config and tokenizer so `from_pretrained` reloads them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.clean_state_dict()
        tied = getattr(self.hf_model.config, "tie_word_embeddings", False)
        if tied and "lm_head.weight" in state:
            del state["lm_head.weight"]
        save_tensors(folder / "model.safetensors", state)
        config = self.hf_model.config.to_dict()
        config.pop("quantization_config", None)
        atomic_write_text(folder / "config.json", json.dumps(config, indent=2, default=str))
        self.tokenizer.save_pretrained(str(folder))
        return folder


_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")


@dataclass(frozen=True)
class _HookName:
    """The `hook` argument of a hook function that runs as a PyTorch forward hook."""

    name: str


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Shallow copy of a module tree in which each bridge wrapper is replaced by the module it wraps."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    while isinstance(module, GeneralizedComponent) and module._modules.get("_original_component") is not None:
        module = module._modules["_original_component"]
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else _unwrap(child) for name, child in module._modules.items()}
    return clone


@torch.inference_mode()
def _plain_view(hf_model: PreTrainedModel, tokenizer: Any) -> PreTrainedModel:
    plain = _unwrap(hf_model).eval()
    probe = tokenizer("A short probe sentence.", return_tensors="pt").input_ids.to(next(hf_model.parameters()).device)
    if not torch.allclose(plain(probe).logits.float(), hf_model(probe).logits.float(), atol=1e-4, rtol=1e-4):
        logger.warning("the unwrapped model does not reproduce the bridge's logits; generating through the bridge")
        return hf_model
    return plain


@dataclass(eq=False)
class ModelPair:
    """A base model and the post-trained model made from it."""

    base: LoadedModel
    post: LoadedModel


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: DTypeName | torch.dtype, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; `auto` is float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return _DTYPES[dtype]


def resolve_source(spec: str) -> ModelSource:
    """Decide whether `spec` names the organism, a GGUF file, a local folder or a hub id."""
    if spec.startswith(ORGANISM_PREFIX):
        return ModelSource("organism", spec[len(ORGANISM_PREFIX):])
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} not found; check the path")
        return ModelSource("gguf", str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {spec} has no config.json; pass a folder written by "
                "save_pretrained, a .gguf file, or a hub id"
            )
        return ModelSource("local", str(path))
    # A hub id is `name` or `owner/name`; anything with more slashes or a path prefix is a path.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if path.exists() or looks_like_path or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"model path {spec} not found; pass an existing folder, a .gguf file, a hub id "
            "such as HuggingFaceTB/SmolLM2-135M-Instruct, or organism:base / organism:post"
        )
    return ModelSource("hub", spec)


def layer_count(spec: str, *, trust_remote_code: bool = False) -> int | None:
    """Read the number of transformer layers of the model `spec` from its config, without loading
    weights. Returns None for a hub id (reading it would need the network) or a config without the field."""
    from transformers import AutoConfig

    source = resolve_source(spec)
    if source.kind == "hub":
        return None
    if source.kind == "organism":
        from .organism import gguf_path

        path = gguf_path()
        source = ModelSource("gguf", str(path.parent), gguf_file=path.name)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        if importlib.util.find_spec("gguf") is None:
            return None
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not read the config of model {spec}: {error}") from error
    config = getattr(config, "text_config", None) or config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return int(count) if count else None


def _clear_gguf_quantization(model: PreTrainedModel) -> None:
    """Drop the GGUF quantizer marker: transformers dequantizes GGUF weights to full precision on
    load, but keeps the marker, which makes `save_pretrained` and peft treat the model as quantized."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Let one load of a GGUF file parse its header and build gguf's tensor-name table only once.

    transformers reads a GGUF file three times (config, tokenizer, weights), each time with a new
    `gguf.GGUFReader` that walks every metadata field in Python (the tokenizer's vocabulary makes
    that seconds per read), and builds gguf's name table anew for every submodule. Inside this
    context both are memoised; the readers and tables are only read from.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}
    tables: dict[tuple, Any] = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]

    def table(arch, n_blocks):
        if (arch, n_blocks) not in tables:
            tables[arch, n_blocks] = name_map(arch, n_blocks)
        return tables[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, table
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_hf_model(
    spec: str,
    *,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load a HF causal LM and its tokenizer from a hub id, local folder or GGUF file."""
    source = resolve_source(spec)
    if source.kind == "organism":
        raise ModelLoadError(f"{spec} is the bundled organism; load it with load_model({spec!r})")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError(
                f"loading the GGUF file {spec} needs the `gguf` package; install it with "
                "`pip install gguf`"
            )
        kwargs["gguf_file"] = source.gguf_file

    try:
        with _gguf_parsed_once() if source.kind == "gguf" else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source.location, dtype=torch_dtype, device_map=device_map, **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        hint = ""
        if source.kind == "hub":
            hint = (
                " (read as a hub id: it needs network access or a copy in the local Hugging Face "
                "cache; if it is a local folder, it was not found)"
            )
        raise ModelLoadError(f"could not load model {spec}{hint}: {error}") from error

    if source.kind == "gguf":
        _clear_gguf_quantization(model)
    if device_map is None:
        model = model.to(torch_device)
    model.eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (its EOS token when it has none) and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _use_fused_attention(hf_model: PreTrainedModel) -> None:
    """Switch attention back to PyTorch's fused SDPA kernel where the architecture has one.

    The TransformerBridge forces eager attention so that its attention-pattern hooks fire. Only code
    inside `eager_attention` reads patterns here. SDPA decoded the organism's capability problems
    about 10 % faster on 2 CPU cores.
    """
    if getattr(hf_model.config, "_attn_implementation", None) == "eager" and getattr(hf_model, "_supports_sdpa", False):
        hf_model.config._attn_implementation = "sdpa"


@contextmanager
def eager_attention(model: "LoadedModel") -> Iterator[None]:
    """Run the model with eager attention inside the block, for hooks on attention patterns or
    per-head results."""
    config = model.hf_model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def wrap_model(hf_model: PreTrainedModel, tokenizer: Any, *, name: str, spec: str | None = None) -> LoadedModel:
    """Boot a TransformerBridge around an already loaded HF model (and any peft layers in it)."""
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = prepare_tokenizer(tokenizer)
    parameter_names = {id(parameter): pname for pname, parameter in hf_model.named_parameters()}
    try:
        bridge = TransformerBridge.boot_transformers(spec or name, hf_model=hf_model, tokenizer=tokenizer)
    except ValueError as error:
        architecture = getattr(hf_model.config, "architectures", None) or type(hf_model).__name__
        raise ModelLoadError(
            f"TransformerLens cannot wrap model {spec or name} (architecture {architecture}): "
            f"{error}; use an architecture the TransformerBridge supports"
        ) from error
    bridge.eval()
    _use_fused_attention(hf_model)
    return LoadedModel(
        name=name,
        spec=spec or name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        bridge=bridge,
        parameter_names=parameter_names,
    )


def apply_adapter(hf_model: PreTrainedModel, adapter: str | Path) -> PreTrainedModel:
    """Load a peft LoRA adapter folder onto `hf_model` and merge it into the weights."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter folder {adapter} has no adapter_config.json; pass a folder written by "
            "peft's save_pretrained or by `safereact repair`"
        )
    try:
        peft_model = PeftModel.from_pretrained(hf_model, str(adapter))
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"could not apply adapter {adapter}: {error}") from error
    return peft_model.merge_and_unload()


def load_unwrapped(
    spec: str,
    *,
    adapter: str | Path | None = None,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """Load a model by spec as a plain HF model and tokenizer, with `adapter` merged; no bridge yet.

    Use this when LoRA layers must be injected before the bridge wraps the model (see `wrap_model`).
    """
    source = resolve_source(spec)
    if source.kind == "organism":
        from .organism import load_organism_hf

        hf_model, tokenizer = load_organism_hf(source.location, dtype=dtype, device=device)
    else:
        hf_model, tokenizer = load_hf_model(
            spec, dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
    if adapter is not None:
        hf_model = apply_adapter(hf_model, adapter)
    return hf_model, tokenizer


def load_model(
    spec: str,
    *,
    name: str | None = None,
    adapter: str | Path | None = None,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load one model by spec: `organism:base`, `organism:post`, a GGUF file, a folder or a hub id.

    `adapter` names a peft LoRA folder merged into the weights after loading. `dtype="auto"` is
    float32 on CPU and bfloat16 on CUDA; `device_map` (for example "auto") spreads a large model
    over several devices through accelerate.
    """
    hf_model, tokenizer = load_unwrapped(spec, adapter=adapter, dtype=dtype, device=device,
                                         device_map=device_map, trust_remote_code=trust_remote_code)
    model = wrap_model(hf_model, tokenizer, name=name or spec, spec=spec)
    model.adapter = str(adapter) if adapter is not None else None
    return model


def _render_probe(tokenizer: Any) -> str | None:
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "PROBE"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_pair(base: LoadedModel, post: LoadedModel) -> None:
    """Raise `PairMismatchError` unless the two models share vocabulary, chat template, layers and width."""
    problems = []
    if base.n_layers != post.n_layers:
        problems.append(f"layer count differs: base {base.n_layers}, post-trained {post.n_layers}")
    if base.d_model != post.d_model:
        problems.append(f"residual width (d_model) differs: base {base.d_model}, post-trained {post.d_model}")

    base_vocab = base.tokenizer.get_vocab()
    post_vocab = post.tokenizer.get_vocab()
    if base_vocab != post_vocab:
        only_base = len(set(base_vocab) - set(post_vocab))
        only_post = len(set(post_vocab) - set(base_vocab))
        problems.append(
            f"tokenizer vocabulary differs: {len(base_vocab)} vs {len(post_vocab)} tokens "
            f"({only_base} only in base, {only_post} only in post-trained)"
        )

    base_render = _render_probe(base.tokenizer)
    post_render = _render_probe(post.tokenizer)
    if (base_render is None) != (post_render is None):
        which = "base" if base_render is None else "post-trained"
        problems.append(f"the {which} model's tokenizer has no chat template")
    elif base_render is not None and base_render != post_render:
        problems.append(
            f"chat templates render differently: base {base_render!r} vs post-trained {post_render!r}"
        )

    if problems:
        raise PairMismatchError(
            f"models {base.spec} and {post.spec} are not a comparable base/post-trained pair: "
            + "; ".join(problems)
            + ". Pass a post-trained model fine-tuned from this base model."
        )


def load_pair(
    base: str = "organism:base",
    post: str = "organism:post",
    *,
    base_adapter: str | Path | None = None,
    post_adapter: str | Path | None = None,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> ModelPair:
    """Load a base and a post-trained model and check that they are comparable."""
    options = dict(dtype=dtype, device=device, device_map=device_map, trust_remote_code=trust_remote_code)
    base_model = load_model(base, name="base", adapter=base_adapter, **options)
    post_model = load_model(post, name="post", adapter=post_adapter, **options)
    check_pair(base_model, post_model)
    return ModelPair(base=base_model, post=post_model)
