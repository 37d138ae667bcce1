"""Run folders and atomic writes.

Each pipeline stage writes its result into a run folder (`diagnosis.json`, `patching.json`,
`repair/`, `verification.json`, `figures/`, `report.html`). Every file is written to a temporary
name in the same folder and renamed into place, so an interrupted run never leaves a half-written
file, and a folder that already contains results is only replaced when the caller asks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import RunFolderError

logger = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _finite(value: Any) -> Any:
    """Replace NaN and infinities by None, because JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_mode() -> int:
    """File mode of a newly created file under the current umask (mkstemp would give 0600)."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(tmp_name, _default_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON; NaN becomes null."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default)
    atomic_write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise RunFolderError(f"{path} not found") from error
    except json.JSONDecodeError as error:
        raise RunFolderError(
            f"{path} is not valid JSON ({error}); delete it and rerun the stage that writes it"
        ) from error


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        save_file(contiguous, tmp_name)
        os.chmod(tmp_name, _default_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path} not found")
    return load_file(str(path))


def prepare_new_folder(path: str | Path, overwrite: bool) -> Path:
    """Check that `path` may receive a new run and return it as a `Path`.

    Raises `RunFolderError` when the folder exists and is not empty, unless `overwrite` is set.
    Nothing is deleted here: `publish_folder` replaces the old folder once the new results exist.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output path {path} exists and is not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunFolderError(
            f"output folder {path} already exists and is not empty; pass --overwrite to replace "
            "it, or choose another --out"
        )
    return path


def staging_folder(path: str | Path) -> Path:
    """Create an empty sibling folder where a stage writes before `publish_folder`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-"))


def publish_folder(staging: Path, path: str | Path) -> Path:
    """Move a finished staging folder to `path`, replacing what was there only at the end."""
    path = Path(path)
    trash = None
    if path.exists():
        trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.replace(path, trash / "old")
    os.chmod(staging, 0o777 & ~_umask())
    os.replace(staging, path)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return path
