"""Artifact I/O: safetensors for tensors, JSON for metadata, SHA-256 for integrity.

Nothing here unpickles user files. :func:`load_peer_tensor` reads peers' ``.pt`` files with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import FileFormatError


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def sha256_tensors(tensors: dict[str, torch.Tensor], meta: Any = None) -> str:
    """SHA-256 over named tensors (name, dtype, shape, bytes; in name order) and JSON metadata."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").clone(memory_format=torch.contiguous_format).reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(tensors[name].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if meta is not None:
        h.update(canonical_json(meta))
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.", "check the path.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}).", "re-create the file.") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.", "check the path.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({e}).", "re-create or re-download it."
        ) from e


def load_peer_tensor(path: str | Path, keys: tuple[str, ...] = ()) -> torch.Tensor:
    """Load one tensor from a peer's .pt/.npy/.safetensors file, never unpickling code.

    A dict (``.pt`` or ``.safetensors``) must hold one tensor, or one under one of ``keys``.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist.", "check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            obj: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            obj = load_tensors(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileFormatError:
        raise
    except Exception as e:  # torch.load raises many types for bad/unsafe files
        raise FileFormatError(
            f"could not read {path} as a tensor file ({type(e).__name__}: {e}).",
            "only plain tensors are read (weights_only=True, no pickled objects); re-save it "
            "with torch.save(tensor) or as .npy/.safetensors.",
        ) from e
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and torch.is_tensor(obj[k]):
                return obj[k]
        tensors = [v for v in obj.values() if torch.is_tensor(v)]
        if len(tensors) != 1:
            raise FileFormatError(
                f"{path} holds a dict with keys {sorted(obj)}; expected one tensor"
                + (f" or one of the keys {list(keys)}" if keys else "") + ".",
                "save the tensor alone, or name it with one of those keys.",
            )
        return tensors[0]
    if not torch.is_tensor(obj):
        raise FileFormatError(f"{path} holds a {type(obj).__name__}, not a tensor.")
    return obj
