"""Checkpoints and weights on disk: atomic writes, checksums, loading that never runs code.

A checkpoint is a ``torch.save`` file of tensors and plain values, written to a temporary
file, flushed to disk and renamed over the old one, so a crash at any moment leaves either
the previous or the new checkpoint, whole. It carries a CRC-32 of its tensors' bytes:
``torch.load`` notices a truncated archive but not a flipped bit in tensor data, the
checksum does. Loading uses ``torch.load(weights_only=True)`` (or safetensors), which
refuses pickled code. Every failure to read or fit a file is a
:class:`~kdkit.errors.CheckpointError` that names the file and what to do.
"""

from __future__ import annotations

import importlib.resources
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from kdkit.errors import CheckpointError

__all__ = ["load_checkpoint", "load_state", "load_weights", "resolve_path", "save_atomic"]

CHECKSUM = "crc32"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested payload, in a fixed order (dict order survives saving)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _checksum(payload: Any) -> int:
    crc = 0
    for tensor in _tensors(payload):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        crc = zlib.crc32(data.numpy(), crc)
    return crc


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_atomic(payload: dict, path: Path) -> None:
    """Write ``payload`` (plus its checksum) to a temporary file, flush it to disk, then
    rename it over ``path``: a crash leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({**payload, CHECKSUM: _checksum(payload)}, temporary)
    _fsync(temporary)
    os.replace(temporary, path)
    if os.name == "posix":
        _fsync(path.parent)  # make the rename itself durable


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint without running code (``weights_only=True``) and verify its
    checksum; a missing, truncated, corrupt or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(
            f"could not read checkpoint {path}: it is truncated, corrupt, or not a checkpoint "
            f"made of tensors and plain values (files that would run code are refused). "
            f"Delete it to start over or restore a copy. Reader said: {error}"
        ) from None
    if isinstance(payload, dict) and CHECKSUM in payload:
        payload = dict(payload)
        expected = payload.pop(CHECKSUM)
        if _checksum(payload) != expected:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its tensors do not match the checksum written "
                "with them (a damaged disk or copy). Delete it to start over or restore a copy"
            )
    return payload


def resolve_path(path: str | Path) -> Path:
    """A file path, or ``package.module:file`` for a file shipped inside a package."""
    text = str(path)
    module, colon, name = text.partition(":")
    if colon and not Path(text).exists() and module.replace(".", "").isidentifier():
        return Path(str(importlib.resources.files(module) / name))
    return Path(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` from a ``model.pt``, a full ``checkpoint.pt`` or a
    ``.safetensors`` file (any float dtype; converted to the model's)."""
    path = resolve_path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights not found: {path}")
        state = load_safetensors(path)
    else:
        payload = load_checkpoint(path)
        state = payload.get("model", payload) if isinstance(payload, dict) else payload
    return load_state(model, state, path)


def _first(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path
               ) -> nn.Module:
    """``module.load_state_dict(state)`` (strict; float dtypes converted to the module's),
    or a short :class:`CheckpointError` naming the first few missing, unexpected and
    wrongly shaped keys instead of PyTorch's dump of every one."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if k in state and getattr(state[k], "shape", None) != getattr(v, "shape", None)]
    if missing or unexpected or resized:
        found = [f"{what} {_first(names)}" for what, names in (
            ("missing", missing), ("unexpected", unexpected), ("shapes (file vs model)", resized))
            if names]
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: {'; '.join(found)}. Check that "
            "the config builds the model the file was saved from")
    module.load_state_dict(state)
    return module
