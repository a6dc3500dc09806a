"""``mode="activation"`` — isolating: gradient routing in activation space, on a subspace.

Gradient routing (Cloud et al., 2024) applied to the persona subspace instead of to neurons.
Let layer l's *span* be the re-orthonormalized union of the persona bases of every layer
L ≥ l, Ũ_l (a write at l stays in the residual stream of every later layer, so a narrower
span would let downstream persona coordinates leak gradient back). For every write into the
residual stream — the token and position embeddings (span Ũ_{−1}) and each block's writers
(attention output and MLP down projections, GPT-2 ``Conv1D``, GPT-NeoX's parallel writers;
span Ũ_l) — with output y on input x:

    forward   y' = y + s · Ũ (C x)          (unchanged while C = 0; C is the adapter, B = Ũ frozen)
    backward  ∂L/∂y ← (I − Ũ Ũᵀ) ∂L/∂y      (the write's in-span component is detached from the base)
              ∂L/∂C  = s · Ũᵀ (∂L/∂y') xᵀ    (x detached: the adapter's input carries no gradient back)

so a loss made only of persona coordinates, at any layer, gives exactly zero gradient to
every base parameter (full weights or the user's own LoRA, whose output is part of y) and
non-zero gradient to the adapters. After every optimizer step the writers' and embeddings'
base parameters are put back to their initial in-span coordinates (Adam's element-wise
scaling and weight decay otherwise re-create an in-span change from in-span-free gradients),
and a user LoRA on a writer keeps ``B ← (I − Ũ Ũᵀ) B``, so ``Ũ Ũᵀ s B A = 0``.

The adapters are parameters of the model (``<model>.gradroute_adapters``), trained by the
user's optimizer: create it after the router, over ``model.parameters()``. Their learning rate
is the optimizer's times ``adapter_lr_multiplier`` (or ``adapter_lr``), applied exactly by
scaling each step's adapter update (``C ← C_prev + m (C − C_prev)``, exact for SGD, momentum,
Adam and AdamW, whose state does not depend on the learning rate). Discarding zeroes C: the
model is then exactly its base. On save the adapter is a plain PEFT LoRA (B = Ũ, A = C).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ... import projection as P
from ...errors import ConfigError
from ...layers import EMBEDDINGS
from ...model import residual_writes, unwrap_model
from ...plan import RoutingPlan, build_plan
from ..route import CoordBlock, Route
from .base import RoutingMode

ADAPTERS_ATTR = "gradroute_adapters"


class _RemoveSpanGrad(torch.autograd.Function):
    """Identity forward; backward ``g ← g − U Uᵀ g`` (the in-span component does not reach y)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(U)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (U,) = ctx.saved_tensors
        U = U.to(g.dtype)
        return g - (g @ U) @ U.T, None


def cumulative_spans(subspace: Any, positions: list[int]) -> dict[int, torch.Tensor]:
    """Ũ_p: the orthonormal basis (d x r) of the union of the bases of every layer L ≥ p."""
    layers = sorted(L for L in subspace.layers if isinstance(L, int))
    out = {}
    for p in positions:
        cols = [subspace.basis(L).double() for L in layers if L >= p]
        if cols:
            U, _ = P.orthonormalize(torch.cat(cols, dim=1).T, on_degenerate="drop")
            out[p] = U.float()
    return out


class _Adapters(nn.Module):
    """Container of the adapters' coordinates, registered on the model so optimizers see them."""

    def __init__(self) -> None:
        super().__init__()
        self.coords = nn.ParameterDict()

    @staticmethod
    def key(module: str) -> str:
        return module.replace(".", "__")


