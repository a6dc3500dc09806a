"""The routing plan: which parameters are split, along which axis, with which basis.

A :class:`RouteTarget` says, for one module, which subspace layer's basis applies and which
axis of its weight is the residual dimension:

=========  ===========  ==========================  ======  ==============================
side       module       weight shape                axis    in-subspace part of ΔW
=========  ===========  ==========================  ======  ==============================
write      Linear       (d, d_in)                   0       U Uᵀ ΔW
write      GPT-2 Conv1D (d_in, d)  (transposed)     1       ΔW U Uᵀ
read       Linear       (d_out, d)                  1       ΔW V Vᵀ
read       GPT-2 Conv1D (d, d_out)                  0       V Vᵀ ΔW
embed      Embedding    (vocab, d)                  1       ΔE U Uᵀ
=========  ===========  ==========================  ======  ==============================

Writers of block L use layer L's basis, readers of block L use layer L − 1's, the input
embedding writes layer −1 (see :mod:`gradroute.layers`). ``spread`` lets a layer's basis
cover blocks up to ``spread`` away that have no basis of their own (nearest layer wins).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .errors import (
    ConfigError,
    GradrouteWarning,
    HiddenSizeMismatchError,
    NoTargetError,
    RoutingError,
    UnknownLayerError,
    UnsupportedModuleError,
)
from .layers import EMBEDDINGS, LayerKey, reader_layer, writer_layer
from .model import io_dims, module_kind, trainable_lora_parameters, weight_module  # noqa: F401  (re-exported)
from .orientation import Orientation, orientation, residual_axis  # noqa: F401  (re-exported)
from .subspace import Subspace

SIDES = ("write", "read", "both")


@dataclass(frozen=True)
class RouteTarget:
    """One routed module."""

    module: str
    layer: LayerKey
    side: str  # write | read | embed
    kind: str  # linear | conv1d | embedding
    axis: int
    weight_shape: tuple[int, int]
    rank: int
    block: int | None = None
    bias: bool = False

    @property
    def orientation(self) -> Orientation:
        """How this module's weight meets the residual stream (axes, LoRA layout, contraction)."""
        return orientation(self.kind, self.side)

    @property
    def adapter_shape(self) -> tuple[int, int]:
        """Shape of the adapter's coordinates: the weight shape with ``axis`` set to the rank."""
        return self.orientation.adapter_shape(self.weight_shape, self.rank)

    @property
    def adapter_params(self) -> int:
        a, b = self.adapter_shape
        return a * b + (self.rank if self.bias else 0)


class RoutingPlan:
    """An ordered, inspectable list of :class:`RouteTarget`.

    ``writes``: for a target whose write into the residual stream is not its own output, where
    the write really is — ``{"post_norm": {writer: norm}, "experts": {block: [(param, axis)]}}``
    (activation mode; :func:`gradroute.model.residual_writes`)."""

    def __init__(self, targets: Iterable[RouteTarget], subspace_hash: str,
                 writes: Mapping[str, Mapping[str, Any]] | None = None):
        self.targets: tuple[RouteTarget, ...] = tuple(targets)
        self.subspace_hash = subspace_hash
        self.writes: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (writes or {}).items()}
        names = [t.module for t in self.targets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RoutingError(
                f"modules {sorted(dup)} would be routed twice.",
                "route each module on one side only (explicit targets, or side='write'/'read').",
            )

    def __iter__(self) -> Iterator[RouteTarget]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, name: str) -> RouteTarget:
        for t in self.targets:
            if t.module == name:
                return t
        raise KeyError(name)

    @property
    def modules(self) -> list[str]:
        return [t.module for t in self.targets]

    @property
    def layers(self) -> list[LayerKey]:
        seen: list[LayerKey] = []
        for t in self.targets:
            if t.layer not in seen:
                seen.append(t.layer)
        return seen

    @property
    def adapter_params(self) -> int:
        return sum(t.adapter_params for t in self.targets)

    def fingerprint(self) -> str:
        """Identity of the plan (independent of target order)."""
        rows = sorted((asdict(t) for t in self.targets), key=lambda d: d["module"])
        blob = json.dumps(rows, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.targets]

    def summary(self) -> str:
        """Table: module, kind, side, basis layer, weight shape, rank, adapter parameters."""
        w = max([len(t.module) for t in self.targets] + [6])
        rows = [f"{'module':<{w}}  {'kind':<9} {'side':<5} {'layer':>6} {'weight':>12} {'k':>3} {'adapter':>9}"]
        for t in self.targets:
            shape = "x".join(map(str, t.weight_shape))
            rows.append(f"{t.module:<{w}}  {t.kind:<9} {t.side:<5} {t.layer!s:>6} {shape:>12} "
                        f"{t.rank:>3} {t.adapter_params:>9}" + ("  +bias" if t.bias else ""))
        rows.append(f"{len(self.targets)} modules, {self.adapter_params} adapter parameters")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"RoutingPlan({len(self.targets)} modules, layers={self.layers})"


def _nearest_layer(position: int, available: list[int], spread: int) -> int | None:
    if position in available:
        return position
    best = None
    for L in available:
        dist = abs(L - position)
        if dist <= spread and (best is None or dist < abs(best - position)):
            best = L
    return best


