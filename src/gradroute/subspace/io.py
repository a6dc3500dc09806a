"""Subspace files: ``path/subspace.safetensors`` (bases and raw directions) and a
``subspace.json`` sidecar (layers, names, provenance, content hash, checksums).

:func:`save` and :func:`load` are what :meth:`Subspace.save <gradroute.subspace.Subspace.save>`
and :meth:`Subspace.load <gradroute.subspace.Subspace.load>` run.
"""

from __future__ import annotations

from pathlib import Path

from .. import _io
from ..errors import FileFormatError
from ._validate import _key_from_str, _key_str
from .core import Subspace
from .provenance import Provenance

FORMAT_VERSION = 1
TENSOR_FILE = "subspace.safetensors"
META_FILE = "subspace.json"


def save(sub: Subspace, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``path/`` with ``subspace.safetensors`` and a ``subspace.json`` sidecar.

    A directory that already holds files is refused unless ``overwrite=True`` (then the
    subspace files in it are replaced)."""
    if not isinstance(path, str | Path):
        raise FileFormatError(f"path must be a str or Path, got {type(path).__name__}.", "pass a directory path.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileFormatError(f"{path} exists and is not a directory.", "choose another path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not _same_or_partial(sub, path):
        raise FileFormatError(f"{path} already exists and is not empty; saving would overwrite it.",
                              "choose a new path, or pass overwrite=True (CLI: --force).")
    path.mkdir(parents=True, exist_ok=True)
    _io.save_tensors(path / TENSOR_FILE, sub._tensors())
    meta = {
        "format": "gradroute.subspace",
        "format_version": FORMAT_VERSION,
        "layers": [_key_str(L) for L in sub.layers],
        "names": {_key_str(L): list(sub.names(L)) for L in sub.layers},
        "provenance": sub.provenance.to_dict(),
        "content_hash": sub.content_hash,
        "tensor_sha256": _io.sha256_file(path / TENSOR_FILE),
    }
    meta["checksum"] = _io.sha256_tensors({}, {k: v for k, v in meta.items()})
    _io.write_json(path / META_FILE, meta)
    return path


def _same_or_partial(sub: Subspace, path: Path) -> bool:
    """True when ``path`` holds this very subspace, or only a save of ours cut short (no sidecar)."""
    names = {p.name for p in path.iterdir()}
    if not names <= {TENSOR_FILE, META_FILE, TENSOR_FILE + ".tmp", META_FILE + ".tmp"}:
        return False
    if META_FILE not in names:
        return True
    try:
        meta = _io.read_json(path / META_FILE)
    except FileFormatError:
        return False
    return isinstance(meta, dict) and meta.get("content_hash") == sub.content_hash


def load(path: str | Path) -> Subspace:
    """Read a subspace written by :func:`save`, verifying its checksums."""
    if not isinstance(path, str | Path):
        raise FileFormatError(f"path must be a str or Path, got {type(path).__name__}.",
                              "pass the directory written by Subspace.save.")
    path = Path(path)
    if not path.is_dir():
        raise FileFormatError(
            f"{path} is not a subspace directory.",
            "pass the directory written by Subspace.save (it holds subspace.json).",
        )
    meta = _io.read_json(path / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != "gradroute.subspace":
        raise FileFormatError(f"{path / META_FILE} is not a gradroute subspace sidecar.")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise FileFormatError(f"{path / META_FILE}: format_version is {version!r}, not an integer.",
                              "restore the original sidecar or rebuild the subspace.")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{path} was written by a newer gradroute (format {meta['format_version']}).",
            "upgrade gradroute.",
        )
    claimed = meta.pop("checksum", None)
    if claimed != _io.sha256_tensors({}, meta):
        raise FileFormatError(
            f"{path / META_FILE} was modified after it was written (checksum mismatch).",
            "restore the original file or rebuild the subspace.",
        )
    if "tensor_sha256" not in meta:
        raise FileFormatError(f"{path / META_FILE} has no tensor_sha256.", "rebuild the subspace.")
    if _io.sha256_file(path / TENSOR_FILE) != meta["tensor_sha256"]:
        raise FileFormatError(
            f"{path / TENSOR_FILE} does not match its sidecar (tensor checksum mismatch): the "
            "file is corrupt or was modified.",
            "restore the original file or rebuild the subspace.",
        )
    tensors = _io.load_tensors(path / TENSOR_FILE)
    try:
        keys = [_key_from_str(s) for s in meta["layers"]]
        bases = {k: tensors[f"basis.{_key_str(k)}"] for k in keys}
        dirs = {k: tensors[f"directions.{_key_str(k)}"] for k in keys}
        names = {k: meta["names"][_key_str(k)] for k in keys}
        prov = Provenance.from_dict(meta.get("provenance", {}))
    except (KeyError, TypeError, AttributeError) as e:
        raise FileFormatError(f"{path} is missing or has a malformed entry ({type(e).__name__}: {e}).",
                              "restore the original files or rebuild the subspace.") from None
    sub = Subspace(bases, dirs, names, prov)
    if sub.content_hash != meta.get("content_hash"):
        raise FileFormatError(f"{path}: content hash mismatch.", "rebuild the subspace.")
    return sub
