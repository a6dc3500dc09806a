"""``GradientRouter``: split every weight update into base weights and a persona adapter.

For each routed weight W (see :mod:`gradroute.plan` for the sides and axes) with basis U:

    A      = Uᵀ W_t − Uᵀ W_0                  the adapter: in-subspace coordinates (k x d_in)
    W_base = W_t − U A                       the base weights (no in-subspace change:
                                             Uᵀ(W_base − W_0) = 0)
    ΔA_t   = A_t − A_{t−1}                   the step's in-subspace update, accounted per step

The model always holds the effective weights ``W_base + U A``; A is kept as a k x d_in shadow
tensor per module next to the cached initial coordinates ``Uᵀ W_0`` (2·k·d_in floats per
module, no copy of any weight matrix) and is materialized as a PEFT LoRA on save
(B = U, A = the coordinates; see :mod:`gradroute.integrations.peft`).

Modes:

- ``"update"`` (default): training is untouched. After each optimizer step the step's
  in-subspace update is read off the new weights. Exact for any optimizer (momentum, Adam
  state, weight decay, clipping, accumulation, schedules), because it acts on the update.
- ``"gradient"``: the adapter is trained live with its own optimizer (AdamW by default, its
  own state, LR = the main optimizer's LR × ``adapter_lr_multiplier``). Right before each
  optimizer step the gradient G is split: the adapter gets ``Uᵀ G``, the base optimizer gets
  ``G − U Uᵀ G``; after the step the base update's in-subspace residue (which Adam's
  element-wise scaling and weight decay create) is removed, so the base never moves inside
  span(U), exactly, under any optimizer.

Per-environment adapters: ``step(env_weights=...)`` splits ΔA_t across environments by
shares that sum to one (float64 accumulators), so each environment's adapter can be dropped
alone (``discard(env=...)``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import projection as P
from .errors import AdapterError, ConfigError, GradrouteWarning, PrecisionError, RoutingError
from .layers import LayerKey
from .plan import RouteTarget, RoutingPlan, build_plan, weight_module
from .attribution import UNATTRIBUTED
from .subspace import Subspace

MODES = ("update", "gradient")
STATE_FORMAT = "gradroute.router_state"
STATE_FILE = "router_state.safetensors"
STATE_META = "router.json"

# relative in-subspace residue (vs the base's own change) that weights stored in this dtype
# can be relied on to keep, once the base is materialized (discard, save, gradient mode)
_ACHIEVABLE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class _Route:
    """State of one routed module: basis, initial coordinates, adapter, per-env adapters.

    Bookkeeping (``ref0`` = Uᵀ W_0, the adapter A, per-env shares) is kept in ``dtype``
    (float64 by default): float32 storage of W rounds each entry by ~6e-8·|W|, which in RL
    (tiny updates) can be larger than the in-subspace update being accounted.
    """

    CHUNK_BYTES = 64 << 20  # bound on the temporary copy when converting W to ``dtype``

    def __init__(self, target: RouteTarget, module: nn.Module, U: torch.Tensor, dtype: torch.dtype):
        self.target = target
        wm = weight_module(module)
        self.weight: nn.Parameter = wm.weight
        self.bias: nn.Parameter | None = wm.bias if target.bias else None
        self.dtype = dtype
        self.U = P.refine_basis(U, dtype).to(self.weight.device)
        self._U32: torch.Tensor | None = None
        self.axis = target.axis
        self.ref0 = self.coords()                  # Uᵀ W_0
        self.adapter = torch.zeros_like(self.ref0)  # A
        self.ref0_b = self.coords_b()
        self.adapter_b = None if self.ref0_b is None else torch.zeros_like(self.ref0_b)
        self.env: dict[str, torch.Tensor] = {}
        self.env_b: dict[str, torch.Tensor] = {}
        self.param_A: nn.Parameter | None = None  # gradient mode: the adapter as a trainable tensor
        self.param_Ab: nn.Parameter | None = None
        self.version = self._versions()

    def _basis(self) -> torch.Tensor:
        if self.U.device != self.weight.device:
            self.follow_device()
        return self.U

    def follow_device(self) -> None:
        """Move the basis and all bookkeeping to the weight's device (after ``model.to(...)``)."""
        dev = self.weight.device
        if self.U.device == dev and self.ref0.device == dev:
            return
        self.U = self.U.to(dev)
        self._U32 = None
        self.ref0, self.adapter = self.ref0.to(dev), self.adapter.to(dev)
        if self.ref0_b is not None:
            self.ref0_b, self.adapter_b = self.ref0_b.to(dev), self.adapter_b.to(dev)
        self.env = {e: t.to(dev) for e, t in self.env.items()}
        self.env_b = {e: t.to(dev) for e, t in self.env_b.items()}
        for p in (self.param_A, self.param_Ab):
            if p is not None and p.device != dev:
                p.data = p.data.to(dev)

    def _slabs(self, x: torch.Tensor, axis: int) -> list[torch.Tensor]:
        """Views of ``x`` split along its non-residual axis, each small enough to convert to
        the bookkeeping dtype (bounds the temporary memory for large weights)."""
        if x.ndim == 1:
            return [x]
        other = 1 - axis
        per_slab = max(1, self.CHUNK_BYTES // (8 * x.shape[axis]))
        return list(x.split(per_slab, dim=other))

    def _coords_of(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """``Uᵀ x`` along ``axis`` in the bookkeeping dtype."""
        x = x.detach()
        parts = [P.coords(sl.to(self.dtype), self._basis(), axis) for sl in self._slabs(x, axis)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1 - axis)

    def _basis32(self) -> torch.Tensor:
        if self._U32 is None or self._U32.device != self.weight.device:
            self._U32 = self._basis().to(torch.float32)
        return self._U32

    @torch.no_grad()
    def split(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """In place ``x ← x − U Uᵀ x``; returns ``Uᵀ x`` (in the bookkeeping dtype).

        Used on gradients, where float32 arithmetic suffices: the base weights' exact
        orthogonality is enforced afterwards by :meth:`set_coords`."""
        U = self._basis32()
        c = P.coords(x, U, axis)
        x.sub_(P.lift(c, U, axis).to(x.dtype))
        return c.to(self.dtype)

    @torch.no_grad()
    def set_coords(self, x: torch.Tensor, axis: int, target: torch.Tensor) -> torch.Tensor:
        """In place ``x ← x + U (target − Uᵀ x)``: move ``x``'s in-subspace coordinates to
        ``target``, leaving its orthogonal part alone; returns the coordinates ``x`` realizes
        after rounding to its dtype, read in the bookkeeping dtype.

        The correction is computed in float32 (its ~eps·‖x‖ error only nudges where the
        coordinates land); the exact re-read is what the caller records, so the base
        ``x − U A`` keeps its coordinates exactly."""
        U = self._basis32()
        fix = target.to(torch.float32) - P.coords(x, U, axis)
        x.add_(P.lift(fix, U, axis).to(x.dtype))
        return self._coords_of(x, axis)

    def coords(self) -> torch.Tensor:
        return self._coords_of(self.weight, self.axis)

    def coords_b(self) -> torch.Tensor | None:
        return None if self.bias is None else self._coords_of(self.bias, 0)

    def lift(self, C: torch.Tensor) -> torch.Tensor:
        return P.lift(C.to(self.dtype), self._basis(), self.axis)

    def lift_b(self, c: torch.Tensor) -> torch.Tensor:
        return P.lift(c.to(self.dtype), self._basis(), 0)

    def _versions(self) -> tuple[int, int]:
        return (self.weight._version, -1 if self.bias is None else self.bias._version)

    def realize(self, A: torch.Tensor, A_b: torch.Tensor | None) -> None:
        """Make the weights hold ``Uᵀ W_0 + A`` inside span(U) (orthogonal part untouched) and
        set the adapter to what they realize after rounding, so that ``W − U A`` keeps exactly
        the initial in-subspace coordinates."""
        self.adapter = self.set_coords(self.weight.data, self.axis, self.ref0 + A) - self.ref0
        if self.bias is not None and A_b is not None:
            self.adapter_b = self.set_coords(self.bias.data, 0, self.ref0_b + A_b) - self.ref0_b
        self.version = self._versions()

    def norm_sq(self, env: str | None = None) -> float:
        if env is None:
            A, b = self.adapter, self.adapter_b
        else:
            A, b = self.env.get(env), self.env_b.get(env)
            if A is None:
                return 0.0
        s = float(A.double().pow(2).sum())
        if b is not None:
            s += float(b.double().pow(2).sum())
        return s


@dataclass
class AdapterNorm:
    """Frobenius norm of the adapter's weight delta ``‖U A‖ = ‖A‖`` (U orthonormal)."""

    total: float
    per_layer: dict[LayerKey, float] = field(default_factory=dict)
    per_module: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What one routed optimizer step did."""

    step: int
    update_norm: float                          # ‖ΔA_t‖ over all modules
    update_norm_per_layer: dict[LayerKey, float]
    adapter_norm: float                         # ‖A_t‖ after the step
    adapter_norm_per_layer: dict[LayerKey, float]
    env_shares: dict[str, float] = field(default_factory=dict)   # share of ΔA_t per env (global)
    nonfinite: bool = False
    deltas: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # ΔA_t per module
    attribution: Any = None  # AttributionStep when the router attributes by environment


def _innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"{type(opt).__name__} is not a torch optimizer.",
                          "pass the torch.optim optimizer that steps the model (or a wrapper with .optimizer).")
    return opt


class GradientRouter:
    """Split each optimizer step's update of the planned weights into base + adapter.

    Plain PyTorch loop::

        router = gr.GradientRouter(model, sub, mode="update", optimizer=opt)
        loss.backward(); opt.step(); router.step(env_weights=...); opt.zero_grad()

    In a transformers/TRL ``Trainer`` add ``router.callback()`` (or use :func:`gradroute.attach`).

    Parameters: ``side``/``targets``/``embeddings``/``spread``/``route_bias`` choose the modules
    (:func:`gradroute.plan.build_plan`); ``optimizer`` lets the router tell real optimizer
    steps from repeated ``step()`` calls and, in gradient mode, split gradients right before the
    step; ``adapter_lr``, ``adapter_lr_multiplier``, ``adapter_weight_decay`` configure the
    adapter's own AdamW in gradient mode; ``tolerance`` is the relative in-subspace residue the
    base weights must stay under (default: what the weights' dtype can hold).
    """

    def __init__(
        self,
        model: nn.Module,
        subspace: Subspace,
        mode: str = "update",
        *,
        side: str = "write",
        targets: Any = None,
        embeddings: bool = False,
        spread: int = 0,
        route_bias: bool | None = None,
        optimizer: Any = None,
        adapter_lr: float | None = None,
        adapter_lr_multiplier: float = 1.0,
        adapter_weight_decay: float = 0.0,
        adapter_betas: tuple[float, float] = (0.9, 0.999),
        tolerance: float | None = None,
        precision: str = "float64",
        attribution: bool = False,
        envs: list[str] | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
        if precision not in ("float64", "float32"):
            raise ConfigError(f"precision must be 'float64' or 'float32', got {precision!r}.")
        if adapter_lr_multiplier <= 0 or (adapter_lr is not None and adapter_lr <= 0):
            raise ConfigError("adapter learning rates must be positive.")
        from .integrations.transformers import unwrap_model

        self.model = model
        self.subspace = subspace
        self.mode = mode
        base = unwrap_model(model)
        if any(isinstance(L, int) for L in subspace.layers):
            subspace.validate_for(base)
        self.plan: RoutingPlan = build_plan(base, subspace, side=side, targets=targets,
                                            embeddings=embeddings, spread=spread, route_bias=route_bias)
        modules = dict(base.named_modules())
        self.precision = getattr(torch, precision)
        self._routes = [_Route(t, modules[t.module], subspace.basis(t.layer), self.precision) for t in self.plan]
        self._by_name = {r.target.module: r for r in self._routes}
        self.tolerance = self._check_precision(tolerance)
        self.steps = 0
        self._opt_steps = 0
        self._seen_opt_steps = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._hooks: list[Any] = []
        self._split_pending = False
        self.adapter_lr = adapter_lr
        self.adapter_lr_multiplier = adapter_lr_multiplier
        self._adapter_opt: torch.optim.Optimizer | None = None
        self._envs: list[str] = []
        if mode == "gradient":
            params = []
            for r in self._routes:
                r.param_A = nn.Parameter(r.adapter, requires_grad=True)
                params.append(r.param_A)
                if r.adapter_b is not None:
                    r.param_Ab = nn.Parameter(r.adapter_b, requires_grad=True)
                    params.append(r.param_Ab)
            self._adapter_opt = torch.optim.AdamW(params, lr=adapter_lr or 1e-3, betas=adapter_betas,
                                                  weight_decay=adapter_weight_decay)
        self.monitor: Any = None  # a DriftMonitor attaches itself here
        self.attribution = None
        if attribution or envs is not None:
            from .attribution import Attribution

            self.attribution = Attribution(self, envs)
        if optimizer is not None:
            self.bind_optimizer(optimizer)

    # ------------------------------------------------------------------ setup
    def _check_precision(self, tolerance: float | None) -> float:
        worst = max(_ACHIEVABLE.get(r.weight.dtype, 1e-2) for r in self._routes)
        if tolerance is None:
            return worst
        if not (0 < tolerance < 1):
            raise ConfigError(f"tolerance must be in (0, 1), got {tolerance}.")
        if tolerance < worst:
            dtypes = sorted({str(r.weight.dtype) for r in self._routes})
            raise PrecisionError(
                f"the routed weights are {', '.join(dtypes)}: the base weights' in-subspace residue "
                f"can only be kept below about {worst:g} (relative), not tolerance={tolerance:g}.",
                "keep float32 master weights (mixed-precision training with fp32 parameters), or "
                f"pass tolerance>={worst:g}.",
            )
        return tolerance

    def bind_optimizer(self, optimizer: Any) -> None:
        """Watch ``optimizer``: count its real steps and, in gradient mode, split gradients
        right before each step (after clipping and unscaling)."""
        opt = _innermost_optimizer(optimizer)
        if opt is self._optimizer:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._optimizer = opt

        def post(o, args, kwargs):
            self._opt_steps += 1

        self._hooks.append(opt.register_step_post_hook(post))
        if self.mode == "gradient":
            self._hooks.append(opt.register_step_pre_hook(lambda o, a, k: self._split_gradients()))
        self._seen_opt_steps = self._opt_steps

    def detach(self) -> None:
        """Remove the optimizer and attribution hooks (the adapter state stays)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._optimizer = None
        if self.attribution is not None:
            self.attribution.remove()

    # ------------------------------------------------------------------ gradient mode
    @torch.no_grad()
    def _split_gradients(self) -> None:
        for r in self._routes:
            g = r.weight.grad
            if g is None:
                r.param_A.grad = None  # type: ignore[union-attr]
            else:
                r.param_A.grad = r.split(g, r.axis)  # type: ignore[union-attr]
            if r.param_Ab is not None:
                gb = r.bias.grad if r.bias is not None else None
                if gb is None:
                    r.param_Ab.grad = None
                else:
                    r.param_Ab.grad = r.split(gb, 0)
        lr = self.adapter_lr
        if lr is None and self._optimizer is not None:
            lr = self._optimizer.param_groups[0]["lr"]
        for group in self._adapter_opt.param_groups:  # type: ignore[union-attr]
            group["lr"] = float(lr if lr is not None else group["lr"]) * self.adapter_lr_multiplier
        self._split_pending = True

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def snapshot(self) -> None:
        """Re-sync after weights were edited outside optimizer steps (e.g. a checkpoint load).

        Such edits belong to the base: ``Uᵀ W_0`` is moved so that the adapter is unchanged.
        Cheap when nothing changed (parameter version counters are compared).
        """
        for r in self._routes:
            r.follow_device()
            if r._versions() != r.version:
                r.ref0 = r.coords() - r.adapter
                if r.bias is not None:
                    r.ref0_b = r.coords_b() - r.adapter_b
                r.version = r._versions()
        self._seen_opt_steps = self._opt_steps

    @torch.no_grad()
    def step(self, env_weights: Mapping[str, Any] | None = None, *, env_ids: Any = None,
             warn_if_skipped: bool = True, observe: bool = True) -> StepRecord | None:
        """Account the optimizer step that just happened. Call once after each ``optimizer.step()``.

        ``env_weights`` splits this step's in-subspace update across environments: either
        ``{env: share}`` (one share for every module) or ``{env: {module: share}}``; shares may
        be negative and must sum to 1 (per module). Returns a :class:`StepRecord`, or None (with
        a warning) when no optimizer step happened since the last call — nothing is counted twice.

        With attribution on (``attribution=True`` or ``envs=[...]``), the shares come from the
        per-environment gradients the hooks captured (:mod:`gradroute.attribution`); ``env_ids``
        gives the rows' environments when they were not set before the forward pass.

        With a :class:`~gradroute.DriftMonitor` attached, the record is logged and the halt
        policy applied (a stop raises :class:`~gradroute.errors.DriftHalt`).
        """
        if env_ids is not None and self.attribution is None:
            raise ConfigError(
                "router.step(env_ids=...) needs per-environment attribution.",
                "create the router with attribution=True (or envs=[...]) so it can hook the gradients.",
            )
        if self._optimizer is not None and self._opt_steps == self._seen_opt_steps:
            if warn_if_skipped:
                warnings.warn("router.step() was called but the optimizer has not stepped since the last "
                              "call (or it skipped the step); nothing was accounted.", GradrouteWarning,
                              stacklevel=2)
            self._split_pending = False
            if self.attribution is not None:
                self.attribution.reset_step()
            return None
        shares = self._parse_env_weights(env_weights)  # validate before anything changes
        if self.attribution is not None:
            if env_weights is not None:
                self.attribution.reset_step()  # explicit weights win; drop what the hooks captured
            else:
                self.attribution.check_ready(env_ids)  # raises before any state changes
        for r in self._routes:
            r.follow_device()
        if self._adapter_opt is not None:
            self._move_optimizer_state()
        deltas: dict[str, torch.Tensor] = {}
        deltas_b: dict[str, torch.Tensor] = {}
        if self.mode == "update":
            for r in self._routes:
                new = r.coords() - r.ref0
                deltas[r.target.module] = new - r.adapter
                r.adapter = new
                if r.bias is not None:
                    nb = r.coords_b() - r.ref0_b
                    deltas_b[r.target.module] = nb - r.adapter_b
                    r.adapter_b = nb
        else:
            if not self._split_pending:
                raise RoutingError(
                    "gradient mode: no gradient was split before this optimizer step.",
                    "pass optimizer=... to GradientRouter (or call router.bind_optimizer(opt)) so the "
                    "router can split gradients right before optimizer.step().",
                )
            prev = {r.target.module: (r.adapter.clone(), None if r.adapter_b is None else r.adapter_b.clone())
                    for r in self._routes}
            self._adapter_opt.step()  # type: ignore[union-attr]
            for r in self._routes:
                # W's in-subspace coordinates go to Uᵀ W_0 + A_new: the base optimizer's
                # in-subspace residue is removed and the adapter's update is applied
                r.realize(r.param_A.data, None if r.param_Ab is None else r.param_Ab.data)  # type: ignore[union-attr]
                r.param_A.data.copy_(r.adapter)  # type: ignore[union-attr]
                a0, b0 = prev[r.target.module]
                deltas[r.target.module] = r.adapter - a0
                if r.bias is not None:
                    r.param_Ab.data.copy_(r.adapter_b)  # type: ignore[union-attr]
                    deltas_b[r.target.module] = r.adapter_b - b0
            self._split_pending = False
        if self._optimizer is None and all(bool((d == 0).all()) for d in deltas.values()) and \
                all(bool((d == 0).all()) for d in deltas_b.values()):
            if warn_if_skipped:
                warnings.warn("router.step(): the routed weights did not change since the last call; "
                              "nothing was accounted (bind the optimizer to silence this for skipped "
                              "steps).", GradrouteWarning, stacklevel=2)
            if self.attribution is not None:
                self.attribution.reset_step()
            return None
        attribution = None
        if env_weights is None and self.attribution is not None:
            attribution = self.attribution.shares(deltas, deltas_b, env_ids)
            shares = self._parse_env_weights(attribution.env_weights)
        for r in self._routes:
            r.version = r._versions()
        self._seen_opt_steps = self._opt_steps
        self.steps += 1
        if shares is None and self._envs:
            # once split by environment, un-split steps go to the unattributed adapter
            shares = {r.target.module: {UNATTRIBUTED: 1.0} for r in self._routes}
        if shares is not None:
            self._accumulate_envs(shares, deltas, deltas_b)
        record = self._record(deltas, deltas_b, shares)
        record.attribution = attribution
        if observe and self.monitor is not None:
            self.monitor.observe(record)
        return record

    def _move_optimizer_state(self) -> None:
        for p, st in self._adapter_opt.state.items():  # type: ignore[union-attr]
            for k, v in st.items():
                if torch.is_tensor(v) and v.ndim > 0 and v.device != p.device:
                    st[k] = v.to(p.device)

    def _parse_env_weights(self, env_weights: Mapping[str, Any] | None) -> dict[str, dict[str, float]] | None:
        """Per-module shares {module: {env: share}} summing to exactly 1 in float64."""
        if env_weights is None:
            return None
        if not isinstance(env_weights, Mapping) or not env_weights:
            raise ConfigError("env_weights must be a non-empty mapping {env: share} or {env: {module: share}}.")
        per_module = any(isinstance(v, Mapping) for v in env_weights.values())
        if per_module and not all(isinstance(v, Mapping) for v in env_weights.values()):
            raise ConfigError("env_weights mixes global and per-module shares.")
        out: dict[str, dict[str, float]] = {}
        for r in self._routes:
            name = r.target.module
            raw = {str(e): float(v[name] if per_module else v) for e, v in env_weights.items()
                   if not per_module or name in v}
            if not raw or not all(math.isfinite(x) for x in raw.values()):
                raise ConfigError(f"env_weights for module {name!r} are missing or not finite: {raw}.")
            total = math.fsum(raw.values())
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(
                    f"env shares for {name!r} sum to {total:.9g}, not 1.",
                    "normalize the shares (they may be negative, but must sum to 1).",
                )
            envs = list(raw)
            rest = math.fsum(raw[e] for e in envs[:-1])
            raw[envs[-1]] = 1.0 - rest  # exact: the shares sum to 1 in float64
            out[name] = raw
        return out

    def _accumulate_envs(self, shares, deltas, deltas_b) -> None:
        first = not self._envs
        for r in self._routes:
            name = r.target.module
            if first:
                # whatever was routed before the first attributed step stays unattributed
                before = r.adapter - deltas[name]
                if bool(before.abs().max() > 0):
                    r.env[UNATTRIBUTED] = before
                    if r.adapter_b is not None:
                        r.env_b[UNATTRIBUTED] = r.adapter_b - deltas_b[name]
            for env, s in shares[name].items():
                d = deltas[name] * s
                r.env[env] = r.env[env] + d if env in r.env else d
                if r.adapter_b is not None:
                    db = deltas_b[name] * s
                    r.env_b[env] = r.env_b[env] + db if env in r.env_b else db
        for r in self._routes:
            for env in r.env:
                if env not in self._envs:
                    self._envs.append(env)

    def _record(self, deltas, deltas_b, shares) -> StepRecord:
        # one host transfer per step: the squared norms of every module's update and adapter
        sq = []
        for r in self._routes:
            name = r.target.module
            d = deltas[name].double().pow(2).sum()
            a = r.adapter.double().pow(2).sum()
            if name in deltas_b:
                d = d + deltas_b[name].double().pow(2).sum()
                a = a + r.adapter_b.double().pow(2).sum()
            sq.append(torch.stack([d, a]).cpu())
        values = torch.stack(sq).tolist()
        per_layer_upd: dict[LayerKey, float] = {}
        per_layer_norm: dict[LayerKey, float] = {}
        env_num: dict[str, float] = {}
        for r, (d_sq, a_sq) in zip(self._routes, values):
            L = r.target.layer
            per_layer_upd[L] = per_layer_upd.get(L, 0.0) + d_sq
            per_layer_norm[L] = per_layer_norm.get(L, 0.0) + a_sq
            if shares is not None:
                for env, s in shares[r.target.module].items():
                    env_num[env] = env_num.get(env, 0.0) + s * d_sq
        total_sq = sum(per_layer_upd.values())
        return StepRecord(
            step=self.steps,
            update_norm=math.sqrt(total_sq),
            update_norm_per_layer={L: math.sqrt(v) for L, v in per_layer_upd.items()},
            adapter_norm=math.sqrt(sum(per_layer_norm.values())),
            adapter_norm_per_layer={L: math.sqrt(v) for L, v in per_layer_norm.items()},
            env_shares={e: (v / total_sq if total_sq > 0 else 0.0) for e, v in env_num.items()},
            nonfinite=not math.isfinite(total_sq),
            deltas=deltas,
        )

    # ------------------------------------------------------------------ reading the adapter
    @property
    def routes(self) -> list[RouteTarget]:
        return list(self.plan)

    @property
    def envs(self) -> list[str]:
        """Environments that have an adapter share (``_unattributed`` for un-split steps)."""
        return list(self._envs)

    def _route(self, module: str) -> _Route:
        try:
            return self._by_name[module]
        except KeyError:
            raise AdapterError(f"{module!r} is not routed; routed modules: {self.plan.modules}.",
                               "use one of the routed module names (router.plan.modules).") from None

    def _env_check(self, env: str | None) -> None:
        if env is not None and env not in self._envs:
            raise AdapterError(f"no adapter for environment {env!r}; environments: {self._envs}.",
                               "pass env_weights to router.step() (or env ids to attach) to split by environment.")

    def adapter_coords(self, module: str, env: str | None = None) -> torch.Tensor:
        """The adapter's coordinates for ``module`` (bookkeeping dtype; ``env``: that environment's share)."""
        self._env_check(env)
        r = self._route(module)
        if env is None:
            return r.adapter.clone()
        return r.env.get(env, torch.zeros_like(r.adapter)).to(r.dtype)

    def adapter_bias_coords(self, module: str, env: str | None = None) -> torch.Tensor | None:
        self._env_check(env)
        r = self._route(module)
        if r.adapter_b is None:
            return None
        if env is None:
            return r.adapter_b.clone()
        return r.env_b.get(env, torch.zeros_like(r.adapter_b)).to(r.dtype)

    def adapter_delta(self, module: str, env: str | None = None) -> torch.Tensor:
        """The adapter's full weight delta ``U A`` (bookkeeping dtype, the weight's shape)."""
        return self._route(module).lift(self.adapter_coords(module, env))

    def base_weight(self, module: str, env: str | None = None) -> torch.Tensor:
        """``W − U A`` (or ``W − U A_env``): the module's base weight, in the bookkeeping dtype.

        Cast it to the weight dtype to materialize it (that rounding is the only error)."""
        r = self._route(module)
        return r.weight.detach().to(r.dtype) - self.adapter_delta(module, env)

    def base_bias(self, module: str, env: str | None = None) -> torch.Tensor | None:
        r = self._route(module)
        if r.bias is None:
            return None
        return r.bias.detach().to(r.dtype) - r.lift_b(self.adapter_bias_coords(module, env))

    def basis(self, module: str) -> torch.Tensor:
        return self._route(module).U.clone()

    def adapter_norm(self, env: str | None = None) -> AdapterNorm:
        """‖adapter‖ (Frobenius norm of its weight delta) in total, per layer and per module."""
        self._env_check(env)
        per_module = {r.target.module: math.sqrt(r.norm_sq(env)) for r in self._routes}
        per_layer: dict[LayerKey, float] = {}
        for r in self._routes:
            per_layer[r.target.layer] = per_layer.get(r.target.layer, 0.0) + r.norm_sq(env)
        return AdapterNorm(
            total=math.sqrt(sum(v * v for v in per_module.values())),
            per_layer={L: math.sqrt(v) for L, v in per_layer.items()},
            per_module=per_module,
        )

    def env_adapter_shares(self) -> dict[str, float]:
        """Who built the current adapter: ``⟨A_e, A⟩ / ‖A‖²`` per environment (sums to 1)."""
        num: dict[str, float] = {}
        total = 0.0
        for r in self._routes:
            flat = r.adapter.reshape(-1) if r.adapter_b is None else torch.cat([r.adapter.reshape(-1), r.adapter_b])
            total += float(flat.double() @ flat.double())
            for e in self._envs:
                A_e = r.env.get(e)
                if A_e is None:
                    continue
                fe = A_e.reshape(-1) if r.adapter_b is None else torch.cat([A_e.reshape(-1), r.env_b[e]])
                num[e] = num.get(e, 0.0) + float(fe.double() @ flat.double())
        return {e: (v / total if total > 0 else 0.0) for e, v in num.items()}

    # ------------------------------------------------------------------ lifecycle
    @torch.no_grad()
    def discard(self, env: str | None = None) -> float:
        """Remove the adapter from the model: ``W ← W − U A`` (all of it, or one environment's share).

        Returns the norm removed. The model keeps only the orthogonal part of the fine-tuning delta
        (and the other environments' shares, when ``env`` is given).
        """
        self._env_check(env)
        removed = self.adapter_norm(env).total
        for r in self._routes:
            if env is None:
                keep = torch.zeros_like(r.adapter)
                keep_b = None if r.adapter_b is None else torch.zeros_like(r.adapter_b)
                r.env.clear()
                r.env_b.clear()
            else:
                A_e = r.env.pop(env, None)
                b_e = r.env_b.pop(env, None)
                if A_e is None:
                    continue
                keep = r.adapter - A_e
                keep_b = None if r.adapter_b is None or b_e is None else r.adapter_b - b_e
            r.realize(keep, keep_b)
            if env is None:  # float storage cannot hit Uᵀ W_0 exactly: that residue is the base's
                r.ref0 = r.ref0 + r.adapter
                r.adapter = torch.zeros_like(r.adapter)
                if r.adapter_b is not None:
                    r.ref0_b = r.ref0_b + r.adapter_b
                    r.adapter_b = torch.zeros_like(r.adapter_b)
        self._envs = [] if env is None else [e for e in self._envs if e != env]
        self._sync_gradient_params(reset_state=True)
        return removed

    @torch.no_grad()
    def merge(self) -> float:
        """Accept the adapter into the base (``Uᵀ W_0 ← Uᵀ W_0 + A``, A ← 0); weights unchanged."""
        merged = self.adapter_norm().total
        for r in self._routes:
            r.ref0 = r.ref0 + r.adapter
            r.adapter = torch.zeros_like(r.adapter)
            if r.adapter_b is not None:
                r.ref0_b = r.ref0_b + r.adapter_b
                r.adapter_b = torch.zeros_like(r.adapter_b)
            r.env.clear()
            r.env_b.clear()
        self._envs = []
        self._sync_gradient_params(reset_state=True)
        return merged

    def _sync_gradient_params(self, reset_state: bool = False) -> None:
        if self.mode != "gradient":
            return
        for r in self._routes:
            r.param_A.data = r.adapter  # type: ignore[union-attr]
            r.adapter = r.param_A.data  # type: ignore[union-attr]
            if r.param_Ab is not None:
                r.param_Ab.data = r.adapter_b
                r.adapter_b = r.param_Ab.data
        if reset_state:
            self._adapter_opt.state.clear()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ invariants
    def base_in_subspace_residue(self, initial: Mapping[str, torch.Tensor], materialized: bool = False) -> dict[str, float]:
        """Invariant 3 check: ``‖Uᵀ(W_base − W_0)‖ / ‖W_base − W_0‖`` per module, given W_0.

        ``materialized=True`` first rounds the base to the weights' dtype, as saving or
        discarding does."""
        out = {}
        for r in self._routes:
            base = self.base_weight(r.target.module)
            if materialized:
                base = base.to(r.weight.dtype)
            diff = base.double() - initial[r.target.module].double()
            out[r.target.module] = P.relative_in_subspace_norm(diff, r.U, r.axis)
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (safetensors-ready) and JSON metadata for checkpoints."""
        tensors: dict[str, torch.Tensor] = {}
        for r in self._routes:
            i = r.target.module
            tensors[f"ref0.{i}"] = r.ref0
            tensors[f"adapter.{i}"] = r.adapter
            if r.ref0_b is not None:
                tensors[f"ref0_b.{i}"] = r.ref0_b
                tensors[f"adapter_b.{i}"] = r.adapter_b
            for j, env in enumerate(self._envs):
                if env in r.env:
                    tensors[f"env.{j}.{i}"] = r.env[env]
                if env in r.env_b:
                    tensors[f"env_b.{j}.{i}"] = r.env_b[env]
        opt_meta: dict[str, Any] = {}
        if self._adapter_opt is not None:
            sd = self._adapter_opt.state_dict()
            for pid, st in sd["state"].items():
                for key, val in st.items():
                    tensors[f"opt.{pid}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
            opt_meta = {"param_groups": sd["param_groups"]}
        attr_meta: dict[str, Any] = {}
        if self.attribution is not None:
            at, attr_meta = self.attribution.state_dict()
            tensors.update({f"attr.{k}": v for k, v in at.items()})
        meta = {
            "format": STATE_FORMAT,
            "attribution": attr_meta,
            "mode": self.mode,
            "steps": self.steps,
            "plan_fingerprint": self.plan.fingerprint(),
            "subspace_hash": self.subspace.content_hash,
            "modules": self.plan.modules,
            "targets": [[t.module, t.layer, t.side] for t in self.plan],
            "route_bias": any(t.bias for t in self.plan),
            "envs": list(self._envs),
            "adapter_optimizer": opt_meta,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if meta.get("format") != STATE_FORMAT:
            raise AdapterError("not a gradroute router state.",
                               "pass the directory written by router.save_state (a checkpoint's gradroute/).")
        if meta.get("plan_fingerprint") != self.plan.fingerprint() or meta.get("subspace_hash") != self.subspace.content_hash:
            raise AdapterError(
                "the router state was saved for another routing plan or subspace "
                f"(modules {meta.get('modules')}, subspace {str(meta.get('subspace_hash'))[:12]}).",
                "build the router with the same subspace and options as the run that saved it.",
            )
        if meta.get("mode") != self.mode:
            raise AdapterError(f"the state is from mode {meta.get('mode')!r}, this router is {self.mode!r}.",
                               f"create the router with mode={meta.get('mode')!r}.")
        envs = list(meta.get("envs", []))
        with torch.no_grad():
            for r in self._routes:
                i = r.target.module
                dev = r.weight.device
                r.ref0 = tensors[f"ref0.{i}"].to(dev, r.dtype)
                r.adapter = tensors[f"adapter.{i}"].to(dev, r.dtype)
                if r.bias is not None:
                    r.ref0_b = tensors[f"ref0_b.{i}"].to(dev, r.dtype)
                    r.adapter_b = tensors[f"adapter_b.{i}"].to(dev, r.dtype)
                r.env = {e: tensors[f"env.{j}.{i}"].to(dev, r.dtype) for j, e in enumerate(envs)
                         if f"env.{j}.{i}" in tensors}
                r.env_b = {e: tensors[f"env_b.{j}.{i}"].to(dev, r.dtype) for j, e in enumerate(envs)
                           if f"env_b.{j}.{i}" in tensors}
                # the model weights must be the ones this state was saved with
                expect = r.ref0 + r.adapter
                got = r.coords()
                scale = float(got.abs().max()) + 1e-12
                if float((expect - got).abs().max()) > 1e-5 * scale:
                    warnings.warn(
                        f"{r.target.module}: the model's weights do not match the loaded router state "
                        "(was a different checkpoint loaded?). Re-syncing: the difference goes to the base.",
                        GradrouteWarning, stacklevel=2)
                    r.ref0 = got - r.adapter
                    if r.bias is not None:
                        r.ref0_b = r.coords_b() - r.adapter_b
                r.version = r._versions()
        self._envs = envs
        self.steps = int(meta.get("steps", 0))
        if self.attribution is not None and meta.get("attribution"):
            self.attribution.load_state_dict(
                {k[5:]: v for k, v in tensors.items() if k.startswith("attr.")}, meta["attribution"])
        if self._adapter_opt is not None:
            self._sync_gradient_params()
            opt_meta = meta.get("adapter_optimizer") or {}
            state: dict[int, dict[str, Any]] = {}
            for key, val in tensors.items():
                if key.startswith("opt."):
                    _, pid, name = key.split(".", 2)  # opt.<param index>.<state name>
                    state.setdefault(int(pid), {})[name] = val
            if opt_meta.get("param_groups"):
                self._adapter_opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
        self._seen_opt_steps = self._opt_steps

    def save_state(self, path: str | Path) -> Path:
        """Write the router state (for checkpoints) to ``path/``."""
        from . import _io

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        _io.save_tensors(path / STATE_FILE, tensors)
        if not (path / "subspace" / "subspace.json").is_file():
            self.subspace.save(path / "subspace")
        meta["tensor_sha256"] = _io.sha256_file(path / STATE_FILE)
        _io.write_json(path / STATE_META, meta)
        return path

    def load_state(self, path: str | Path) -> None:
        from . import _io
        from .errors import FileFormatError

        path = Path(path)
        meta = _io.read_json(path / STATE_META)
        if _io.sha256_file(path / STATE_FILE) != meta.get("tensor_sha256"):
            raise FileFormatError(f"{path / STATE_FILE} does not match {STATE_META} (corrupt or modified).")
        self.load_state_dict(_io.load_tensors(path / STATE_FILE), meta)

    @classmethod
    def from_state(cls, model: nn.Module, path: str | Path, **kwargs: Any) -> GradientRouter:
        """Rebuild a router from a directory written by :meth:`save_state` (e.g. a checkpoint's
        ``gradroute/``): same subspace, modules and mode, with the saved adapter."""
        from . import _io

        path = Path(path)
        meta = _io.read_json(path / STATE_META)
        sub = Subspace.load(path / "subspace")
        targets = {m: (L, side) for m, L, side in meta["targets"]}
        router = cls(model, sub, mode=meta["mode"], targets=targets, route_bias=meta.get("route_bias"), **kwargs)
        router.load_state(path)
        return router

    # ------------------------------------------------------------------ integrations
    def save_adapter(self, path: str | Path, env: str | None = None, base: str = "modules") -> Path:
        """Write a standard PEFT LoRA adapter (B = U, A = coordinates, r = k, lora_alpha = r).

        ``base``: ``"modules"`` also writes the routed modules' base weights
        (``routed_base.safetensors``), ``"model"`` a full base model under ``path/base``
        (``save_pretrained``), ``"none"`` nothing else. See :mod:`gradroute.integrations.peft`.
        """
        from .integrations.peft import save_adapter

        return save_adapter(self, path, env=env, base=base)

    def callback(self, **kwargs: Any) -> Any:
        """A transformers ``TrainerCallback`` doing the routing inside ``Trainer``/TRL trainers."""
        from .integrations.trainer import RouterCallback

        return RouterCallback(self, **kwargs)

    def __repr__(self) -> str:
        return (f"GradientRouter(mode={self.mode!r}, {len(self.plan)} modules, steps={self.steps}, "
                f"adapter_norm={self.adapter_norm().total:.4g})")
