"""The :class:`Subspace` value type: per-layer orthonormal bases of persona directions, with
provenance.

A :class:`Subspace` maps *layer keys* to orthonormal bases ``U`` (d x k, float32,
``UᵀU = I``). Integer keys are residual-stream layers in gradroute's convention (layer L = the
stream after decoder block L; see :mod:`gradroute.layers`); string keys name arbitrary
modules or hooks for non-transformer models. Alongside each basis it keeps the raw (signed,
unnormalized) direction of every column, a name per column, and a :class:`Provenance`.

Subspaces are immutable: every method returns new tensors or a new ``Subspace``. The
projection math is :mod:`gradroute.projection`; this class only looks up the basis.
:meth:`Subspace.from_directions` is the one constructor that orthonormalizes; the importers
(:mod:`gradroute.subspace.importers`) and the file format (:mod:`gradroute.subspace.io`) are
plain functions that the classmethods of the same names call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import _io
from .. import projection as P
from ..errors import (
    HiddenSizeMismatchError,
    ModelMismatchError,
    SubspaceError,
    UnknownLayerError,
)
from ..layers import LayerKey, sort_keys
from ._validate import _as_tensor, _check_key, _index, _key_str
from .provenance import Provenance, _now, mismatch


def _check_other(other: Any, what: str) -> None:
    if not isinstance(other, Subspace):
        raise SubspaceError(f"{what} needs another gradroute.Subspace, got {type(other).__name__}.",
                            "pass a Subspace (e.g. gradroute.Subspace.load(path)).")


class Subspace:
    """Per-layer orthonormal bases of (persona) directions.

    Build one with :meth:`from_directions`, :meth:`from_axes`, :meth:`from_probe`,
    :meth:`from_sae`, :meth:`from_persona_vectors`, :meth:`from_assistant_axis`,
    :meth:`from_file` or :meth:`load` (the importers are the functions of
    :mod:`gradroute.subspace.importers`; the file format is :mod:`gradroute.subspace.io`).
    """

    __slots__ = ("_bases", "_directions", "_hash", "_names", "_provenance")

    def __init__(
        self,
        bases: Mapping[LayerKey, torch.Tensor],
        directions: Mapping[LayerKey, torch.Tensor],
        names: Mapping[LayerKey, Sequence[str]],
        provenance: Provenance | None = None,
    ):
        if not bases:
            raise SubspaceError("a subspace needs at least one layer.")
        self._bases: dict[LayerKey, torch.Tensor] = {}
        self._directions: dict[LayerKey, torch.Tensor] = {}
        self._names: dict[LayerKey, tuple[str, ...]] = {}
        for key in sort_keys([_check_key(k) for k in bases]):
            U = _as_tensor(bases[key]).to(torch.float32).clone(memory_format=torch.contiguous_format)
            D = _as_tensor(directions[key]).to(torch.float32).clone(memory_format=torch.contiguous_format)
            nm = tuple(str(n) for n in names[key])
            if U.ndim != 2 or D.shape != (U.shape[1], U.shape[0]) or len(nm) != U.shape[1]:
                raise SubspaceError(
                    f"layer {key!r}: basis {tuple(U.shape)}, directions {tuple(D.shape)} and "
                    f"{len(nm)} names do not agree (expected d x k, k x d and k names)."
                )
            err = P.orthonormality_error(U)
            if err > 1e-5:
                raise SubspaceError(f"layer {key!r}: basis is not orthonormal (|UᵀU − I| = {err:.1e}).")
            if len(set(nm)) != len(nm):
                raise SubspaceError(f"layer {key!r}: duplicate direction names {nm}.")
            self._bases[key], self._directions[key], self._names[key] = U, D, nm
        self._provenance = provenance or Provenance()
        self._hash: str | None = None

    # ------------------------------------------------------------------ construction
    # from_directions is the value's own constructor (every importer ends in it), kept here in
    # full: orthonormalize's warning about dropped directions names the caller's line, which a
    # delegating frame would hide.
    @classmethod
    def from_directions(
        cls,
        directions: Mapping[LayerKey, Any] | Any,
        names: Sequence[str] | Mapping[LayerKey, Sequence[str]] | None = None,
        layers: Iterable[LayerKey] | None = None,
        *,
        rtol: float = 1e-3,
        on_degenerate: str = "error",
        hidden_size: int | None = None,
        model: Any = None,
        provenance: Provenance | None = None,
    ) -> Subspace:
        """Orthonormalize directions per layer.

        ``directions`` is ``{layer: (k x d) or (d,)}``, or one (k x d)/(d,) array used at every
        layer in ``layers``. Rows are orthonormalized in order by Gram-Schmidt (see
        :func:`gradroute.projection.orthonormalize`): a row whose component outside the earlier
        rows is below ``rtol`` of its norm (zero, duplicate, near-dependent) raises
        :class:`DegenerateDirectionsError` (``on_degenerate="error"``) or is dropped with a
        warning (``"warn"``) — never silently kept. ``hidden_size`` or ``model`` checks d.
        """
        if isinstance(directions, Mapping):
            if layers is not None:
                raise SubspaceError("pass layers= only with a single direction array, not a dict.")
            per_layer = {_check_key(k): _as_tensor(v, f"layer {k!r}: directions") for k, v in directions.items()}
        else:
            if layers is None:
                raise SubspaceError(
                    "a single direction array needs layers=[...] to say where it applies.",
                    "pass layers=[L, ...] or a dict {layer: directions}.",
                )
            if isinstance(layers, str | bytes | int) or not isinstance(layers, Iterable):
                raise SubspaceError(f"layers must be a list of layer keys, got {layers!r}.", "pass layers=[L, ...].")
            arr = _as_tensor(directions)
            per_layer = {_check_key(k): arr for k in layers}
        if not per_layer:
            raise SubspaceError("no layers given.")
        if model is not None and hidden_size is None:
            from ..model import model_hidden_size

            hidden_size = model_hidden_size(model)
        bases, dirs, nms = {}, {}, {}
        for key, D in per_layer.items():
            D = D[None] if D.ndim == 1 else D
            if D.ndim != 2 or D.shape[0] == 0 or D.shape[1] == 0:
                raise SubspaceError(f"layer {key!r}: directions must be a non-empty (k x d) or (d,) array, "
                                    f"got shape {tuple(D.shape)}.",
                                    "pass at least one direction of the model's hidden size at each layer.")
            if hidden_size is not None and D.shape[1] != hidden_size:
                raise HiddenSizeMismatchError(
                    f"layer {key!r}: directions have dimension {D.shape[1]} but the model's hidden "
                    f"size is {hidden_size}.",
                    "build the directions from this model's activations (or its SAE).",
                )
            if names is None:
                nm = [f"dir{i}" for i in range(D.shape[0])]
            elif isinstance(names, Mapping):
                if key not in names:
                    raise SubspaceError(f"names has no entry for layer {key!r}.",
                                        "give names for every layer, or one list used at every layer.")
                nm = names[key]
            else:
                nm = names
            if isinstance(nm, str | bytes) or not isinstance(nm, Iterable):
                raise SubspaceError(f"layer {key!r}: names must be a list of strings, got {nm!r}.",
                                    'pass names=["a", "b", ...] (one per direction).')
            nm = list(nm)
            if not all(isinstance(n, str) and n for n in nm):
                raise SubspaceError(f"layer {key!r}: names must be non-empty strings, got {nm!r}.",
                                    'pass names=["a", "b", ...] (one per direction).')
            if len(nm) != D.shape[0]:
                raise SubspaceError(f"layer {key!r}: {len(nm)} names for {D.shape[0]} directions.",
                                    "give exactly one name per direction (row).")
            U, rep = P.orthonormalize(D, rtol=rtol, names=nm, on_degenerate=on_degenerate)
            bases[key] = U
            dirs[key] = D.to(torch.float32)[rep.kept]
            nms[key] = [nm[i] for i in rep.kept]
        if model is not None and provenance is not None and provenance.model is None:
            from ..model import model_name

            provenance = replace(provenance, model=model_name(model))
        elif model is not None and provenance is None:
            from ..model import model_name

            provenance = Provenance(model=model_name(model))
        sub = cls(bases, dirs, nms, provenance)
        if model is not None:
            sub.validate_for(model)
        return sub


    # Importers: each classmethod runs the function of the same name in
    # gradroute.subspace.importers (imported on call: that module imports this one). The
    # package's __init__ gives each one its function's signature, for help() and editors.
    @classmethod
    def from_axes(cls, *args: Any, **kwargs: Any) -> Subspace:
        """Axis-aligned directions: :func:`gradroute.subspace.importers.from_axes`."""
        from .importers import from_axes
        return from_axes(*args, **kwargs)

    @classmethod
    def from_probe(cls, *args: Any, **kwargs: Any) -> Subspace:
        """Directions fitted on a model's activations: :func:`gradroute.subspace.importers.from_probe`."""
        from .importers import from_probe
        return from_probe(*args, **kwargs)

    @classmethod
    def from_sae(cls, *args: Any, **kwargs: Any) -> Subspace:
        """Directions from SAE decoder rows: :func:`gradroute.subspace.importers.from_sae`."""
        from .importers import from_sae
        return from_sae(*args, **kwargs)

    @classmethod
    def from_persona_vectors(cls, *args: Any, **kwargs: Any) -> Subspace:
        """A Persona Vectors tensor: :func:`gradroute.subspace.importers.from_persona_vectors`."""
        from .importers import from_persona_vectors
        return from_persona_vectors(*args, **kwargs)

    @classmethod
    def from_assistant_axis(cls, *args: Any, **kwargs: Any) -> Subspace:
        """An Assistant Axis tensor: :func:`gradroute.subspace.importers.from_assistant_axis`."""
        from .importers import from_assistant_axis
        return from_assistant_axis(*args, **kwargs)

    @classmethod
    def from_file(cls, *args: Any, **kwargs: Any) -> Subspace:
        """Plain ``.npy``/``.safetensors``/``.pt`` directions: :func:`gradroute.subspace.importers.from_file`."""
        from .importers import from_file
        return from_file(*args, **kwargs)

    # ------------------------------------------------------------------ accessors
    @property
    def layers(self) -> tuple[LayerKey, ...]:
        """Layer keys, integers ascending then module names."""
        return tuple(self._bases)

    @property
    def provenance(self) -> Provenance:
        return self._provenance

    def _get(self, table: dict, layer: LayerKey):
        try:
            return table[layer]
        except KeyError:
            raise UnknownLayerError(
                f"the subspace has no layer {layer!r}; it has {list(self._bases)}.",
                "use one of those layers, or build the subspace at this layer.",
            ) from None

    def __contains__(self, layer: object) -> bool:
        return layer in self._bases

    def __len__(self) -> int:
        return len(self._bases)

    def basis(self, layer: LayerKey) -> torch.Tensor:
        """Orthonormal basis U (d x k, float32) at ``layer`` (a copy)."""
        return self._get(self._bases, layer).clone()

    def directions(self, layer: LayerKey) -> torch.Tensor:
        """Raw signed directions (k x d, float32) behind the basis columns (a copy)."""
        return self._get(self._directions, layer).clone()

    def names(self, layer: LayerKey) -> tuple[str, ...]:
        return self._get(self._names, layer)

    def select(self, layer: LayerKey, directions: int | str | Sequence[int | str] | None = None) -> torch.Tensor:
        """Basis columns at ``layer`` picked by index or name (all of them for None), as (d x m)."""
        U = self.basis(layer)
        if directions is None:
            return U
        names = self.names(layer)
        idx = []
        for d in (directions if isinstance(directions, list | tuple) else [directions]):
            if isinstance(d, str):
                if d not in names:
                    raise UnknownLayerError(f"layer {layer!r} has no direction named {d!r}; it has {list(names)}.",
                                            "use one of those names, or an index.")
                idx.append(names.index(d))
            else:
                if not (-U.shape[1] <= int(d) < U.shape[1]):
                    raise UnknownLayerError(f"layer {layer!r} has {U.shape[1]} directions; index {d} is out of range.")
                idx.append(int(d))
        return U[:, idx]

    def rank(self, layer: LayerKey) -> int:
        return self._get(self._bases, layer).shape[1]

    def dim(self, layer: LayerKey) -> int:
        """Dimension d of the space at ``layer``."""
        return self._get(self._bases, layer).shape[0]

    @property
    def hidden_size(self) -> int:
        """The common dimension d of all layers (raises if layers differ)."""
        ds = {U.shape[0] for U in self._bases.values()}
        if len(ds) != 1:
            raise HiddenSizeMismatchError(f"layers have different dimensions {sorted(ds)}.")
        return ds.pop()

    # ------------------------------------------------------------------ math (delegates to projection)
    def coords(self, h: torch.Tensor, layer: LayerKey, dim: int = -1) -> torch.Tensor:
        """``Uᵀh`` along ``dim`` (see :func:`gradroute.projection.coords`)."""
        return P.coords(h, self._get(self._bases, layer), dim)

    def project(self, h: torch.Tensor, layer: LayerKey, dim: int = -1) -> torch.Tensor:
        """``U Uᵀ h`` along ``dim``."""
        return P.project(h, self._get(self._bases, layer), dim)

    def remove(self, h: torch.Tensor, layer: LayerKey, dim: int = -1) -> torch.Tensor:
        """``h − U Uᵀ h`` along ``dim``."""
        return P.remove(h, self._get(self._bases, layer), dim)

    def energy_fraction(self, h: torch.Tensor, layer: LayerKey, dim: int = -1) -> torch.Tensor:
        """``‖Uᵀh‖² / ‖h‖²`` along ``dim``."""
        return P.energy_fraction(h, self._get(self._bases, layer), dim)

    # ------------------------------------------------------------------ algebra
    def restrict(self, layers: Iterable[LayerKey]) -> Subspace:
        """The same bases at a subset of layers."""
        layers = list(layers)
        for L in layers:
            self._get(self._bases, L)
        return Subspace(
            {L: self._bases[L] for L in layers}, {L: self._directions[L] for L in layers},
            {L: self._names[L] for L in layers},
            replace(self._provenance, source="restrict", parents=(self.content_hash,), created=_now()),
        )

    def union(self, other: Subspace, rtol: float = 1e-3) -> Subspace:
        """Span of both, per layer, re-orthonormalized (shared directions are kept once).

        Layers present in only one operand are copied. Names that clash get a ``'``.
        """
        _check_other(other, "union")
        bases, dirs, nms = {}, {}, {}
        for L in sort_keys(set(self.layers) | set(other.layers)):
            if L in self and L in other:
                if self.dim(L) != other.dim(L):
                    raise HiddenSizeMismatchError(
                        f"layer {L!r}: cannot unite dimensions {self.dim(L)} and {other.dim(L)}."
                    )
                names_a = list(self._names[L])
                names_b = [n if n not in names_a else n + "'" for n in other._names[L]]
                cols = torch.cat([self._bases[L].T, other._bases[L].T])
                U, rep = P.orthonormalize(cols, rtol=rtol, on_degenerate="drop")
                raw = torch.cat([self._directions[L], other._directions[L]])
                nm = names_a + names_b
                bases[L], dirs[L], nms[L] = U, raw[rep.kept], [nm[i] for i in rep.kept]
            else:
                src = self if L in self else other
                bases[L], dirs[L], nms[L] = src._bases[L], src._directions[L], src._names[L]
        return Subspace(bases, dirs, nms, Provenance(
            source="union", parents=(self.content_hash, other.content_hash),
            layer_convention=self._provenance.layer_convention,
        ))

    def random_like(self, seed: int = 0) -> Subspace:
        """Haar-random subspace with the same layers, dimensions and ranks (the control)."""
        if _index(seed) is None:
            raise SubspaceError(f"seed must be an integer, got {seed!r}.", "pass seed=0 (or another int).")
        g = torch.Generator().manual_seed(int(seed))
        bases, dirs, nms = {}, {}, {}
        for L, U in self._bases.items():
            R = P.random_basis(U.shape[0], U.shape[1], g)
            bases[L], dirs[L], nms[L] = R, R.T.clone(), [f"random{i}" for i in range(U.shape[1])]
        return Subspace(bases, dirs, nms, Provenance(
            source="random", model=self._provenance.model, parents=(self.content_hash,),
            layer_convention=self._provenance.layer_convention, extra={"seed": int(seed)},
        ))

    def principal_angles(self, other: Subspace, layer: LayerKey, degrees: bool = False) -> torch.Tensor:
        """Principal angles between this and ``other`` at ``layer``, ascending: in radians
        (``arccos`` of the principal cosines), or in degrees with ``degrees=True``."""
        _check_other(other, "principal_angles")
        c = P.principal_cosines(self._get(self._bases, layer), other._get(other._bases, layer))
        ang = torch.arccos(c)
        return torch.rad2deg(ang) if degrees else ang

    def overlap(self, other: Subspace) -> dict[LayerKey, float]:
        """Mean squared principal cosine per shared layer (1 = nested, ~k/d for random)."""
        _check_other(other, "overlap")
        return {L: P.overlap(self._bases[L], other._bases[L]) for L in self.layers if L in other}

    # ------------------------------------------------------------------ model checks
    def validate_for(self, model: Any) -> None:
        """Raise unless every layer exists in ``model`` with the right hidden size.

        Integer layers are checked against the model's decoder blocks and hidden size; string
        keys must name modules of the model.
        """
        from ..layers import check_layer
        from ..model import model_hidden_size, num_layers

        int_layers = [L for L in self.layers if isinstance(L, int)]
        if int_layers:
            d = model_hidden_size(model)
            n = num_layers(model)
            for L in int_layers:
                check_layer(L, n)
                if self.dim(L) != d:
                    raise ModelMismatchError(
                        f"layer {L}: the subspace has dimension {self.dim(L)} but the model's hidden "
                        f"size is {d} (subspace built for {self._provenance.model or 'another model'}).",
                        "build or load a subspace for this model.",
                    )
        mods = dict(model.named_modules())
        for L in self.layers:
            if isinstance(L, str) and L not in mods:
                raise UnknownLayerError(f"the model has no module named {L!r}.")

    def provenance_mismatch(self, model: Any) -> str | None:
        """The model named in the provenance when it clearly differs from ``model``, else None.

        ``model`` is named by its config's ``name_or_path`` and ``model_type``. Clearly differs:
        the two model types differ (the provenance's read from a local directory's
        ``config.json``, or the provenance is itself a model type), or both are hub-style names
        and neither name contains the other (``Qwen2.5-0.5B`` → ``Qwen2.5-0.5B-Instruct`` and
        sae-lens' ``gpt2-small`` → ``gpt2`` count as the same). None without a model in the
        provenance, and where names cannot be compared (an unnamed model, a local path such as a
        checkpoint) and the model types do not differ.
        """
        return mismatch(self._provenance, model)

    # ------------------------------------------------------------------ identity and I/O
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for L in self.layers:
            out[f"basis.{_key_str(L)}"] = self._bases[L]
            out[f"directions.{_key_str(L)}"] = self._directions[L]
        return out

    @property
    def content_hash(self) -> str:
        """SHA-256 of the layers, bases, raw directions and names (not the provenance)."""
        if self._hash is None:
            meta = {_key_str(L): list(self._names[L]) for L in self.layers}
            self._hash = _io.sha256_tensors(self._tensors(), meta)
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subspace) and other.content_hash == self.content_hash

    def __hash__(self) -> int:
        return hash(self.content_hash)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``path/`` with ``subspace.safetensors`` and a ``subspace.json`` sidecar (a
        non-empty directory is refused unless ``overwrite=True``): :func:`gradroute.subspace.io.save`."""
        from .io import save
        return save(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        """Read a subspace written by :meth:`save`, verifying its checksums: :func:`gradroute.subspace.io.load`."""
        from .io import load
        return load(path)

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A small table: layer, dimension, rank, names."""
        rows = [f"Subspace {self.content_hash[:12]} ({self._provenance.source}"
                + (f", model {self._provenance.model}" if self._provenance.model else "")
                + f", convention {self._provenance.layer_convention})"]
        rows.append(f"{'layer':>12}  {'d':>6}  {'k':>3}  names")
        for L in self.layers:
            nm = ", ".join(self._names[L])
            rows.append(f"{L!s:>12}  {self.dim(L):>6}  {self.rank(L):>3}  {nm[:60]}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        ranks = ", ".join(f"{L}: {self.rank(L)}" for L in self.layers)
        return f"Subspace(layers={{{ranks}}}, source={self._provenance.source!r}, hash={self.content_hash[:12]})"
