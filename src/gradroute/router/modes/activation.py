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

**Post-norm branches** (Gemma 2/3, OLMo 2; only with ``post_norm="first_order"``, refused
otherwise): the write is the post-norm's output
``w = g ⊙ y / rms(y)`` of the writer's output y. The detach and the adapter act on w (the
adapter's input is still the writer's input x); the writer's base weight keeps its initial
coordinates along ``V = orth(diag(g) Ũ)`` (the directions whose change reaches Ũᵀw), and the
post-norm's gain g is held at its initial value while routing. Then, for fixed branch inputs,
``Ũᵀ w_base = Ũᵀ diag(g) W x / rms(W x)`` keeps its numerator exactly; only the shared per-token
``rms`` moves with the writer's out-of-span change: ``Ũᵀ Δw_base = −(Ũᵀw)·Δrms/rms``, a leak of
first order in the step (measured in ``benchmarks/architecture_zoo.py``). Exact isolation would
need the initial writer's output ``W_0 x`` in every forward (a frozen copy of the writers), and
the discarded model would then not be plain weights: this mode keeps plain weights instead.
Such an adapter adds after the norm, so it is not a PEFT LoRA on the writer: saving it as one
is refused.

**Mixture-of-experts blocks** (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE): the write is the block's
output (the gated sum of its experts and shared experts). The detach and the adapter act on it
(the adapter reads the block's input); the base keeps ``Ũᵀ D_e`` of every expert's down
projection (fused ``(E, d, ffn)``, or gpt-oss's ``(E, ffn, d)``), its bias, and the shared
experts' down projections at their initial values, so for fixed gates and inputs the base's
write keeps its in-span part exactly.
The gate is a reader. In the plan the block's write appears as ``<block>.gradroute_write``, a
frozen stand-in Linear; the adapter is not a PEFT LoRA (saving it as one is refused).
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
WRITE_ATTR = "gradroute_write"  # the stand-in writer registered on a mixture-of-experts block


class _StandIn(nn.Linear):
    """A frozen zero Linear (d → d) standing for a mixture-of-experts block's write in the plan
    and the state file: the adapter reads the block's input and adds into its output, the
    block's expert down projections are what the base pins. Never called; not saved."""

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device):
        super().__init__(d, d, bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.weight)
        self.weight.requires_grad_(False)


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
             embeddings: bool = False, spread: int = 0, route_bias: bool | None = None,
             post_norm: str = "refuse") -> tuple[RoutingPlan, Any]:
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
        experts: dict[str, list[tuple[str, int]]] = {}
        post: dict[str, str] | None = {} if post_norm == "first_order" else None
        emb, writers = residual_writes(model, post_norm=post, experts=experts)
        spans = cumulative_spans(subspace, [EMBEDDINGS] + list(range(len(writers))))
        if experts:  # a stand-in writer on each routed mixture-of-experts block (blocks up to the last span)
            base = unwrap_model(model)
            ref = next(base.parameters())
            d = base.get_input_embeddings().weight.shape[1]
            for i, names in enumerate(writers):
                for name in (n for n in names if n in experts and i in spans):
                    block = base.get_submodule(name)
                    if not isinstance(getattr(block, WRITE_ATTR, None), _StandIn):
                        block.add_module(WRITE_ATTR, _StandIn(d, ref.dtype, ref.device))
            writers = [[f"{n}.{WRITE_ATTR}" if n in experts else n for n in names] for names in writers]
        derived = Subspace.from_directions({p: U.T for p, U in spans.items()}, on_degenerate="drop")
        explicit: dict[str, tuple[int, str]] = {n: (EMBEDDINGS, "embed") for n in emb}
        for i, names in enumerate(writers):
            if i in spans:
                explicit.update({n: (i, "write") for n in names})
        import warnings

        with warnings.catch_warnings():  # a frozen writer (LoRA policy) is routed through its output
            warnings.filterwarnings("ignore", message=".*is frozen.*")
            plan = build_plan(model, derived, targets=explicit, route_bias=False, allow_post_norm=True)
        # where each routed write really is, for setup: one trace serves both
        routed = set(plan.modules)
        writes = {"post_norm": {w: n for w, n in (post or {}).items() if w in routed},
                  "experts": {f"{b}.{WRITE_ATTR}": pins for b, pins in experts.items() if f"{b}.{WRITE_ATTR}" in routed}}
        return RoutingPlan(plan.targets, plan.subspace_hash, writes=writes), derived

    @classmethod
    def rebuild_options(cls, meta: dict[str, Any]) -> dict[str, Any]:
        return {"post_norm": (meta.get("mode_state") or {}).get("post_norm", "refuse")}

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
        self.post_norm: dict[str, nn.Module] = {}  # writer -> the post-norm whose output is its write
        post: dict[str, str] = self.ctx.plan.writes.get("post_norm", {})
        experts: dict[str, list[tuple[str, int]]] = self.ctx.plan.writes.get("experts", {})
        self.moe: dict[str, nn.Module] = {}  # stand-in route -> the mixture-of-experts block it stands for
        modules = dict(base.named_modules())
        self.gains: list[tuple[nn.Parameter, torch.Tensor]] = []  # post-norm gains, held while routing
        for r in self.ctx.routes:
            pin = r
            if r.name in experts:
                block = modules[r.name[: -len(WRITE_ATTR) - 1]]
                self.moe[r.name] = block
                for pname, axis in experts[r.name]:
                    param = block.get_parameter(pname)
                    if param.requires_grad:
                        self.pinned.append(CoordBlock(param, axis, r))
            elif r.name in post:
                norm = modules[post[r.name]]
                self.post_norm[r.name] = norm
                pin = self._oblique_route(r, norm)
                g = norm.weight
                if isinstance(g, nn.Parameter) and g.requires_grad:
                    self.gains.append((g, g.detach().clone()))
            t = r.target
            dtype = torch.float64 if r.weight.dtype == torch.float64 else torch.float32
            p = nn.Parameter(torch.zeros(t.adapter_shape, dtype=dtype, device=dev))
            container.coords[_Adapters.key(r.name)] = p
            self.params[r.name] = p
            self.prev[r.name] = r.blocks[0].adapter.clone()
            # the user's LoRA B first (the weight block reads W + s·B·A), then the module's own
            # trainable parameters; frozen ones never move, so they are never touched
            self.pinned += self._user_lora_blocks(r, pin)
            if r.weight.requires_grad and r.name not in self.moe:
                self.pinned.append(pin.blocks[0])
            wm_bias = getattr(r.module if not hasattr(r.module, "base_layer") else r.module.base_layer, "bias", None)
            if isinstance(wm_bias, nn.Parameter) and wm_bias.requires_grad:
                self.pinned.append(CoordBlock(wm_bias, 0, pin))
        base.add_module(ADAPTERS_ATTR, container)
        # saved models hold the base; the adapter is saved as a PEFT LoRA (and in checkpoints'
        # router state), so keep its parameters out of save_pretrained's state dict
        keys = {f"{ADAPTERS_ATTR}.coords.{k}" for k in container.coords} | {f"{n}.weight" for n in self.moe}
        base._keys_to_ignore_on_save = set(getattr(base, "_keys_to_ignore_on_save", None) or ()) | keys
        self.container = container
        self.nonzero = False  # no-grad forwards skip the adapters while they are exactly zero
        self.attribution: Any = None
        if self.post_norm:
            import warnings

            from ...errors import GradrouteWarning

            warnings.warn(
                f"{len(self.post_norm)} writes pass through a post-norm (e.g. {next(iter(self.post_norm.values())).__class__.__name__} "
                f"after {next(iter(self.post_norm))!r}): activation routing isolates them only to first order (the "
                "base's write drifts into the span through the per-token rms; measured in the README's model "
                "families table), so discarding the adapter does not remove everything training put there.",
                GradrouteWarning, stacklevel=4)
        self._inputs: dict[str, torch.Tensor] = {}  # a post-norm writer's input, for the norm's hook
        self.handles = []
        for r in self.ctx.routes:
            if r.name in self.moe:
                self.handles.append(self.moe[r.name].register_forward_hook(self._hook(r), with_kwargs=True))
            elif r.name in self.post_norm:
                self.handles.append(r.module.register_forward_hook(self._keep_input(r)))
                self.handles.append(self.post_norm[r.name].register_forward_hook(self._hook(r)))
            else:
                self.handles.append(r.module.register_forward_hook(self._hook(r)))
        self._checked_optimizer = False

    @staticmethod
    def _oblique_route(r: Route, norm: nn.Module) -> Route:
        """The writer seen through ``V = orth(diag(g) Ũ)``: its weight's coordinates along V are
        what reaches the write's persona coordinates through the post-norm with gain g (read
        off the norm itself: ``norm(1) = g / sqrt(1 + eps)``, so any normalization convention)."""
        with torch.no_grad():
            w = norm.weight
            g = norm(torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device)).reshape(-1).double()
            V, _ = P.orthonormalize((g[:, None] * r.basis().double()).T, on_degenerate="drop")
        if V.shape[1] != r.basis().shape[1]:
            raise ConfigError(f"the post-norm gain after {r.name!r} is zero on the persona directions, so they "
                              "never reach the residual stream.", "check the model's weights.")
        return Route(r.target, r.module, V, r.dtype)

    def _keep_input(self, r: Route):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and torch.is_tensor(args[0]):
                self._inputs[r.name] = args[0]
        return hook

    def _user_lora_blocks(self, r: Route, pin: Route) -> list[CoordBlock]:
        """The user's LoRA on this writer: its B's in-span coordinates are kept at zero."""
        out = []
        for attr in ("lora_B", "lora_embedding_B"):
            holder = getattr(r.module, attr, None)
            if holder is None:
                continue
            for name in list(holder.keys()):
                w = holder[name].weight if isinstance(holder[name], nn.Module) else holder[name]
                blk = CoordBlock(w, 0, pin)
                blk.lora = True  # type: ignore[attr-defined]
                blk.ref0 = torch.zeros_like(blk.ref0)
                blk.set_coords(blk.ref0)  # PEFT initializes B = 0: a no-op then
                out.append(blk)
        return out

    def resync(self, route: Route) -> None:
        for blk in self.pinned:  # edits outside steps (a checkpoint load) belong to the base
            if blk.route.name == route.name and not getattr(blk, "lora", False):
                blk.ref0 = blk.coords()
        if route.name in self.post_norm:
            g = self.post_norm[route.name].weight
            self.gains = [(p, p.detach().clone() if p is g else p0) for p, p0 in self.gains]
        route.version = route.versions()

    def export_problem(self) -> str | None:
        if self.moe:
            some = sorted(self.moe)[:2]
            return (f"the persona adapter of a mixture-of-experts write ({', '.join(some)}"
                    f"{', ...' if len(self.moe) > 2 else ''}) adds to the block's output, so it is not a PEFT LoRA")
        if not self.post_norm:
            return None
        some = sorted(self.post_norm)[:2]
        return (f"the persona adapter of a post-norm write ({', '.join(some)}{', ...' if len(self.post_norm) > 2 else ''}) "
                "adds after the norm, so it is not a PEFT LoRA on the writer")

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
            keys = {f"{ADAPTERS_ATTR}.coords.{k}" for k in self.container.coords} | {f"{n}.weight" for n in self.moe}
            base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) - keys
        for block in self.moe.values():  # the stand-ins go with the routing
            if isinstance(getattr(block, WRITE_ATTR, None), _StandIn):
                delattr(block, WRITE_ATTR)

    # ------------------------------------------------------------------ forward hook
    def _hook(self, r: Route):
        orient = r.target.orientation
        U32 = r.basis32()
        name = r.name

        post = name in self.post_norm
        moe = name in self.moe

        def hook(module: nn.Module, args: tuple, *rest: Any) -> Any:
            output = rest[-1]  # (output,), or (kwargs, output) for a hook registered with_kwargs
            if moe and isinstance(output, tuple) and output and torch.is_tensor(output[0]):
                new = hook(module, args, *rest[:-1], output[0])  # (hidden, router logits): route the hidden part
                return None if new is None else (new, *output[1:])
            if not torch.is_tensor(output):
                return None
            if moe:
                x = args[0] if args else rest[0].get("hidden_states")
            else:
                x = self._inputs.pop(name, None) if post else (args[0] if args else None)
            grad = torch.is_grad_enabled()
            if not grad and not self.nonzero:
                return None
            U = r.basis() if output.dtype == torch.float64 else U32  # float64 weights: a float64 detach
            U = U if U.device == output.device else U.to(output.device)
            y = _RemoveSpanGrad.apply(output, U) if grad and output.requires_grad else output
            C = self.params[name]
            if x is None:
                return y
            xin = x.detach()
            out = y + orient.delta_forward(xin, C.to(output.dtype), U.to(output.dtype))
            if grad and self.attribution is not None and out.requires_grad:
                per_row = self.attribution.capture(r, xin, out, r.module)  # a broadcast embedding comes back per row
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
        for g, g0 in self.gains:              # post-norm gains are held while routing
            g.copy_(g0)
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
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"post_norm": self.options.get("post_norm", "refuse")}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for r in self.ctx.routes:
            self.set_adapter(r, [r.blocks[0].adapter])
        self.adapter_changed()
