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
Adam and AdamW, whose state does not depend on the learning rate). ``adapter_weight_decay`` λ
adds a decoupled decay at the adapter's learning rate: ``C ← C − m η λ C_prev`` (η the
optimizer's learning rate for the adapters' group), on top of any the optimizer applies itself. Discarding zeroes C: the
model is then exactly its base. On save the adapter is a plain PEFT LoRA (B = Ũ, A = C).

**Post-norm branches** (Gemma 2/3, OLMo 2; refused unless ``post_norm`` is ``"exact"`` or
``"first_order"``): the write is the post-norm's output ``w = n(y) = g ⊙ y / rms(y)`` of the
writer's output ``y = W x``. The detach and the adapter act on w (the adapter's input is still
the writer's input x). No change of plain weights can keep ``Ũᵀ w`` fixed for every x: with
``Ũᵀ diag(g) ΔW = 0`` the numerator holds, but ``rms(W x)`` moves with any other change (holding
it for all x needs ``W'ᵀW' = WᵀW``). Hence two options:

- ``post_norm="exact"``: the write's in-span part is taken from a frozen copy of the writer and
  the norm as they were at attach (``W_0``, ``g_0``)::

      w' = (I − Ũ Ũᵀ) n(W x) + Ũ Ũᵀ n_0(W_0 x) + s · Ũ (C x)

  (the frozen branch runs without gradient: x gets none through it, as through the detach).
  The base — writer, norm gain, and the user's LoRA on it — then trains freely and its write's
  in-span part is ``Ũ Ũᵀ n_0(W_0 x)`` exactly, for any x; at attach ``w' = w``. The cost is one
  frozen copy of each routed post-norm writer (o_proj and down_proj of the blocks up to the
  last persona layer) and one more no-grad matmul per forward. The discarded model is this
  construction (exact while the router is attached; kept in checkpoints' router state): the
  plain weights alone are not the discarded model, so ``save_discarded`` refuses it, and
  ``detach()`` warns that it returns to plain weights.
- ``post_norm="first_order"``: plain weights. The writer's base weight keeps its initial
  coordinates along ``V = orth(diag(g) Ũ)`` and the gain g is held while routing; only the shared
  per-token rms moves: ``Ũᵀ Δw_base = −(Ũᵀw)·Δrms/rms``, a leak of first order in the step
  (measured in ``benchmarks/architecture_zoo.py``).

Either adapter adds after the norm, so it is not a PEFT LoRA on the writer: saving it as one
is refused.

**FSDP2** (``fully_shard``, accelerate's FSDP2): the adapters are parameters of the model, so the
router is built before the model is sharded (``gradroute.attach`` is: accelerate shards inside
``train()``) and the root module is sharded too, which shards the adapters with it (refused
otherwise: unsharded adapters would get no gradient averaging across ranks). The forward hooks
read each adapter from the model at call time (FSDP2's all-gathered copy during the forward);
the step reads the small adapters whole (:func:`gradroute.projection.full`) and writes each
rank's slab back; the base pins act on the shards (:mod:`gradroute.router.route`).

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
from ...errors import AdapterError, CheckpointError, ConfigError
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


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen, hook-free copy of ``module`` (``post_norm="exact"``'s ``W_0`` and ``n_0``): not a
    submodule of the model, so neither trained, nor saved by ``save_pretrained``, nor moved by
    ``model.to`` (the hook moves it to its input's device)."""
    import copy

    m = copy.deepcopy(module).eval()  # not a submodule: model.eval()/train() never reach it (no dropout in W_0 x)
    for sub in m.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks,
                      getattr(sub, "_forward_hooks_with_kwargs", {}), getattr(sub, "_forward_pre_hooks_with_kwargs", {})):
            hooks.clear()
    m.requires_grad_(False)
    return m


@torch.no_grad()
def _write(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p ← value`` in place (``value``: the full tensor); a sharded ``p`` takes its slab."""
    P.local(p).copy_(P.local_slab_of(value, p).to(p.dtype))


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
    supports_sharding = True  # adapters sharded with the model; pins act on shards (module docstring)

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
        post: dict[str, str] | None = {} if post_norm in ("first_order", "exact") else None
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
        if any(P.is_sharded(r.weight) for r in self.ctx.routes):
            raise ConfigError(
                "mode='activation' adds its adapters to the model as parameters, but the model is already sharded "
                "(FSDP2: the routed writers are DTensors), so the adapters would not be sharded and averaged with it.",
                "build the router (gradroute.attach / GradientRouter) before fully_shard, then fully_shard the blocks "
                "and the root model.")
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
        self.gain_norms: list[nn.Module] = []  # the norm of each gain (to find it again after sharding)
        self.exact_post_norm = o.get("post_norm") == "exact"
        self.frozen: dict[str, tuple[nn.Module, nn.Module]] = {}  # post_norm="exact": writer -> (W_0, n_0) copies
        for r in self.ctx.routes:
            pin = r
            if r.name in experts:
                block = modules[r.name[: -len(WRITE_ATTR) - 1]]
                self.moe[r.name] = block
                for pname, axis in experts[r.name]:
                    param = block.get_parameter(pname)
                    if param.requires_grad:
                        self.pinned.append(CoordBlock.of(block, pname, axis, r))
            elif r.name in post:
                norm = modules[post[r.name]]
                self.post_norm[r.name] = norm
                if self.exact_post_norm:
                    self.frozen[r.name] = (_frozen_copy(r.module), _frozen_copy(norm))
                else:
                    pin = self._oblique_route(r, norm)
                    g = norm.weight
                    if isinstance(g, nn.Parameter) and g.requires_grad:
                        self.gains.append((g, P.full(g.detach()).clone()))
                        self.gain_norms.append(norm)
            t = r.target
            dtype = torch.float64 if r.weight.dtype == torch.float64 else torch.float32
            p = nn.Parameter(torch.zeros(t.adapter_shape, dtype=dtype, device=dev))
            container.coords[_Adapters.key(r.name)] = p
            self.params[r.name] = p
            self.prev[r.name] = r.blocks[0].adapter.clone()
            # the user's LoRA B first (the weight block reads W + s·B·A), then the module's own
            # trainable parameters; frozen ones never move, so they are never touched
            if r.name in self.frozen:
                continue  # the base trains freely: its write's in-span part comes from the frozen copy
            self.pinned += self._user_lora_blocks(r, pin)
            if r.weight.requires_grad and r.name not in self.moe:
                self.pinned.append(pin.blocks[0])
            wm = r.module.base_layer if hasattr(r.module, "base_layer") else r.module
            wm_bias = getattr(wm, "bias", None)
            if isinstance(wm_bias, nn.Parameter) and wm_bias.requires_grad:
                self.pinned.append(CoordBlock.of(wm, "bias", 0, pin))
        base.add_module(ADAPTERS_ATTR, container)
        # saved models hold the base; the adapter is saved as a PEFT LoRA (and in checkpoints'
        # router state), so keep its parameters out of save_pretrained's state dict
        keys = {f"{ADAPTERS_ATTR}.coords.{k}" for k in container.coords} | {f"{n}.weight" for n in self.moe}
        base._keys_to_ignore_on_save = set(getattr(base, "_keys_to_ignore_on_save", None) or ()) | keys
        self.container = container
        self.nonzero = False  # no-grad forwards skip the adapters while they are exactly zero
        self.attribution: Any = None
        if self.post_norm and not self.exact_post_norm:
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

    @staticmethod
    @torch.no_grad()
    def _frozen_write(frozen: tuple[nn.Module, nn.Module], x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``n_0(W_0 x)``: the post-norm write of the writer and norm frozen at attach."""
        writer, norm = frozen
        ref = next(writer.parameters())
        if ref.device != x.device:
            writer.to(x.device)
            norm.to(x.device)
            ref = next(writer.parameters())
        return norm(writer(x.detach().to(ref.dtype))).to(dtype)  # the copies keep their dtype (model.to(bf16), FSDP2 MP)

    def _module(self, name: str) -> nn.Module:
        return next(r.module for r in self.ctx.routes if r.name == name)

    def _keep_input(self, r: Route) -> _KeepInput:
        return _KeepInput(self._inputs, r.name)

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
            self.gains = [(p, P.full(p.detach()).clone() if p is g else p0) for p, p0 in self.gains]  # whole
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

    def rebind(self) -> bool:
        """After ``fully_shard`` / accelerate's FSDP2 ``prepare``: the adapters, the pinned
        parameters and the held gains are the model's new (DTensor) parameters."""
        changed = False
        for name, old in list(self.params.items()):
            new = self.container.coords[_Adapters.key(name)]
            if new is not old and (P.is_sharded(new) or not P.is_sharded(old)):  # never FSDP2's unsharded copy
                self.params[name] = new
                changed = True
        for blk in self.pinned:
            changed = blk.rebind() or changed
        gains = []
        for (g, g0), norm in zip(self.gains, self.gain_norms):
            new = norm.weight
            if new is not g and (P.is_sharded(new) or not P.is_sharded(g)):
                g, changed = new, True
            gains.append((g, g0))
        self.gains = gains
        if changed:
            routed = any(P.is_sharded(r.weight) for r in self.ctx.routes)
            plain = [n for n, p in self.params.items() if not P.is_sharded(p)]
            if routed and plain:
                raise ConfigError(
                    f"the model is sharded (FSDP2) but the activation-routing adapters are not (e.g. {plain[0]!r}): "
                    "their gradients would not be averaged across ranks, so the ranks' adapters would drift apart.",
                    "fully_shard the root model too (after the blocks), so it shards model.gradroute_adapters.")
            if self.attribution is not None:
                self.attribution.use_parameter_gradients(self.params)
            self._checked_optimizer = False
        return changed

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
        if self.frozen and any(not torch.equal(P.local(p), P.local_slab_of(q.to(P.local(p).device), p))
                               for name, (w0, _) in self.frozen.items()
                               for p, q in zip(self._module(name).parameters(), w0.parameters())):
            import warnings

            from ...errors import GradrouteWarning

            warnings.warn(
                f"detaching post_norm='exact' routing: the {len(self.frozen)} post-norm writes go back to the plain "
                "weights, whose in-span part has moved since attach (the frozen copies held it), so the model is no "
                "longer the routed base.", GradrouteWarning, stacklevel=3)
        self.frozen = {}
        base = unwrap_model(self.ctx.model)
        if getattr(base, ADAPTERS_ATTR, None) is self.container:
            delattr(base, ADAPTERS_ATTR)
            keys = {f"{ADAPTERS_ATTR}.coords.{k}" for k in self.container.coords} | {f"{n}.weight" for n in self.moe}
            base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) - keys
        for block in self.moe.values():  # the stand-ins go with the routing
            if isinstance(getattr(block, WRITE_ATTR, None), _StandIn):
                delattr(block, WRITE_ATTR)

    # ------------------------------------------------------------------ forward hook
    def _hook(self, r: Route) -> _WriteHook:
        return _WriteHook(self, r, "moe" if r.name in self.moe else "post_norm" if r.name in self.post_norm else "linear")

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

    def _group_lr(self) -> float:
        """The optimizer's learning rate for the adapters' parameter group (0 without an optimizer)."""
        opt = self.ctx.optimizer()
        if opt is None:
            return 0.0
        mine = {id(p) for p in self.params.values()}
        for g in opt.param_groups:
            if any(id(p) in mine for p in g["params"]):
                return float(g["lr"])
        return 0.0

    @torch.no_grad()
    def after_step(self) -> dict[str, list[torch.Tensor]]:
        if not self._checked_optimizer:
            if self.ctx.optimizer() is not None:
                self.check_optimizer({id(p) for g in self.ctx.optimizer().param_groups for p in g["params"]})
            elif all(bool((P.full(p.detach()) == 0).all()) for p in self.params.values()) and any(
                    p.grad is not None and bool(P.full(p.grad).abs().max() > 0) for p in self.params.values()):
                raise ConfigError(
                    "the activation-routing adapters have gradients but did not change in this step: the "
                    "optimizer was probably created before the router and does not train them.",
                    "create the optimizer after GradientRouter(..., mode='activation'), over model.parameters().")
            else:
                self._checked_optimizer = True
        m = self._lr_multiplier()
        wd = float(self.options.get("adapter_weight_decay") or 0.0)
        if wd and self.ctx.optimizer() is None:
            raise ConfigError("adapter_weight_decay needs the optimizer's learning rate, and the router knows no optimizer.",
                              "call router.bind_optimizer(optimizer) (gradroute.attach does it for a trainer).")
        decay = m * self._group_lr() * wd
        deltas: dict[str, list[torch.Tensor]] = {}
        for r in self.ctx.routes:
            p = self.params[r.name]
            b = r.blocks[0]
            prev = self.prev[r.name]
            new = P.full(p.detach()).to(r.dtype)  # the whole adapter (small), also when sharded
            if m != 1.0 or decay:
                new = prev + m * (new - prev) - decay * prev
                _write(p, new)
                new = new.to(p.dtype).to(r.dtype)   # what the parameter holds
            deltas[r.name] = [new - prev]
            b.adapter = new
            self.prev[r.name] = new.clone()
        for blk in self.pinned:               # the base never moves inside the span
            blk.set_coords(blk.ref0, reread=False)
        for g, g0 in self.gains:              # post-norm gains are held while routing
            _write(g, g0)
        self.nonzero = True  # after a step the adapters may hold something (exact again after discard/merge/load)
        return deltas

    # ------------------------------------------------------------------ the adapter in the model
    def effective(self, block: CoordBlock) -> torch.Tensor:
        return block.add_lift(block.effective().to(block.route.dtype), block.adapter)

    @torch.no_grad()
    def set_adapter(self, route: Route, adapters: list[torch.Tensor]) -> None:
        b = route.blocks[0]
        p = self.params[route.name]
        _write(p, adapters[0])
        b.adapter = adapters[0].to(p.dtype).to(route.dtype)  # what the parameter holds
        self.prev[route.name] = b.adapter.clone()

    def cleared(self, route: Route) -> None:
        pass  # the adapter is exactly zero: nothing to hand to the base

    @torch.no_grad()
    def merge(self, route: Route) -> None:
        if self.moe or self.post_norm:  # checked for every route, so nothing is merged before refusing
            some = sorted(self.moe or self.post_norm)[0]
            raise AdapterError(
                f"the persona adapter of {some!r} adds to a {'mixture-of-experts block' if self.moe else 'post-norm'}'s "
                "output, which no change of that block's weights reproduces: it cannot be merged into the base.",
                "keep the adapter beside the model (router.save_state), or discard it (router.discard()).")
        b = route.blocks[0]
        b.ref0 = b.set_coords(b.ref0 + b.adapter)
        self.set_adapter(route, [torch.zeros_like(b.adapter)])

    def adapter_changed(self) -> None:
        self.nonzero = any(bool(P.full(p.detach()).abs().max() > 0) for p in self.params.values())

    # ------------------------------------------------------------------ persistence
    @torch.no_grad()
    def sync_state(self) -> None:
        """post_norm="exact": the writers move freely (the in-span write comes from the frozen
        copies), so their base coordinates are read when the state is written, not every step."""
        for r in self.ctx.routes:
            if r.name in self.frozen:
                r.blocks[0].ref0 = r.blocks[0].coords()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``post_norm="exact"``'s frozen writers and norms (``W_0``, ``n_0``) go with the state:
        a resumed run keeps taking the in-span write from the weights of the original attach."""
        tensors = {f"frozen.{name}.{part}.{k}": v.detach().cpu().contiguous()
                   for name, mods in self.frozen.items() for part, m in zip(("writer", "norm"), mods)
                   for k, v in m.state_dict().items()}
        return tensors, {"post_norm": self.options.get("post_norm", "refuse")}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for name, mods in self.frozen.items():
            for part, m in zip(("writer", "norm"), mods):
                prefix = f"frozen.{name}.{part}."
                saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if not saved:
                    raise CheckpointError(f"the router state has no frozen copy of {name!r} ({part}) for "
                                          "post_norm='exact': it was saved by another routing.",
                                          "resume with the post_norm the run was started with (see its router state).")
                m.load_state_dict({k: v.to(p.device, p.dtype) for (k, v), p in
                                   zip(sorted(saved.items()), (m.state_dict()[k] for k in sorted(saved)))})
        for r in self.ctx.routes:
            self.set_adapter(r, [r.blocks[0].adapter])
        self.adapter_changed()


class _KeepInput:
    """Forward hook on a post-norm writer: keeps its input x for the norm's :class:`_WriteHook`."""

    def __init__(self, inputs: dict[str, torch.Tensor], name: str):
        self.inputs, self.name = inputs, name

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if args and torch.is_tensor(args[0]):
            self.inputs[self.name] = args[0]


class _WriteHook:
    """The forward hook on a routed write ``y`` (a writer's, a post-norm's or a mixture-of-experts
    block's output) with writer input x::

        y' = RemoveSpanGrad(y) [+ Ũ Ũᵀ (n_0(W_0 x) − y)]  + s · Ũ (C x)

    (the bracket only for ``post_norm="exact"``). A copy of the model (``copy.deepcopy``,
    ``pickle``) keeps a copy of this hook without the live mode (``__getstate__``): it computes
    the same function with the copy's own adapters, and records nothing (no attribution)."""

    def __init__(self, mode: ActivationMode, r: Route, kind: str):
        self.mode: ActivationMode | None = mode  # None in a copy (``__getstate__``)
        self.route: Route | None = r
        self.name, self.kind = r.name, kind
        self.orient = r.target.orientation
        self.U32, self.U64 = r.basis32(), r.basis()
        # the adapter is read from the model at call time: FSDP2 swaps in its all-gathered copy for
        # the forward (and replaces the parameter when it shards the model after the router is built);
        # a copy of the model reads its own copied container
        self.container = mode.container
        self.key = _Adapters.key(r.name)
        self.frozen = mode.frozen.get(r.name)
        self.inputs = mode._inputs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mode": None, "route": None}

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> Any:
        output = rest[-1]  # (output,), or (kwargs, output) for a hook registered with_kwargs
        moe, frozen, mode = self.kind == "moe", self.frozen, self.mode
        if moe and isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            new = self(module, args, *rest[:-1], output[0])  # (hidden, router logits): route the hidden part
            return None if new is None else (new, *output[1:])
        if not torch.is_tensor(output):
            return None
        if moe:
            x = args[0] if args else rest[0].get("hidden_states")
        else:
            x = self.inputs.pop(self.name, None) if self.kind == "post_norm" else (args[0] if args else None)
        grad = torch.is_grad_enabled()
        if not grad and mode is not None and not mode.nonzero and frozen is None:
            return None  # the adapters are exactly zero: the forward is the plain one
        U = self.U64 if output.dtype == torch.float64 else self.U32  # float64 weights: a float64 detach
        U = U if U.device == output.device else U.to(output.device)
        y = _RemoveSpanGrad.apply(output, U) if grad and output.requires_grad else output
        if x is None:
            if frozen is not None:
                raise ConfigError(f"post_norm='exact' did not see the input of {self.name!r} before its post-norm ran.",
                                  "call the model's forward as a whole (not the norm alone), or use post_norm='first_order'.")
            return y
        Ut = U.to(output.dtype)
        if frozen is not None:  # the in-span part from the frozen branch: y + ŨŨᵀ(n_0(W_0 x) − y)
            y = y + ((ActivationMode._frozen_write(frozen, x, output.dtype) - output.detach()) @ Ut) @ Ut.T
        xin = x.detach()
        C = self.container.coords[self.key]
        out = y + self.orient.delta_forward(xin, C.to(output.dtype), Ut)
        attribution = mode.attribution if mode is not None else None
        if grad and attribution is not None and out.requires_grad:
            per_row = attribution.capture(self.route, xin, out, self.route.module)  # a broadcast embedding comes back per row
            out = out if per_row is None else per_row
        return out
