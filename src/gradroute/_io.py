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
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise FileFormatError(f"{path} does not exist (an incomplete save, or a file that was removed).",
                              "restore the file, or re-create the directory with the gradroute call that wrote it.") from None
    except (IsADirectoryError, PermissionError) as e:
        raise FileFormatError(f"{path} cannot be read ({type(e).__name__}).", "pass a readable file.") from None
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
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
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
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise FileFormatError(
            f"{path} is not a readable safetensors file ({e}).", "re-create or re-download it."
        ) from e
    if not tensors:
        raise FileFormatError(f"{path} is a safetensors file with no tensors in it.",
                              "save the directions into it (safetensors.torch.save_file({name: tensor}, path)).")
    return tensors


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
            if not obj:
                raise FileFormatError(f"{path} holds no tensors.", "save the tensor into it.")
            raise FileFormatError(
                f"{path} holds a dict with keys {sorted(obj)}; expected one tensor"
                + (f" or one of the keys {list(keys)}" if keys else "") + ".",
                "save the tensor alone, or name it with one of those keys.",
            )
        return tensors[0]
    if not torch.is_tensor(obj):
        raise FileFormatError(f"{path} holds a {type(obj).__name__}, not a tensor.",
                              "save a plain tensor (torch.save(tensor) or numpy.save).")
    return obj


# ------------------------------------------------------------------ checkpoint manifests
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gradroute.manifest"


def _manifest_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"))


def write_manifest(directory: str | Path) -> Path:
    """Write ``directory/manifest.json``: SHA-256 and size of every other file under it.

    Call it LAST, after everything else of the checkpoint is written: a checkpoint without a
    manifest (a crash before it), or whose files do not match it, is incomplete or damaged
    (see :func:`verify_manifest`).
    """
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
             for p in _manifest_files(directory)}
    body = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
    body["checksum"] = hashlib.sha256(canonical_json(body)).hexdigest()
    write_json(directory / MANIFEST_NAME, body)
    return directory / MANIFEST_NAME


def verify_manifest(directory: str | Path, last_good: str | Path | None = None) -> dict[str, Any]:
    """Check every file of ``directory`` against its manifest; return the manifest.

    Raises :class:`~gradroute.errors.CheckpointError` naming the missing, extra-damaged or
    modified file and saying the checkpoint is incomplete; ``last_good`` (e.g. the last
    complete checkpoint) is named in the fix when given.
    """
    from .errors import CheckpointError

    directory = Path(directory)
    fix = (f"resume from {last_good}, the last complete checkpoint." if last_good is not None else
           "resume from an earlier checkpoint of the run (gradroute.last_clean_checkpoint(run_dir)), "
           "or start the run again.")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint state {directory} does not exist: the checkpoint is incomplete.", fix)
    mpath = directory / MANIFEST_NAME
    if not mpath.is_file():
        raise CheckpointError(
            f"{mpath} is missing: the checkpoint is incomplete (the save did not finish, or it was "
            "written by a gradroute without manifests).", fix)
    try:
        body = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{mpath} is damaged ({e}): the checkpoint is incomplete.", fix) from None
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT or not isinstance(body.get("files"), dict):
        raise CheckpointError(f"{mpath} is not a gradroute manifest: the checkpoint is damaged.", fix)
    claimed = body.pop("checksum", None)
    if claimed != hashlib.sha256(canonical_json(body)).hexdigest():
        raise CheckpointError(f"{mpath} was modified after it was written: the checkpoint is damaged.", fix)
    for rel, info in sorted(body["files"].items()):
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing: the checkpoint is incomplete.", fix)
        if not isinstance(info, dict) or p.stat().st_size != info.get("size") or sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p} does not match the checkpoint's manifest (damaged or modified).", fix)
    extra = [p.relative_to(directory).as_posix() for p in _manifest_files(directory)
             if p.relative_to(directory).as_posix() not in body["files"]]
    if extra:
        raise CheckpointError(f"{directory} holds files its manifest does not list ({extra}): the checkpoint "
                              "was modified after it was saved.", fix)
    return body


def nonfinite_tensors(path: str | Path, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) tensors in a safetensors file with NaN/Inf values."""
    from safetensors import safe_open

    bad: list[str] = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad.append(name)
                if len(bad) >= limit:
                    break
    return bad
