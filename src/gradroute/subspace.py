"""``Subspace``: per-layer orthonormal bases of persona directions, with provenance.

A :class:`Subspace` maps *layer keys* to orthonormal bases ``U`` (d x k, float32,
``UᵀU = I``). Integer keys are residual-stream layers in gradroute's convention (layer L = the
stream after decoder block L; see :mod:`gradroute.layers`); string keys name arbitrary
modules or hooks for non-transformer models. Alongside each basis it keeps the raw (signed,
unnormalized) direction of every column, a name per column, and a :class:`Provenance`.

Subspaces are immutable: every method returns new tensors or a new ``Subspace``. The
projection math is :mod:`gradroute.projection`; this class only looks up the basis.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import _io
from . import projection as P
from ._version import __version__
from .errors import (
    DegenerateDirectionsError,
    FileFormatError,
    HiddenSizeMismatchError,
    ModelMismatchError,
    SubspaceError,
    UnknownLayerError,
)
from .layers import LAYER_CONVENTION, LayerKey, sort_keys

FORMAT_VERSION = 1
TENSOR_FILE = "subspace.safetensors"
META_FILE = "subspace.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


_F32_MAX = float(torch.finfo(torch.float32).max)


def _as_tensor(x: Any, what: str = "directions") -> torch.Tensor:
    """A real, finite-in-float32 numeric tensor (on CPU) from a tensor or array-like; anything
    else raises :class:`SubspaceError` / :class:`DegenerateDirectionsError`."""
    if torch.is_tensor(x):
        T = x.detach().to("cpu")
    else:
        import numpy as np

        if x is None or isinstance(x, str | bytes | dict | set):
            raise SubspaceError(f"{what} must be a tensor or an array of numbers, got {type(x).__name__} {x!r:.60}.",
                                "pass a torch tensor, numpy array or nested list of floats, (k x d) or (d,).")
        try:
            arr = np.asarray(x)
            if arr.dtype == object or arr.dtype.kind not in "biufc":
                raise TypeError(f"dtype {arr.dtype}")
            T = torch.from_numpy(arr)
        except (TypeError, ValueError) as e:
            raise SubspaceError(f"{what} must be numbers, got {type(x).__name__} that numpy reads as {e}.",
                                "pass a torch tensor, numpy array or nested list of floats, (k x d) or (d,).") from None
    if T.is_complex():
        raise SubspaceError(f"{what} are complex ({T.dtype}); directions in the residual stream are real.",
                            "pass the real part explicitly (tensor.real) if that is what you mean.")
    if T.dtype == torch.bool or not (T.is_floating_point() or T.dtype in (torch.int8, torch.int16, torch.int32,
                                                                          torch.int64, torch.uint8)):
        raise SubspaceError(f"{what} have dtype {T.dtype}, not a number type.", "pass float values.")
    if T.is_floating_point() and T.numel() and T.dtype == torch.float64:
        finite = torch.isfinite(T)
        if bool(finite.all()) and float(T.abs().max()) > _F32_MAX:
            raise DegenerateDirectionsError(
                f"{what} hold values up to {float(T.abs().max()):.3g}, beyond float32's range ({_F32_MAX:.3g}): "
                "they would become inf.",
                "rescale the directions (only their span matters), e.g. divide each row by its norm.")
    return T


def _key_str(key: LayerKey) -> str:
    return f"L{key}" if isinstance(key, int) else f"M{key}"


def _key_from_str(s: Any) -> LayerKey:
    if isinstance(s, str) and s.startswith("L") and s[1:].lstrip("-").isdigit():
        return int(s[1:])
    if isinstance(s, str) and s.startswith("M") and len(s) > 1:
        return s[1:]
    raise FileFormatError(f"bad layer key {s!r} in subspace file.",
                          "re-create the subspace with Subspace.save (keys are 'L<int>' or 'M<module name>').")


def _check_key(key: Any) -> LayerKey:
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise UnknownLayerError(
            f"layer key {key!r} must be an int (residual layer) or a str (module/hook name).",
            "use integer layers (L = output of block L) or module names as keys.",
        )
    if isinstance(key, int) and key < -1:
        raise UnknownLayerError(
            f"layer {key} is negative; only -1 (the embeddings) is allowed below 0.",
            "layers count block outputs from 0 (see gradroute.layers).",
        )
    return key


def _int_layer(L: Any) -> int:
    j = _index(L)
    if j is None and isinstance(L, str) and L.strip().lstrip("-").isdigit():
        j = int(L)
    if j is None:
        raise UnknownLayerError(f"layer {L!r} is not a layer number.", "pass integer layers (L = output of block L).")
    return j


def _index(x: Any) -> int | None:
    """``x`` as an int if it is an integer (Python, numpy or 0-d torch), else None."""
    import operator

    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _check_other(other: Any, what: str) -> None:
    if not isinstance(other, Subspace):
        raise SubspaceError(f"{what} needs another gradroute.Subspace, got {type(other).__name__}.",
                            "pass a Subspace (e.g. gradroute.Subspace.load(path)).")


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


class Subspace:
    """Per-layer orthonormal bases of (persona) directions.

    Build one with :meth:`from_directions`, :meth:`from_probe`, :meth:`from_sae`,
    :meth:`from_persona_vectors`, :meth:`from_assistant_axis`, :meth:`from_file` or
    :meth:`load`.
    """

    __slots__ = ("_bases", "_directions", "_names", "_provenance", "_hash")

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
            from .model import model_hidden_size

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
            from .model import model_name

            provenance = replace(provenance, model=model_name(model))
        elif model is not None and provenance is None:
            from .model import model_name

            provenance = Provenance(model=model_name(model))
        sub = cls(bases, dirs, nms, provenance)
        if model is not None:
            sub.validate_for(model)
        return sub

    @classmethod
    def from_axes(cls, axes: Mapping[LayerKey, Sequence[int]], dim: int,
                  names: Mapping[LayerKey, Sequence[str]] | Sequence[str] | None = None) -> Subspace:
        """Axis-aligned directions (unit vectors e_i), e.g. reserved dimensions of a small latent:
        ``Subspace.from_axes({"bottleneck": [0]}, dim=4, names=["red"])``."""
        dim = _index(dim)
        if dim is None or dim < 1:
            raise SubspaceError(f"dim must be an integer >= 1, got {dim!r}.", "pass the latent's dimension, e.g. dim=4.")
        if not isinstance(axes, Mapping):
            raise SubspaceError(f"axes must be a dict {{layer: [axis, ...]}}, got {axes!r}.",
                                'pass e.g. {"bottleneck": [0, 1]}.')
        dirs = {}
        for key, idx in axes.items():
            E = torch.zeros(len(idx), dim)
            for row, i in enumerate(idx):
                j = _index(i)
                if j is None or not (0 <= j < dim):
                    raise UnknownLayerError(f"axis {i!r} is not an integer in 0..{dim - 1}.",
                                            f"pick axes from 0 to {dim - 1}.")
                E[row, j] = 1.0
            dirs[key] = E
        if names is None:
            names = {k: [f"e{i}" for i in idx] for k, idx in axes.items()}
        return cls.from_directions(dirs, names=names, provenance=Provenance(source="axes"))

    @classmethod
    def from_probe(
        cls,
        model: Any,
        tokenizer: Any,
        positive: Sequence[Any] | None = None,
        negative: Sequence[Any] | None = None,
        layers: Iterable[int] | None = None,
        *,
        texts: Sequence[Any] | None = None,
        labels: Sequence[int] | None = None,
        method: str = "diff_means",
        k: int = 1,
        aggregation: str = "mean",
        batch_size: int = 16,
        max_length: int | None = None,
        names: Sequence[str] | None = None,
        progress: bool = True,
        rtol: float = 1e-3,
    ) -> Subspace:
        """Fit persona directions from activations of a HF causal LM.

        Texts are strings, or ``(prompt, response)`` pairs for ``aggregation="response_mean"``
        and ``"last_prompt"``. Give ``positive``/``negative`` lists, or ``texts`` with binary
        ``labels`` (1 = positive). ``method``: ``"diff_means"`` (mean(pos) − mean(neg)),
        ``"logistic"`` (L2-regularized logistic-regression weights) or ``"pca"`` (top-``k``
        principal directions of paired differences pos_i − neg_i, oriented along the mean
        difference). ``aggregation``: ``"mean"`` over live tokens, ``"last"`` token,
        ``"last_prompt"`` token, ``"response_mean"`` over response tokens, or ``"all"`` tokens.
        Activations are read at ``layers`` with hooks (gradroute's layer convention).
        """
        from . import probe as _probe
        from .model import collect_activations, model_name, num_layers

        from .errors import ProbeDataError

        if texts is not None:
            if positive is not None or negative is not None:
                raise SubspaceError("pass either positive/negative or texts/labels, not both.",
                                    "drop positive=/negative=, or drop texts=/labels=.")
            if labels is None:
                raise ProbeDataError("texts= needs labels= of the same length (1 = positive, 0 = negative).",
                                     "pass labels=[1, 0, ...].")
            if isinstance(texts, str | bytes) or not hasattr(texts, "__len__"):
                raise ProbeDataError(f"texts must be a list, got {type(texts).__name__}.", "pass texts=[...].")
            labels = _probe.check_labels(labels, len(texts))
            positive = [t for t, y in zip(texts, labels) if y == 1]
            negative = [t for t, y in zip(texts, labels) if y == 0]
        _probe.check_probe_data(positive, negative, method, k)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ProbeDataError(f"batch_size must be an integer >= 1, got {batch_size!r}.",
                                 "pass batch_size=16 (lower it if memory runs out).")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ProbeDataError(f"max_length must be None or an integer >= 1, got {max_length!r}.",
                                 "pass max_length=None (no truncation) or a token count.")
        n_layers = num_layers(model)
        if isinstance(layers, int | str):
            layers = [layers]
        layers = list(range(n_layers)) if layers is None else [_int_layer(L) for L in layers]
        if not layers:
            raise UnknownLayerError("layers=[] selects no layer.", "pass layers=[L, ...] or leave it unset (all).")
        from .layers import check_layer

        for L in layers:
            check_layer(L, n_layers)
        try:
            acts = collect_activations(
                model, tokenizer, list(positive) + list(negative), layers,
                aggregation=aggregation, batch_size=batch_size, max_length=max_length,
                progress=progress,
            )
        except IndexError as e:
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            rows = getattr(emb, "num_embeddings", "?")
            raise ProbeDataError(
                f"the tokenizer gives token ids the model has no embedding for (the model has {rows} "
                f"token embeddings; the tokenizer has {len(tokenizer) if hasattr(tokenizer, '__len__') else '?'} "
                f"tokens): {e}.",
                "use the tokenizer that belongs to the model (or resize the model's embeddings).") from None
        is_pos = acts.text_index < len(positive)
        directions, diagnostics = {}, {}
        for L in layers:
            A = acts.values[L]
            D, diag = _probe.fit_directions(A[is_pos], A[~is_pos], method=method, k=k)
            directions[L], diagnostics[str(L)] = D, diag
        if names is None:
            names = ["probe"] if D.shape[0] == 1 else [f"probe_pc{i}" for i in range(D.shape[0])]
        prov = Provenance(
            source="probe", model=model_name(model), token_aggregation=aggregation,
            method=method,
            extra={"n_positive": len(positive), "n_negative": len(negative), "k": k,
                   "diagnostics": diagnostics},
        )
        return cls.from_directions(directions, names=names, rtol=rtol, provenance=prov, model=model)

    @classmethod
    def from_sae(
        cls,
        sae: Any,
        latents: Sequence[int],
        *,
        layer: int | None = None,
        model: Any = None,
        names: Sequence[str] | None = None,
        rtol: float = 1e-3,
        on_degenerate: str = "error",
    ) -> Subspace:
        """Directions from SAE decoder rows (sae-lens SAE object or a saved SAE folder).

        The decoder rows ``W_dec[latents]`` are normalized and orthonormalized. The layer comes
        from ``cfg.metadata.hook_name`` (``blocks.L.hook_resid_post`` → L,
        ``blocks.L.hook_resid_pre`` → L − 1); a non-residual hook raises unless ``layer`` is given.
        """
        from .integrations.sae_lens import sae_directions

        info = sae_directions(sae, latents, layer=layer)
        if model is not None:
            from .model import model_hidden_size

            d = model_hidden_size(model)
            if info["d_in"] != d:
                raise HiddenSizeMismatchError(
                    f"the SAE reads vectors of size d_in={info['d_in']} but the model's hidden size "
                    f"is {d}.",
                    "use an SAE trained on this model.",
                )
        D = info["directions"]
        D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-30)
        nm = list(names) if names is not None else [f"latent{i}" for i in info["latents"]]
        prov = Provenance(
            source="sae", model=info.get("model_name"), method="decoder_rows",
            sae={k: info[k] for k in ("release", "sae_id", "path", "hook_name", "latents", "d_in", "d_sae", "architecture") if k in info},
        )
        return cls.from_directions({info["layer"]: D}, names=nm, rtol=rtol,
                                   on_degenerate=on_degenerate, provenance=prov, model=model)

    @classmethod
    def from_persona_vectors(
        cls,
        source: str | Path | Any,
        layers: Iterable[int] | None = None,
        *,
        name: str = "persona",
        model: Any = None,
    ) -> Subspace:
        """Import a Persona Vectors tensor ``[n_layers + 1, d]`` (indexed like ``hidden_states``).

        Index i is our layer i − 1. The last row is HF's ``hidden_states[-1]``, taken after the
        final norm: it is not the last block's output, so it is never imported (ask for layer
        n_layers − 1 and you get an error). ``layers`` (ours) selects which to keep; default:
        −1..n_layers − 2. The vector is kept unnormalized in ``directions``.
        """
        from .layers import layer_from_hidden_states_index

        T = cls._peer_tensor(source, ("vector", "persona_vector", "vectors"))
        if T.shape[0] < 2:
            raise FileFormatError(
                f"a Persona Vectors tensor has n_layers + 1 rows (one per hidden_states index); this one has "
                f"{T.shape[0]}, so it holds no block output (its last row is the post-norm state).",
                "pass the full [n_layers + 1, d] tensor saved by Persona Vectors.")
        n = T.shape[0] - 1
        avail = {layer_from_hidden_states_index(i, n): T[i] for i in range(n)}  # row n: post-norm
        if isinstance(layers, int | str):
            layers = [layers]
        if layers is not None and n - 1 in [_int_layer(L) for L in layers]:
            raise UnknownLayerError(
                f"layer {n - 1} (the last block) is not in a Persona Vectors file: its last row is "
                "hidden_states[-1], taken after the final norm.",
                "use layers up to n_layers - 2, or compute the last block's vector with from_probe.",
            )
        return cls._from_indexed(avail, layers, range(-1, n - 1), name, "persona_vectors", source, model,
                                 extra={"file_rows": T.shape[0], "index_convention": "hidden_states (i -> i-1)"})

    @classmethod
    def from_assistant_axis(
        cls,
        source: str | Path | Any,
        layers: Iterable[int] | None = None,
        *,
        name: str = "assistant_axis",
        model: Any = None,
    ) -> Subspace:
        """Import an Assistant Axis tensor ``[n_layers, d]`` (indexed by block output: i → i)."""
        from .layers import from_assistant_axis_index

        T = cls._peer_tensor(source, ("axis", "assistant_axis", "vector", "direction"))
        if T.shape[0] < 1:
            raise FileFormatError("the Assistant Axis tensor has no rows (it needs one per decoder block).",
                                  "pass the full [n_layers, d] tensor saved by Assistant Axis.")
        avail = {from_assistant_axis_index(i): T[i] for i in range(T.shape[0])}
        return cls._from_indexed(avail, layers, range(T.shape[0]), name, "assistant_axis", source,
                                 model, extra={"file_rows": T.shape[0], "index_convention": "block outputs (i -> i)"})

    @classmethod
    def from_file(
        cls,
        source: str | Path | Any,
        layers: Iterable[LayerKey] | None = None,
        *,
        names: Sequence[str] | None = None,
        model: Any = None,
        rtol: float = 1e-3,
    ) -> Subspace:
        """Plain ``.npy``/``.safetensors``/``.pt`` directions.

        A 2-D array (k x d) needs ``layers``; a 3-D array is ``[layer, k, d]`` indexed by our
        layer numbers (use ``layers`` to select). A safetensors file may instead hold one tensor
        per layer under keys ``"layer.12"``/``"12"`` (or module names).
        """
        path = Path(source) if isinstance(source, str | Path) else None
        per_layer: dict[LayerKey, torch.Tensor] | None = None
        if path is not None and path.suffix == ".safetensors":
            tensors = _io.load_tensors(path)  # refuses an empty file
            if len(tensors) > 1 or next(iter(tensors)).removeprefix("layer.").lstrip("-").isdigit():
                per_layer = {}
                for key, t in tensors.items():
                    s = key.removeprefix("layer.")
                    per_layer[int(s) if s.lstrip("-").isdigit() else key] = t
        if per_layer is None:
            T = _as_tensor(source if path is None else _io.load_peer_tensor(path), str(source))
            if T.ndim == 3:
                per_layer = {i: T[i] for i in range(T.shape[0])}
            elif T.ndim in (1, 2):
                if layers is None:
                    raise SubspaceError(
                        f"{source}: a {T.ndim}-D array does not say which layer it belongs to.",
                        "pass layers=[L] (gradroute convention: L = output of block L).",
                    )
                sub = cls.from_directions(T, names=names, layers=layers, rtol=rtol, model=model,
                                          provenance=Provenance(source="file", extra={"path": str(source)}))
                return sub
            else:
                raise FileFormatError(f"{source}: expected a 1-, 2- or 3-D array, got shape {tuple(T.shape)}.",
                                      "save (k x d) directions with layers=[L], or a [layer, k, d] array.")
        if layers is not None:
            wanted = list(layers)
            missing = [L for L in wanted if L not in per_layer]
            if missing:
                raise UnknownLayerError(f"{source} has no layers {missing}; it has {sort_keys(per_layer)}.",
                                        "pick layers from that list.")
            per_layer = {L: per_layer[L] for L in wanted}
        return cls.from_directions(per_layer, names=names, rtol=rtol, model=model,
                                   provenance=Provenance(source="file", extra={"path": str(source)}))

    @staticmethod
    def _peer_tensor(source: Any, keys: tuple[str, ...]) -> torch.Tensor:
        T = _as_tensor(_io.load_peer_tensor(source, keys) if isinstance(source, str | Path) else source,
                       f"{source}" if isinstance(source, str | Path) else "the tensor")
        if T.ndim != 2 or T.shape[1] == 0:
            raise FileFormatError(
                f"expected a [layers, d] tensor, got shape {tuple(T.shape)}.",
                "pass the per-layer vector tensor of one trait.",
            )
        return T.to(torch.float32)

    @classmethod
    def _from_indexed(cls, avail, layers, default, name, kind, source, model, extra) -> Subspace:
        if isinstance(layers, int | str):
            layers = [layers]
        wanted = list(default) if layers is None else [_int_layer(L) for L in layers]
        missing = [L for L in wanted if L not in avail]
        if not avail:
            raise FileFormatError(f"the {kind} file holds no block-output vectors.",
                                  "pass the full tensor saved by the tool that made it.")
        if missing:
            raise UnknownLayerError(
                f"the {kind} file has no vector for layers {missing} (it covers layers "
                f"{min(avail)}..{max(avail)} in gradroute's convention).",
                "pick layers from that range; see gradroute.layers for the index conversion.",
            )
        prov = Provenance(source=kind, extra={"path": str(source) if isinstance(source, str | Path) else None, **extra})
        return cls.from_directions({L: avail[L] for L in wanted}, names=[name], provenance=prov, model=model)

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
        from .model import model_hidden_size, num_layers
        from .layers import check_layer

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

        ``model`` is named by its config's ``_name_or_path`` and ``model_type``. Clearly differs:
        the two model types differ (the provenance's read from a local directory's
        ``config.json``, or the provenance is itself a model type), or both are hub-style names
        and neither name contains the other (``Qwen2.5-0.5B`` → ``Qwen2.5-0.5B-Instruct`` and
        sae-lens' ``gpt2-small`` → ``gpt2`` count as the same). None without a model in the
        provenance, and where names cannot be compared (an unnamed model, a local path such as a
        checkpoint) and the model types do not differ.
        """
        built = self._provenance.model
        if not isinstance(built, str) or not built.strip():
            return None
        from .model import unwrap_model

        cfg = getattr(unwrap_model(model), "config", None)
        name = str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or "").strip()
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
        """Write ``path/`` with ``subspace.safetensors`` and a ``subspace.json`` sidecar.

        A directory that already holds files is refused unless ``overwrite=True`` (then the
        subspace files in it are replaced)."""
        if not isinstance(path, str | Path):
            raise FileFormatError(f"path must be a str or Path, got {type(path).__name__}.", "pass a directory path.")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileFormatError(f"{path} exists and is not a directory.", "choose another path.")
        if path.is_dir() and any(path.iterdir()) and not overwrite and not self._same_or_partial(path):
            raise FileFormatError(f"{path} already exists and is not empty; saving would overwrite it.",
                                  "choose a new path, or pass overwrite=True (CLI: --force).")
        path.mkdir(parents=True, exist_ok=True)
        _io.save_tensors(path / TENSOR_FILE, self._tensors())
        meta = {
            "format": "gradroute.subspace",
            "format_version": FORMAT_VERSION,
            "layers": [_key_str(L) for L in self.layers],
            "names": {_key_str(L): list(self._names[L]) for L in self.layers},
            "provenance": self._provenance.to_dict(),
            "content_hash": self.content_hash,
            "tensor_sha256": _io.sha256_file(path / TENSOR_FILE),
        }
        meta["checksum"] = _io.sha256_tensors({}, {k: v for k, v in meta.items()})
        _io.write_json(path / META_FILE, meta)
        return path

    def _same_or_partial(self, path: Path) -> bool:
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
        return isinstance(meta, dict) and meta.get("content_hash") == self.content_hash

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        """Read a subspace written by :meth:`save`, verifying its checksums."""
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
        if _io.sha256_file(path / TENSOR_FILE) != meta["tensor_sha256"]:
            raise FileFormatError(
                f"{path / TENSOR_FILE} does not match its sidecar (tensor checksum mismatch): the "
                "file is corrupt or was modified.",
                "restore the original file or rebuild the subspace.",
            )
        if "tensor_sha256" not in meta:
            raise FileFormatError(f"{path / META_FILE} has no tensor_sha256.", "rebuild the subspace.")
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
        sub = cls(bases, dirs, names, prov)
        if sub.content_hash != meta.get("content_hash"):
            raise FileFormatError(f"{path}: content hash mismatch.", "rebuild the subspace.")
        return sub

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


__all__ = ["Subspace", "Provenance", "DegenerateDirectionsError"]