def build_plan(
    model: nn.Module,
    subspace: Subspace,
    *,
    side: str = "write",
    targets: Iterable[str] | Mapping[str, tuple[LayerKey, str]] | None = None,
    embeddings: bool = False,
    spread: int = 0,
    allow_post_norm: bool = False,
    route_bias: bool | None = None,
) -> RoutingPlan:
    """Find the modules to route.

    - ``targets=None``: the residual writers (``side="write"``), readers (``"read"``) or both of
      every block that has a basis, found from the model's dataflow (see
      :func:`gradroute.model.block_io_modules`); for string layer keys, the
      module of that name is the writer.
    - ``targets=[names or globs]``: those modules; the side comes from ``side`` (``"both"``:
      from the dataflow), the layer from the block that contains them.
    - ``targets={name: (layer, side)}``: fully explicit.
    - ``embeddings=True`` also routes the input embedding with layer −1's basis.
    - a writer whose output reaches the residual stream only through a post-norm (Gemma 2/3,
      OLMo 2) is refused (:class:`~gradroute.errors.RoutingError`), named or found, unless
      ``allow_post_norm`` (activation mode, which routes the norm's output instead).
    - ``route_bias``: route writers' biases too (default: when every writer has one).
    """
    from .model import unwrap_model

    if side not in SIDES:
        raise ConfigError(f"side must be one of {SIDES}, got {side!r}.")
    if isinstance(spread, bool) or not isinstance(spread, int) or spread < 0:
        raise ConfigError(f"spread must be an integer >= 0, got {spread!r}.",
                          "pass spread=0 (each layer's own basis only) or spread=N to let a basis cover N blocks around it.")
    if isinstance(targets, str):
        targets = [targets]  # one module name or glob
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    int_layers = sorted(L for L in subspace.layers if isinstance(L, int))
    chosen: list[tuple[str, LayerKey, str, int | None]] = []  # (module, layer, side, block)

    def basis_for(position: int) -> int | None:
        return _nearest_layer(position, int_layers, spread)

    from .model import block_io_modules, decoder_layers_path

    prefix: str | None = None  # the decoder blocks' path: a module's block index comes from its name
    if int_layers or targets is not None:
        try:
            prefix = decoder_layers_path(model) + "."
        except UnknownLayerError:
            if int_layers and targets is None:
                raise
    # the writers and readers, traced from the dataflow: needed to choose modules by side (never
    # when every target is named with its layer and side)
    block_info = None
    if (targets is None and int_layers) or (targets is not None and not isinstance(targets, Mapping)
                                             and side == "both" and prefix is not None):
        block_info = block_io_modules(model)

    def block_of(name: str) -> int | None:
        if prefix is None or not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    if isinstance(targets, Mapping):
        for name, spec in targets.items():
            if not (isinstance(spec, tuple | list) and len(spec) == 2):
                raise ConfigError(f"targets[{name!r}] must be (layer, side), got {spec!r}.")
            layer, s = spec
            if s not in ("write", "read", "embed"):
                raise ConfigError(f"targets[{name!r}]: side must be 'write', 'read' or 'embed', got {s!r}.")
            if layer not in subspace:
                raise UnknownLayerError(f"targets[{name!r}] uses layer {layer!r}, which the subspace lacks "
                                        f"(it has {list(subspace.layers)}).")
            chosen.append((name, layer, s, block_of(name)))
    elif targets is not None:
        names: list[str] = []
        for pat in targets:
            hits = [n for n in modules if n == pat or fnmatch.fnmatchcase(n, pat)]
            hits = [n for n in hits if module_kind(modules[n]) is not None or n == pat]
            if not hits:
                raise NoTargetError(f"no module matches target {pat!r}.",
                                    "print(dict(model.named_modules()).keys()) to see the names.")
            names += [n for n in hits if n not in names]
        for name in names:
            b = block_of(name)
            if b is None:
                raise NoTargetError(
                    f"{name!r} is not inside a decoder block, so its layer is unknown.",
                    "pass targets={name: (layer, side)} to give the layer explicitly.",
                )
            s = side
            if s == "both":
                io = block_info[b]  # type: ignore[index]
                s = "write" if name in io["writers"] else "read" if name in io["readers"] else None
                if s is None:
                    raise NoTargetError(f"{name!r} neither writes nor reads the residual stream.")
            position = writer_layer(b) if s == "write" else reader_layer(b)
            layer = basis_for(position)
            if layer is None:
                raise NoTargetError(
                    f"{name!r} ({'writer' if s == 'write' else 'reader'} of block {b}) needs the basis of "
                    f"layer {position}, "
                    f"which the subspace lacks (it has {int_layers}).",
                    "add that layer to the subspace, or pass spread=N to let a neighbour's basis cover it.",
                )
            chosen.append((name, layer, s, b))
    else:
        if block_info is not None:
            for b, io in enumerate(block_info):
                if side in ("write", "both"):
                    layer = basis_for(writer_layer(b))
                    if layer is not None:
                        chosen += [(n, layer, "write", b) for n in io["writers"]]
                if side in ("read", "both"):
                    layer = basis_for(reader_layer(b))
                    if layer is not None:
                        chosen += [(n, layer, "read", b) for n in io["readers"]]
            for L in int_layers:
                if L == EMBEDDINGS and not embeddings and side == "write":
                    raise NoTargetError(
                        "the subspace has layer -1 (the embeddings), which no block writes.",
                        "pass embeddings=True to route the input embedding, or drop layer -1.",
                    )
                if L != EMBEDDINGS and not any(c[1] == L for c in chosen):
                    raise NoTargetError(
                        f"layer {L} has a basis but no {side}-side module was found for it.",
                        "check the layer index, or pass targets=[...] explicitly.",
                    )
        for L in subspace.layers:
            if isinstance(L, str):
                if L not in modules:
                    raise NoTargetError(f"the subspace has key {L!r} but the model has no such module.",
                                        "string keys name the module that writes that space.")
                chosen.append((L, L, "write", None))
    if embeddings:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = next((n for n, m in modules.items() if m is emb), None)
        if name is None:
            raise NoTargetError("the model has no input embedding module to route.")
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None and getattr(out_emb, "weight", None) is emb.weight:
            raise RoutingError(
                f"the input embedding {name!r} is tied to the output head: routing it would move the "
                "head too, which a PEFT LoRA on the embedding cannot represent.",
                "untie them first (config.tie_word_embeddings=False and give lm_head its own copy of "
                "the weight), or route without embeddings=True.",
            )
        layer = basis_for(EMBEDDINGS)
        if layer is None:
            raise NoTargetError(
                "embeddings=True needs the basis of layer -1 (the embedding output).",
                "add layer -1 to the subspace, or pass spread=1 to use layer 0's basis.",
            )
        chosen.append((name, layer, "embed", None))

    # writers found by the tracer (block_info) were checked there; named ones are checked here
    named = [c[0] for c in chosen if c[2] == "write" and (block_info is None or c[3] is None)]
    if not allow_post_norm and named:
        from .model import post_norm_writers

        behind = {n: norm for n, norm in post_norm_writers(model).items() if n in named}
        if behind:
            name, norm = next(iter(behind.items()))
            raise RoutingError(
                f"{name!r}'s output reaches the residual stream only through the post-norm {norm!r} (g ⊙ y / rms(y)), "
                f"so its weights do not live in the residual basis: splitting them by U routes the wrong space "
                f"({len(behind)} such writer(s) among the targets).",
                "use mode='activation' with post_norm='exact' for this model (README: model families).")
    out: list[RouteTarget] = []
    writers_with_bias = []
    for name, layer, s, b in chosen:
        if name not in modules:
            raise NoTargetError(f"the model has no module {name!r}.")
        mod = modules[name]
        kind = module_kind(mod)
        if kind is None:
            raise UnsupportedModuleError(
                f"{name!r} is a {type(mod).__name__}; gradroute routes nn.Linear, GPT-2 Conv1D and "
                "nn.Embedding weights.",
                "target the Linear/Conv1D layers inside it instead.",
            )
        if kind == "embedding":
            s = "embed"
        elif s == "embed":
            raise ConfigError(f"{name!r} is a {kind}, not an embedding.")
        axis = orientation(kind, s).axis
        W = weight_module(mod).weight
        d = subspace.dim(layer)
        if W.shape[axis] != d:
            raise HiddenSizeMismatchError(
                f"{name!r} ({kind}, {s} side) has residual dimension {W.shape[axis]} on axis {axis} "
                f"but layer {layer!r}'s basis has dimension {d}.",
                "use a subspace built for this model, or check the side (write/read).",
            )
        if not W.requires_grad and not trainable_lora_parameters(mod):
            warnings.warn(f"{name!r} is frozen (requires_grad=False) and carries no trainable LoRA: "
                          "nothing will be routed there.", GradrouteWarning, stacklevel=2)
        has_bias = s == "write" and getattr(weight_module(mod), "bias", None) is not None
        if s == "write":
            writers_with_bias.append(has_bias)
        out.append(RouteTarget(module=name, layer=layer, side=s, kind=kind, axis=axis,
                               weight_shape=(W.shape[0], W.shape[1]), rank=subspace.rank(layer),
                               block=b, bias=has_bias))
    if not out:
        raise NoTargetError("nothing to route: the plan is empty.", "check the subspace layers and side.")
    n_write = sum(t.side == "write" for t in out)
    if route_bias is None:
        # PEFT's lora_bias is one switch for the whole adapter, and embeddings cannot take it
        route_bias = n_write > 0 and all(writers_with_bias) and not any(t.side != "write" for t in out)
    elif route_bias and (not all(writers_with_bias) or any(t.side != "write" for t in out)):
        raise ConfigError(
            "route_bias=True needs every routed module to be a writer with a bias (PEFT's "
            "lora_bias is one switch for the whole adapter).",
            "pass route_bias=False, or route only writers that have biases.",
        )
    out = [RouteTarget(**{**asdict(t), "bias": bool(route_bias and t.bias)}) for t in out]
    return RoutingPlan(out, subspace.content_hash)