class ActivationMode(RoutingMode):
    name = "activation"
    weights_hold_adapter = False
    captures_gradients = True
    default_lr_multiplier = 30.0

    # ------------------------------------------------------------------ plan
    @classmethod
    def plan(cls, model: nn.Module, subspace: Any, *, side: str = "write", targets: Any = None,
             embeddings: bool = False, spread: int = 0, route_bias: bool | None = None) -> tuple[RoutingPlan, Any]:
        from ...subspace import Subspace

        if side != "write":
            raise ConfigError(
                f"mode='activation' routes the writes into the residual stream; side={side!r} is not supported.",
                "use side='write' (the default), or mode='update' to watch readers.")
        if targets is not None or spread:
            raise ConfigError("mode='activation' routes every residual write; targets= and spread= do not apply.",
                              "drop targets=/spread=, or use mode='update' for a chosen set of modules.")
        if route_bias:
            raise ConfigError("mode='activation' adapters have no bias term.", "drop route_bias=True.")
        if not subspace.layers or not all(isinstance(L, int) for L in subspace.layers):
            raise ConfigError(
                f"mode='activation' needs residual-stream layers (integers), got {list(subspace.layers)}.",
                "build the subspace on residual layers (Subspace.from_probe / from_sae on resid_post hooks).")
        emb, writers = residual_writes(model)
        spans = cumulative_spans(subspace, [EMBEDDINGS] + list(range(len(writers))))
        derived = Subspace.from_directions({p: U.T for p, U in spans.items()}, on_degenerate="drop")
        explicit: dict[str, tuple[int, str]] = {n: (EMBEDDINGS, "embed") for n in emb}
        for i, names in enumerate(writers):
            if i in spans:
                explicit.update({n: (i, "write") for n in names})
        import warnings

        with warnings.catch_warnings():  # a frozen writer (LoRA policy) is routed through its output
            warnings.filterwarnings("ignore", message=".*is frozen.*")
            plan = build_plan(model, derived, targets=explicit, route_bias=False)
        return plan, derived

    @classmethod
    def rebuild_options(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        o = self.options
        self.multiplier = float(o.get("adapter_lr_multiplier") or self.default_lr_multiplier)
        self.adapter_lr = o.get("adapter_lr")
        base = unwrap_model(self.ctx.model)
        container = getattr(base, ADAPTERS_ATTR, None)
        if container is not None:
            raise ConfigError("this model already has activation-routing adapters (a second router?).",
                              "route a model with one router; call router.detach() on the old one first.")
        container = _Adapters()
        dev = next(base.parameters()).device
        self.params: dict[str, nn.Parameter] = {}
        self.pinned: list[CoordBlock] = []
        self.prev: dict[str, torch.Tensor] = {}
        for r in self.ctx.routes:
            t = r.target
            dtype = torch.float64 if r.weight.dtype == torch.float64 else torch.float32
            p = nn.Parameter(torch.zeros(t.adapter_shape, dtype=dtype, device=dev))
            container.coords[_Adapters.key(r.name)] = p
            self.params[r.name] = p
            self.prev[r.name] = r.blocks[0].adapter.clone()
            # the user's LoRA B first (the weight block reads W + s·B·A), then the module's own
            # trainable parameters; frozen ones never move, so they are never touched
            self.pinned += self._user_lora_blocks(r)
            if r.weight.requires_grad:
                self.pinned.append(r.blocks[0])
            wm_bias = getattr(r.module if not hasattr(r.module, "base_layer") else r.module.base_layer, "bias", None)
            if isinstance(wm_bias, nn.Parameter) and wm_bias.requires_grad:
                self.pinned.append(CoordBlock(wm_bias, 0, r))
        base.add_module(ADAPTERS_ATTR, container)
        # saved models hold the base; the adapter is saved as a PEFT LoRA (and in checkpoints'
        # router state), so keep its parameters out of save_pretrained's state dict
        keys = {f"{ADAPTERS_ATTR}.coords.{k}" for k in container.coords}
        base._keys_to_ignore_on_save = set(getattr(base, "_keys_to_ignore_on_save", None) or ()) | keys
        self.container = container
        self.nonzero = False  # no-grad forwards skip the adapters while they are exactly zero
        self.attribution: Any = None
        self.handles = [r.module.register_forward_hook(self._hook(r)) for r in self.ctx.routes]
        self._checked_optimizer = False

    def _user_lora_blocks(self, r: Route) -> list[CoordBlock]:
        """The user's LoRA on this writer: its B's in-span coordinates are kept at zero."""
        out = []
        for attr in ("lora_B", "lora_embedding_B"):
            holder = getattr(r.module, attr, None)
            if holder is None:
                continue
            for name in list(holder.keys()):
                w = holder[name].weight if isinstance(holder[name], nn.Module) else holder[name]
                blk = CoordBlock(w, 0, r)
                blk.lora = True  # type: ignore[attr-defined]
                blk.ref0 = torch.zeros_like(blk.ref0)
                blk.set_coords(blk.ref0)  # PEFT initializes B = 0: a no-op then
                out.append(blk)
        return out

    def resync(self, route: Route) -> None:
        for blk in self.pinned:  # edits outside steps (a checkpoint load) belong to the base
            if blk.route is route and not getattr(blk, "lora", False):
                blk.ref0 = blk.coords()
        route.version = route.versions()

    def probe_layers(self) -> dict[Any, torch.Tensor]:
        # the routes use the cumulative spans; the monitor watches the persona layers themselves
        return {L: self.ctx.subspace.basis(L) for L in self.ctx.subspace.layers}

    def attribution_ready(self, attribution: Any) -> None:
        self.attribution = attribution
        attribution.use_parameter_gradients(self.params)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def check_optimizer(self, stepped: set[int]) -> None:
        missing = [n for n, p in self.params.items() if id(p) not in stepped]
        if missing:
            raise ConfigError(
                f"the optimizer does not train the activation-routing adapters ({len(missing)} of "
                f"{len(self.params)} missing, e.g. {missing[0]!r}): it was probably created before the router.",
                "create the optimizer after GradientRouter(..., mode='activation'), over model.parameters().")
        self._checked_optimizer = True

    def remove(self) -> None:
        """Take the hooks and the adapters' container off the model (the router keeps the
        adapter's coordinates, so it can still be saved as a PEFT LoRA)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        base = unwrap_model(self.ctx.model)
        if getattr(base, ADAPTERS_ATTR, None) is self.container:
            delattr(base, ADAPTERS_ATTR)
            keys = {f"{ADAPTERS_ATTR}.coords.{k}" for k in self.container.coords}
            base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) - keys

    # ------------------------------------------------------------------ forward hook
    def _hook(self, r: Route):
        orient = r.target.orientation
        U32 = r.basis32()
        name = r.name

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not torch.is_tensor(output):
                return None
            x = args[0] if args else None
            grad = torch.is_grad_enabled()
            if not grad and not self.nonzero:
                return None
            U = U32 if U32.device == output.device else U32.to(output.device)
            y = _RemoveSpanGrad.apply(output, U) if grad and output.requires_grad else output
            C = self.params[name]
            if x is None:
                return y
            xin = x.detach()
            out = y + orient.delta_forward(xin, C.to(output.dtype), U.to(output.dtype))
            if grad and self.attribution is not None and out.requires_grad:
                per_row = self.attribution.capture(r, xin, out, module)  # a broadcast embedding comes back per row
                out = out if per_row is None else per_row
            return out
        return hook

    # ------------------------------------------------------------------ the step
    def _lr_multiplier(self) -> float:
        if self.adapter_lr is None:
            return self.multiplier
        opt = self.ctx.optimizer()
        if opt is None:
            return self.multiplier
        mine = {id(p) for p in self.params.values()}
        for g in opt.param_groups:
            if any(id(p) in mine for p in g["params"]):
                return float(self.adapter_lr) / float(g["lr"]) if g["lr"] > 0 else 0.0
        return self.multiplier

    @torch.no_grad()
    def after_step(self) -> dict[str, list[torch.Tensor]]:
        if not self._checked_optimizer:
            if self.ctx.optimizer() is not None:
                self.check_optimizer({id(p) for g in self.ctx.optimizer().param_groups for p in g["params"]})
            elif all(bool((p == 0).all()) for p in self.params.values()) and any(
                    p.grad is not None and bool(p.grad.abs().max() > 0) for p in self.params.values()):
                raise ConfigError(
                    "the activation-routing adapters have gradients but did not change in this step: the "
                    "optimizer was probably created before the router and does not train them.",
                    "create the optimizer after GradientRouter(..., mode='activation'), over model.parameters().")
            else:
                self._checked_optimizer = True
        m = self._lr_multiplier()
        deltas: dict[str, list[torch.Tensor]] = {}
        for r in self.ctx.routes:
            p = self.params[r.name]
            b = r.blocks[0]
            prev = self.prev[r.name]
            new = p.detach().to(r.dtype)
            if m != 1.0:
                new = prev + m * (new - prev)
                p.copy_(new.to(p.dtype))
                new = p.detach().to(r.dtype)   # what the parameter holds
            deltas[r.name] = [new - prev]
            b.adapter = new
            self.prev[r.name] = new.clone()
        for blk in self.pinned:               # the base never moves inside the span
            blk.set_coords(blk.ref0)
        self.nonzero = True  # after a step the adapters may hold something (exact again after discard/merge/load)
        return deltas

    # ------------------------------------------------------------------ the adapter in the model
    def effective(self, block: CoordBlock) -> torch.Tensor:
        return block.effective().to(block.route.dtype) + block.lift(block.adapter)

    @torch.no_grad()
    def set_adapter(self, route: Route, adapters: list[torch.Tensor]) -> None:
        b = route.blocks[0]
        p = self.params[route.name]
        p.copy_(adapters[0].to(p.dtype))
        b.adapter = p.detach().to(route.dtype)
        self.prev[route.name] = b.adapter.clone()

    def cleared(self, route: Route) -> None:
        pass  # the adapter is exactly zero: nothing to hand to the base

    @torch.no_grad()
    def merge(self, route: Route) -> None:
        b = route.blocks[0]
        b.ref0 = b.set_coords(b.ref0 + b.adapter)
        self.set_adapter(route, [torch.zeros_like(b.adapter)])

    def adapter_changed(self) -> None:
        self.nonzero = any(bool(p.abs().max() > 0) for p in self.params.values())

    # ------------------------------------------------------------------ persistence
    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for r in self.ctx.routes:
            self.set_adapter(r, [r.blocks[0].adapter])
        self.adapter_changed()
