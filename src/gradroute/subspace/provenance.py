""":class:`Provenance`: where a subspace came from, and whether the model it names is another
model than the one at hand (:func:`mismatch`)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import _io
from .._version import __version__
from ..errors import FileFormatError
from ..layers import LAYER_CONVENTION


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    """Where a subspace came from. Stored in the JSON sidecar; not part of ``content_hash``."""

    source: str = "directions"  # directions | probe | sae | persona_vectors | assistant_axis | file | random | union | restrict
    model: str | None = None
    revision: str | None = None
    layer_convention: str = LAYER_CONVENTION
    token_aggregation: str | None = None
    method: str | None = None
    sae: dict[str, Any] | None = None
    created: str = field(default_factory=_now)
    library_version: str = __version__
    parents: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parents"] = list(self.parents)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["parents"] = tuple(kw.get("parents", ()))
        return cls(**kw)


def _local(name: str) -> Path | None:
    """``name`` as an existing local directory, else None."""
    try:
        path = Path(name).expanduser()
        return path if path.is_dir() else None
    except (OSError, RuntimeError, ValueError):
        return None


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1
            or _local(name) is not None)


def _stem(name: str) -> str:
    """The last part of a hub id or path, case-folded (``Qwen/Qwen2.5-0.5B`` → ``qwen2.5-0.5b``)."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].casefold()


def _model_type_of(name: str) -> str | None:
    """The transformers model type a provenance name states: its directory's ``config.json``
    ``model_type``, or the name itself when it is a model type (``llama``); else None."""
    local = _local(name)
    if local is not None and (config := local / "config.json").is_file():
        try:
            meta = _io.read_json(config)
        except FileFormatError:  # an unreadable config says nothing about the model
            return None
        mtype = meta.get("model_type") if isinstance(meta, dict) else None
        return mtype if isinstance(mtype, str) and mtype else None
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return None
    return name if name in CONFIG_MAPPING_NAMES else None


def mismatch(provenance: Provenance, model: Any) -> str | None:
    """The model named in ``provenance`` when it clearly differs from ``model``, else None
    (see :meth:`gradroute.subspace.Subspace.provenance_mismatch`)."""
    built = provenance.model
    if not isinstance(built, str) or not built.strip():
        return None
    from ..model import unwrap_model

    cfg = getattr(unwrap_model(model), "config", None)
    name = str(getattr(cfg, "name_or_path", "") or getattr(model, "name_or_path", "") or "").strip()
    mtype = getattr(cfg, "model_type", None) or None
    if not name and not mtype:
        return None
    built = built.strip()
    btype = _model_type_of(built)
    this = f"{name} ({mtype})" if name and mtype and mtype != name else (name or str(mtype))
    if btype and mtype and btype != mtype:
        return this
    if not name or btype == built or _looks_like_path(built) or _looks_like_path(name):
        return None
    a, b = _stem(built), _stem(name)
    return None if a in b or b in a else this
