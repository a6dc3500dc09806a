"""Importers: :class:`~gradroute.subspace.Subspace` objects built from axes, probes on a model's
activations, SAE decoder rows, peers' files (Persona Vectors, Assistant Axis) and plain arrays.

Each is a plain function; ``Subspace.from_probe`` and its siblings call them. All of them end
in :meth:`Subspace.from_directions <gradroute.subspace.Subspace.from_directions>`, which
orthonormalizes (:func:`gradroute.projection.orthonormalize`). Frameworks (transformers,
sae-lens) are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _io
from ..errors import FileFormatError, HiddenSizeMismatchError, SubspaceError, UnknownLayerError
from ..layers import LayerKey, sort_keys
from ._validate import _as_tensor, _index, _int_layer
from .core import Subspace
from .provenance import Provenance

__all__ = ["from_assistant_axis", "from_axes", "from_file", "from_persona_vectors", "from_probe", "from_sae"]


def from_axes(axes: Mapping[LayerKey, Sequence[int]], dim: int,
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
    return Subspace.from_directions(dirs, names=names, provenance=Provenance(source="axes"))


def from_probe(
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
    from .. import probe as _probe
    from ..errors import ProbeDataError
    from ..model import collect_activations, model_name, num_layers

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
    from ..layers import check_layer

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
    return Subspace.from_directions(directions, names=names, rtol=rtol, provenance=prov, model=model)


def from_sae(
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
    from ..integrations.sae_lens import sae_directions

    info = sae_directions(sae, latents, layer=layer)
    if model is not None:
        from ..model import model_hidden_size

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
    return Subspace.from_directions({info["layer"]: D}, names=nm, rtol=rtol,
                               on_degenerate=on_degenerate, provenance=prov, model=model)


def from_persona_vectors(
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
    from ..layers import layer_from_hidden_states_index

    T = _peer_tensor(source, ("vector", "persona_vector", "vectors"))
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
    return _from_indexed(avail, layers, range(-1, n - 1), name, "persona_vectors", source, model,
                             extra={"file_rows": T.shape[0], "index_convention": "hidden_states (i -> i-1)"})


def from_assistant_axis(
    source: str | Path | Any,
    layers: Iterable[int] | None = None,
    *,
    name: str = "assistant_axis",
    model: Any = None,
) -> Subspace:
    """Import an Assistant Axis tensor ``[n_layers, d]`` (indexed by block output: i → i)."""
    from ..layers import from_assistant_axis_index

    T = _peer_tensor(source, ("axis", "assistant_axis", "vector", "direction"))
    if T.shape[0] < 1:
        raise FileFormatError("the Assistant Axis tensor has no rows (it needs one per decoder block).",
                              "pass the full [n_layers, d] tensor saved by Assistant Axis.")
    avail = {from_assistant_axis_index(i): T[i] for i in range(T.shape[0])}
    return _from_indexed(avail, layers, range(T.shape[0]), name, "assistant_axis", source,
                             model, extra={"file_rows": T.shape[0], "index_convention": "block outputs (i -> i)"})


def from_file(
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
            sub = Subspace.from_directions(T, names=names, layers=layers, rtol=rtol, model=model,
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
    return Subspace.from_directions(per_layer, names=names, rtol=rtol, model=model,
                               provenance=Provenance(source="file", extra={"path": str(source)}))


def _peer_tensor(source: Any, keys: tuple[str, ...]) -> torch.Tensor:
    T = _as_tensor(_io.load_peer_tensor(source, keys) if isinstance(source, str | Path) else source,
                   f"{source}" if isinstance(source, str | Path) else "the tensor")
    if T.ndim != 2 or T.shape[1] == 0:
        raise FileFormatError(
            f"expected a [layers, d] tensor, got shape {tuple(T.shape)}.",
            "pass the per-layer vector tensor of one trait.",
        )
    return T.to(torch.float32)


def _from_indexed(avail, layers, default, name, kind, source, model, extra) -> Subspace:
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
    return Subspace.from_directions({L: avail[L] for L in wanted}, names=[name], provenance=prov, model=model)
