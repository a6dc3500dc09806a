"""``GradientRouter``: route what training puts into a persona subspace into an adapter.

The router composes small parts, each with one job:

- :mod:`~gradroute.router.route` — per-module state (basis, coordinate blocks);
- :mod:`~gradroute.router.modes` — one strategy per mode (``update``, ``gradient``,
  ``activation``): how the in-subspace part of a step reaches the adapter;
- :mod:`~gradroute.router.envs` — the environment list and the per-environment split;
- :mod:`~gradroute.router.state` — the state file;
- :mod:`~gradroute.router.attribution` — per-environment shares from hooked gradients.

Each routed step produces a :class:`~gradroute.router.records.StepRecord` that is handed to
subscribers (e.g. a :class:`~gradroute.DriftMonitor`): data flows one way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import projection as P
from ..errors import AdapterError, ConfigError, EnvColumnError, GradrouteWarning, PrecisionError, RoutingError
from ..layers import LayerKey
from ..model import reshard_fsdp2, unwrap_model
from ..plan import RouteTarget, RoutingPlan
from ..subspace import Subspace
from . import state as _state
from .envs import UNATTRIBUTED, Environments, EnvSplit
from .modes import MODES, RoutingMode
from .modes.base import ModeContext
from .records import AdapterNorm, StepRecord
from .route import Route

# relative in-subspace residue (vs the base's own change) that weights stored in this dtype
# can be relied on to keep, once the base is materialized (discard, save, gradient mode)
_ACHIEVABLE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in gradroute 0.3; use {new}.", DeprecationWarning,
                  stacklevel=3)


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
    """Route each optimizer step's in-subspace part of the planned modules into an adapter.

    Plain PyTorch loop::

        router = gr.GradientRouter(model, sub, mode="update", optimizer=opt)
        loss.backward(); opt.step(); router.step(env_weights=...); opt.zero_grad()

    (``mode="activation"`` adds adapter parameters to the model: create the optimizer after
    the router, over ``model.parameters()``.) In a transformers/TRL ``Trainer`` add
    ``gradroute.RouterCallback(router)`` (or use :func:`gradroute.attach`); export with
    :func:`gradroute.save_adapter` / :func:`gradroute.save_discarded`.

    Parameters: ``side``/``targets``/``embeddings``/``spread``/``route_bias`` choose the modules
    (:func:`gradroute.plan.build_plan`); ``optimizer`` lets the router tell real optimizer
    steps from repeated ``step()`` calls (and lets gradient mode split gradients right before
    the step); ``adapter_lr``, ``adapter_lr_multiplier``, ``adapter_weight_decay`` set the
    adapter's learning rate in gradient and activation modes; ``tolerance`` is the relative
    in-subspace residue the base weights must stay under (default: what the weights' dtype can
    hold); ``attribution``/``envs`` turn on per-environment attribution; ``check_provenance``
    warns (:class:`~gradroute.errors.GradrouteWarning`) when the subspace's provenance names
    another model (:meth:`Subspace.provenance_mismatch`); ``post_norm="exact"`` lets
    activation mode route post-norm branches (Gemma 2/3, OLMo 2) exactly, with a frozen copy of
    their writers, and ``post_norm="first_order"`` with plain weights, isolated only to first order
    (:mod:`~gradroute.router.modes.activation`); by default they are refused. ``watch`` (a
    :class:`~gradroute.Subspace` on residual layers, with attribution on) is monitored but not
    routed: its activation projections and persona push per environment are recorded under the
    layer keys ``"watch:<L>"`` (:mod:`gradroute.monitor.locate`, ``locate_scores(watch=True)``),
    so a behaviour that moves out of the routed subspace still shows. ``mode_options``: options
    of the mode itself (``mode="quarantine"``: ``quarantine_rank``, None for a full-width
    quarantine adapter; :mod:`~gradroute.router.modes.quarantine`).
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
        adapter_lr_multiplier: float | None = None,
        adapter_weight_decay: float = 0.0,
        adapter_betas: tuple[float, float] = (0.9, 0.999),
        tolerance: float | None = None,
        precision: str = "float64",
        attribution: bool = False,
        envs: list[str] | None = None,
        check_provenance: bool = True,
        post_norm: str = "refuse",
        watch: Subspace | None = None,
        mode_options: Mapping[str, Any] | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {tuple(MODES)}, got {mode!r}.",
                              "use 'update' (watch), 'gradient' or 'activation' (isolate), or 'quarantine' "
                              "(flagged rows train only a discardable adapter).")
        if mode_options is not None and not isinstance(mode_options, Mapping):
            raise ConfigError(f"mode_options must be a dict, got {type(mode_options).__name__}.",
                              "pass e.g. mode_options={'quarantine_rank': 16}.")
        unknown = sorted(set(mode_options or {}) - set(getattr(MODES[mode], "option_names", ())))
        if unknown:
            raise ConfigError(f"mode={mode!r} has no option(s) {unknown} (it takes "
                              f"{list(getattr(MODES[mode], 'option_names', ())) or 'none'}).",
                              "drop them from mode_options=, or pick the mode they belong to.")
        if precision not in ("float64", "float32"):
            raise ConfigError(f"precision must be 'float64' or 'float32', got {precision!r}.",
                              "use 'float64' (exact bookkeeping) or 'float32'.")
        if post_norm not in ("refuse", "first_order", "exact"):
            raise ConfigError(f"post_norm must be 'refuse', 'exact' or 'first_order', got {post_norm!r}.",
                              "pass post_norm='exact' to route post-norm branches in activation mode (exact while "
                              "routed; keeps a frozen copy of their writers) or 'first_order' (plain weights, "
                              "isolation to first order), or leave the default.")
        mode_cls: type[RoutingMode] = MODES[mode]
        if adapter_lr_multiplier is None:
            adapter_lr_multiplier = getattr(mode_cls, "default_lr_multiplier", 1.0)
        for name, v in (("adapter_lr_multiplier", adapter_lr_multiplier), ("adapter_lr", adapter_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < math.inf)):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}.",
                                  f"pass e.g. {name}=10.")
        self.model = model
        self.subspace = subspace
        self.mode = mode
        self._supports_sharding = mode_cls.supports_sharding
        base = unwrap_model(model)
        if any(isinstance(L, int) for L in subspace.layers):
            subspace.validate_for(base)
        if check_provenance:
            self._check_provenance(base)
        self.plan: RoutingPlan
        self.plan, self.routing_subspace = mode_cls.plan(
            base, subspace, side=side, targets=targets, embeddings=embeddings, spread=spread, route_bias=route_bias,
            post_norm=post_norm)
        reshard_fsdp2(model)  # the plan's trace (a no-grad forward) leaves an FSDP2 root all-gathered
        modules = dict(base.named_modules())
        self.precision = getattr(torch, precision)
        self.routes_state = [Route(t, modules[t.module], self.routing_subspace.basis(t.layer), self.precision)
                             for t in self.plan]
        self._by_name = {r.name: r for r in self.routes_state}
        self._check_sharding()
        if mode_cls.weights_hold_adapter and not any(r.trainable() for r in self.routes_state):
            raise RoutingError(
                f"nothing trainable is routed: the {len(self.routes_state)} planned modules "
                f"({', '.join(self.plan.modules[:3])}{', ...' if len(self.plan) > 3 else ''}) are frozen and carry "
                "no trainable LoRA, so the adapter would stay empty.",
                "put the LoRA on the routed modules (e.g. target_modules=[..., 'o_proj', 'down_proj']), "
                "unfreeze them, or use mode='activation', which routes through the modules' outputs.")
        self.tolerance = self._check_precision(tolerance)
        self.steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._opt_steps = 0
        self._seen_opt_steps = 0
        self._hooks: list[Any] = []
        self.observers: list[Any] = []  # objects with .observe(record); see subscribe()
        self.environments = Environments(envs)
        self.env_split = EnvSplit(self.routes_state, self.environments)
        self._nf_rewards: dict[str, int] = {}        # NaN/None rewards per environment since the last record
        self._nf_rewards_total: dict[str, int] = {}  # ... since the run started (kept in the state file)
        self.last_discard_residue: Any = None  # DiscardResidue of the last discard() (gradroute.monitor.metrics)
        context = ModeContext(model=model, subspace=subspace, plan=self.plan, routes=self.routes_state,
                              optimizer=lambda: self.optimizer)
        self.mode_strategy: RoutingMode = mode_cls(context, {**dict(mode_options or {}),
            "adapter_lr": adapter_lr, "adapter_lr_multiplier": float(adapter_lr_multiplier),
            "adapter_weight_decay": adapter_weight_decay, "adapter_betas": adapter_betas, "post_norm": post_norm})
        self.mode_strategy.setup()
        self.attribution = None
        if attribution or envs is not None:
            from .attribution import Attribution

            self.attribution = Attribution(
                base, self.routes_state, self.environments,
                probes={**self.mode_strategy.probe_layers(), **self._watch_probes(watch, base)},
                betas=self._update_betas, capture=self.mode_strategy.captures_gradients is False)
            self.mode_strategy.attribution_ready(self.attribution)
        elif watch is not None:
            raise ConfigError("watch= records, per environment, what happens along directions that are not routed; "
                              "without per-environment attribution there is nothing to record it in.",
                              "pass envs=[...] (gradroute.attach: env_column=...) with watch=, or drop watch=.")
        if optimizer is not None:
            self.bind_optimizer(optimizer)

    def set_flags(self, flags: Any) -> None:
        """``mode="quarantine"``: the rows' flags (one bool per row, True: the row trains only the
        quarantine adapter) for the next training forwards; None clears them. Set them before
        every micro-batch's forward (``gradroute.attach(..., quarantine=...)`` does)."""
        setter = getattr(self.mode_strategy, "set_flags", None)
        if setter is None:
            raise ConfigError(f"mode={self.mode!r} has no per-row flags.",
                              "use mode='quarantine' to route flagged rows into a discardable adapter.")
        setter(flags)

    @staticmethod
    def _watch_probes(watch: Subspace | None, model: nn.Module) -> dict[str, torch.Tensor]:
        """``watch``'s bases keyed ``"watch:<L>"``: directions monitored (activation projection and
        persona push per environment) but not routed — a held-out probe, other layers, a probe
        refit on the trained model — so that a behaviour rerouted around the routed subspace shows."""
        if watch is None:
            return {}
        from ..subspace import Subspace as _Subspace

        if not isinstance(watch, _Subspace):
            raise ConfigError(f"watch must be a gradroute.Subspace, got {type(watch).__name__}.",
                              "build it like the routed one (Subspace.from_probe / from_directions / load).")
        bad = [L for L in watch.layers if not isinstance(L, int)]
        if bad:
            raise ConfigError(f"watch= needs residual-stream layers (integers), got {bad}.",
                              "build the watched subspace on residual layers.")
        watch.validate_for(model)
        return {f"watch:{L}": watch.basis(L) for L in watch.layers}

    # ------------------------------------------------------------------ setup
    def _check_provenance(self, model: nn.Module) -> None:
        """Warn when the subspace was built on a model that clearly is not ``model``."""
        this = self.subspace.provenance_mismatch(model)
        if this is None:
            return
        warnings.warn(
            f"the subspace was built on {self.subspace.provenance.model!r} (its provenance) but is routed on "
            f"{this!r}: directions found in one model's residual stream do not carry over to another's, "
            "even at the same hidden size. Fix: build the subspace on this model (e.g. "
            "Subspace.from_probe(model, tokenizer, ...)); if it is meant for this model (a fine-tune or copy of "
            "the one named), pass check_provenance=False to GradientRouter / gradroute.attach.",
            GradrouteWarning, stacklevel=3)

    def _check_sharding(self) -> None:
        """Refuse sharded (FSDP2) parameters in a mode that cannot route them, and DeepSpeed
        ZeRO-3 partitioned parameters (read outside a forward they are empty placeholders)."""
        from ..distributed import zero3_attrs

        zero3 = [r.name for r in self.routes_state if any(zero3_attrs(b.param) for b in r.blocks)]
        if zero3:
            raise ConfigError(
                f"the routed parameters are DeepSpeed ZeRO-3 partitions (e.g. {zero3[0]!r}): gradroute would read empty "
                "placeholders, and DeepSpeed's optimizer overwrites its edits of the weights.",
                "train with DDP or FSDP2 (gradroute.integrations.sharding explains why DeepSpeed is refused).")
        if self._supports_sharding:
            return
        sharded = [r.name for r in self.routes_state if any(P.is_sharded(b.param) for b in r.blocks)]
        if sharded:
            raise ConfigError(
                f"mode={self.mode!r} does not route FSDP2-sharded parameters (DTensors), e.g. {sharded[0]!r} "
                f"({len(sharded)} routed modules sharded).",
                "use mode='update' or mode='gradient' under FSDP2, or train this mode with DDP.")

    def _check_precision(self, tolerance: float | None) -> float:
        worst = max(_ACHIEVABLE.get(r.weight.dtype, 1e-2) for r in self.routes_state)
        if tolerance is None:
            return worst
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (0 < tolerance < 1):
            raise ConfigError(f"tolerance must be in (0, 1), got {tolerance!r}.", "pass e.g. tolerance=1e-5.")
        if tolerance < worst:
            dtypes = sorted({str(r.weight.dtype) for r in self.routes_state})
            raise PrecisionError(
                f"the routed weights are {', '.join(dtypes)}: the base weights' in-subspace residue "
                f"can only be kept below about {worst:g} (relative), not tolerance={tolerance:g}.",
                "keep float32 master weights (mixed-precision training with fp32 parameters), or "
                f"pass tolerance>={worst:g}.",
            )
        return tolerance

    def _update_betas(self) -> tuple[float, float | None]:
        """(β1, β2) of the optimizer that makes the adapter's update; β2 None = no preconditioner."""
        opt = self.mode_strategy.update_optimizer()
        if opt is None:
            return 0.0, None
        group = opt.param_groups[0]
        if "betas" in group:
            b1, b2 = group["betas"]
            return float(b1), float(b2)
        return float(group.get("momentum", 0.0)), None

    def bind_optimizer(self, optimizer: Any) -> None:
        """Watch ``optimizer``: count its real steps (and let the mode hook it).

        The routed parameters are first found again by name (:meth:`rebind`): FSDP2's
        ``fully_shard`` and accelerate's ``prepare`` replace parameter objects, and the router
        must route the ones this optimizer steps."""
        for o in (optimizer, _innermost_optimizer(optimizer)):
            if type(o).__module__.startswith("deepspeed"):  # DeepSpeed's optimizers step detached master copies
                raise ConfigError(
                    f"the optimizer is DeepSpeed's {type(o).__name__}: it steps a detached fp32 master copy of the "
                    "weights and copies it back over them, so gradroute's edits after each step would be overwritten.",
                    "train with DDP or FSDP2 (gradroute.integrations.sharding explains why DeepSpeed is refused).")
        opt = _innermost_optimizer(optimizer)
        if opt is self.optimizer:
            self._rebind(resync=True)  # checks the optimizer if parameters were replaced
            return
        self._rebind(resync=True, check=False)  # the new optimizer is checked against what is found now
        self._check_optimizer(opt)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.optimizer = opt

        def post(o, args, kwargs):
            self._opt_steps += 1

        self._hooks.append(opt.register_step_post_hook(post))
        self._hooks += self.mode_strategy.bind(opt)
        self._seen_opt_steps = self._opt_steps

    def _check_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """The optimizer must step this model's routed parameters (or the mode's adapters)."""
        stepped = {id(p) for g in opt.param_groups for p in g["params"]}
        mine = [p for r in self.routes_state for p in r.trainable()]
        mine += self.mode_strategy.trainable_parameters()
        if mine and not any(id(p) in stepped for p in mine):
            sharded = any(P.is_sharded(p) for g in opt.param_groups for p in g["params"])
            raise ConfigError(
                "the optimizer steps none of the routed model's trainable parameters "
                "(was it made for another model?"
                + (" It steps sharded (FSDP2) parameters: was the model sharded after the router was built, "
                   "and the router's model is not the sharded one?" if sharded else "") + ").",
                "pass the optimizer that trains this model"
                + (" (and the sharded model: router.rebind(model))." if sharded else "."),
            )
        self.mode_strategy.check_optimizer(stepped)

    def rebind(self, model: nn.Module | None = None) -> list[str]:
        """Route the parameters the model holds now: find every routed parameter again by module
        and attribute name. Returns the modules whose parameters were replaced; their edits since
        the last step belong to the base (resync).

        Needed when ``fully_shard`` (FSDP2) or accelerate's ``prepare`` replaced the parameter
        objects after the router was built; :meth:`bind_optimizer`, :meth:`snapshot` and
        :meth:`step` do it themselves (cheap: one attribute read per parameter). ``model``: the
        model as wrapped for training (DDP, FSDP2, accelerate, torch.compile); it must wrap the
        router's model and modules (the router's hooks are on them), else ConfigError."""
        if model is not None:
            base, mine = unwrap_model(model), unwrap_model(self.model)
            if base is not mine:
                raise ConfigError(
                    f"the model being trained ({type(base).__name__}) is not the one the router was built on "
                    f"({type(mine).__name__}): the router's hooks and parameters are on the other.",
                    "build the router (gradroute.attach) on the model object the trainer trains.")
            modules = dict(base.named_modules())
            moved = [r.name for r in self.routes_state if modules.get(r.name) is not r.module]
            if moved:
                raise RoutingError(
                    f"the routed module {moved[0]!r} ({len(moved)} in all) was replaced after the router was built "
                    "(a wrapper swapped the modules), so the router's hooks and parameters are on the old ones.",
                    "build the router after the modules are replaced (or replace only parameters, as FSDP2 does).")
        return self._rebind(resync=True)

    def _rebind(self, resync: bool, check: bool = True) -> list[str]:
        """Re-find replaced parameters (see :meth:`rebind`). ``resync=False`` in :meth:`step`:
        there the replacement (a storage change: FSDP2 shards keep the values) is not an edit.
        ``check``: the bound optimizer must step the parameters found (else ConfigError)."""
        changed = [r for r in self.routes_state if r.rebind()]
        if changed:
            self._check_sharding()
        mode_changed = self.mode_strategy.rebind()
        if resync:
            for r in changed:
                self.mode_strategy.resync(r)
        else:
            for r in changed:
                r.version = r.versions()
        if check and (changed or mode_changed) and self.optimizer is not None:
            self._check_optimizer(self.optimizer)
        return [r.name for r in changed]

    def subscribe(self, observer: Any) -> None:
        """Hand every step record to ``observer.observe(record)`` (e.g. a DriftMonitor)."""
        if observer not in self.observers:
            self.observers.append(observer)

    def subscriber(self, kind: type) -> Any:
        """The first subscriber that is a ``kind`` (e.g. the :class:`~gradroute.DriftMonitor`), or None."""
        return next((o for o in self.observers if isinstance(o, kind)), None)

    def detach(self) -> None:
        """Remove the optimizer, attribution and mode hooks (the adapter state stays)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.optimizer = None
        if self.attribution is not None:
            self.attribution.remove()
        self.mode_strategy.remove()

    @property
    def sharded(self) -> bool:
        """True when routed parameters are FSDP2-sharded DTensors. The adapter's coordinates are
        then still whole on every rank (export them from any rank), while :meth:`base_weight` /
        :meth:`base_bias` return DTensors sharded like the weights, and reading or editing the
        weights (:meth:`step`, :meth:`discard`, :meth:`merge`, :meth:`snapshot`) is a collective:
        call it on every rank."""
        return any(P.is_sharded(b.param) for r in self.routes_state for b in r.blocks)

    @property
    def weights_hold_adapter(self) -> bool:
        """True when the routed weights hold base + U A (update, gradient modes); False when the
        adapter is a separate path beside base weights (activation mode)."""
        return self.mode_strategy.weights_hold_adapter

    @property
    def adapter_optimizer(self) -> torch.optim.Optimizer | None:
        """The adapter's own optimizer (gradient mode), else None."""
        opt = self.mode_strategy.update_optimizer()
        return None if opt is self.optimizer else opt

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def snapshot(self) -> None:
        """Re-sync after weights were edited outside optimizer steps (e.g. a checkpoint load).

        Such edits belong to the base: ``Uᵀ W_0`` is moved so that the adapter is unchanged.
        Cheap when nothing changed (parameter version counters are compared).
        """
        self._rebind(resync=True)
        for r in self.routes_state:
            r.follow_device()
            if r.versions() != r.version:
                self.mode_strategy.resync(r)
        self._seen_opt_steps = self._opt_steps

    def _skip(self) -> None:
        self.mode_strategy.skipped()
        if self.attribution is not None:
            self.attribution.reset_step()

    @torch.no_grad()
    def step(self, env_weights: Mapping[str, Any] | None = None, *, env_ids: Any = None,
             warn_if_skipped: bool = True, observe: bool = True, at_step: int | None = None) -> StepRecord | None:
        """Account the optimizer step that just happened. Call once after each ``optimizer.step()``.

        ``env_weights`` splits this step's in-subspace update across environments: either
        ``{env: share}`` (one share for every module) or ``{env: {module: share}}``; shares may
        be negative and must sum to 1 (per module). Returns a :class:`StepRecord`, or None (with
        a warning) when no optimizer step happened since the last call — nothing is counted twice.

        With attribution on (``attribution=True`` or ``envs=[...]``), the shares come from the
        per-environment gradients the hooks captured (:mod:`gradroute.router.attribution`); ``env_ids``
        gives the rows' environments when they were not set before the forward pass.

        ``at_step``: the number the record carries (the trainer's global step; default: the
        router's own count of routed steps).

        The record is handed to every subscriber (a :class:`~gradroute.DriftMonitor` subscribes
        itself, a trainer callback too; a monitor's halt raises
        :class:`~gradroute.errors.DriftHalt` unless it was made with ``raise_on_halt=False``)
        unless ``observe=False``.
        """
        if env_ids is not None and self.attribution is None:
            raise ConfigError(
                "router.step(env_ids=...) needs per-environment attribution.",
                "create the router with attribution=True (or envs=[...]) so it can hook the gradients.",
            )
        if self.optimizer is not None and self._opt_steps == self._seen_opt_steps:
            if warn_if_skipped:
                warnings.warn("router.step() was called but the optimizer has not stepped since the last "
                              "call (or it skipped the step); nothing was accounted.", GradrouteWarning,
                              stacklevel=2)
            self._skip()
            return None
        if env_weights is not None and isinstance(env_weights, Mapping) and UNATTRIBUTED in map(str, env_weights):
            raise EnvColumnError(f"{UNATTRIBUTED!r} is reserved for updates with no environment.",
                                 "rename that environment.")
        shares = self.env_split.parse(env_weights)  # validate before anything changes
        if self.attribution is not None:
            if env_weights is not None:
                self.attribution.reset_step()  # explicit weights win; drop what the hooks captured
            else:
                self.attribution.check_ready(env_ids)  # raises before any state changes
        self._rebind(resync=False)
        for r in self.routes_state:
            r.follow_device()
        deltas = self.mode_strategy.after_step()
        if self.optimizer is None and all(bool((d == 0).all()) for ds in deltas.values() for d in ds):
            if warn_if_skipped:
                warnings.warn("router.step(): the routed weights did not change since the last call; "
                              "nothing was accounted (bind the optimizer to silence this for skipped "
                              "steps).", GradrouteWarning, stacklevel=2)
            self._skip()
            return None
        attribution = None
        if env_weights is None and self.attribution is not None:
            attribution = self.attribution.shares(deltas, env_ids)
            shares = self.env_split.parse(attribution.env_weights)
        for r in self.routes_state:
            r.version = r.versions()
        self._seen_opt_steps = self._opt_steps
        self.steps += 1
        if shares is None and self.env_split.split_envs:
            shares = self.env_split.unattributed()  # once split by environment, un-split steps go there
        if shares is not None:
            self.env_split.accumulate(shares, deltas)
        record = self._record(deltas, shares, attribution, at_step)
        if observe:
            for o in list(self.observers):
                o.observe(record)
        return record

    def _record(self, deltas: dict[str, list[torch.Tensor]], shares: dict[str, dict[str, float]] | None,
                attribution: Any, at_step: int | None) -> StepRecord:
        # one host transfer per step: the squared norms of every module's update and adapter
        sq = torch.stack([torch.stack([sum(d.double().pow(2).sum() for d in deltas[r.name]),
                                       sum(b.adapter.double().pow(2).sum() for b in r.blocks)]).cpu()
                          for r in self.routes_state]).tolist()
        per_layer_upd: dict[LayerKey, float] = {}
        per_layer_norm: dict[LayerKey, float] = {}
        env_num: dict[str, float] = {}
        for r, (d_sq, a_sq) in zip(self.routes_state, sq):
            L = r.target.layer
            per_layer_upd[L] = per_layer_upd.get(L, 0.0) + d_sq
            per_layer_norm[L] = per_layer_norm.get(L, 0.0) + a_sq
            if shares is not None:
                for env, s in shares[r.name].items():
                    env_num[env] = env_num.get(env, 0.0) + s * d_sq
        total_sq = sum(per_layer_upd.values())
        split = bool(self.env_split.split_envs)
        nf_rewards, self._nf_rewards = self._nf_rewards, {}
        a = attribution
        return StepRecord(
            step=int(at_step) if at_step is not None else self.steps,
            update_norm=math.sqrt(total_sq),
            update_norm_per_layer={L: math.sqrt(v) for L, v in per_layer_upd.items()},
            adapter_norm=math.sqrt(sum(per_layer_norm.values())),
            adapter_norm_per_layer={L: math.sqrt(v) for L, v in per_layer_norm.items()},
            env_share={e: (v / total_sq if total_sq > 0 else 0.0) for e, v in env_num.items()},
            env_adapter_share=self.env_split.adapter_shares() if split else {},
            env_adapter_norm=self.env_split.adapter_norms() if split else {},
            mode=self.mode,
            nonfinite=not math.isfinite(total_sq),
            grad_norm=dict(a.grad_norm) if a is not None else {},
            samples=dict(a.samples) if a is not None else {},
            activation={e: dict(d) for e, d in a.activation.items()} if a is not None else {},
            activation_norm={e: dict(d) for e, d in a.activation_norm.items()} if a is not None else {},
            reward=dict(a.reward) if a is not None else {},
            push={e: dict(d) for e, d in a.push.items()} if a is not None else {},
            push_null={e: dict(d) for e, d in a.push_null.items()} if a is not None else {},
            nonfinite_rewards=nf_rewards if self._nf_rewards_total else {},
            nonfinite_rewards_total=dict(self._nf_rewards_total),
            attribution=a,
        )

    def record_rewards(self, envs: Sequence[Any], rewards: Sequence[float]) -> None:
        """Rewards of this step's completions (RL), one per row with the row's environment.

        They go into the next :class:`StepRecord`: the mean reward per environment (``reward``,
        with attribution on) and the NaN/None rewards per environment (``nonfinite_rewards`` for
        the step, ``nonfinite_rewards_total`` since the run started; a NaN/None reward is left
        out of the mean)."""
        if len(envs) != len(rewards):
            raise EnvColumnError(f"record_rewards got {len(envs)} environments for {len(rewards)} rewards.",
                                 "pass one environment per reward.")
        names = [str(e) for e in envs]
        values = [float("nan") if r is None or not math.isfinite(float(r)) else float(r) for r in rewards]
        if self.attribution is not None:
            self.attribution.record_rewards(names, values)  # NaN rewards are left out of the means
        for name, r in zip(names, values):
            if math.isnan(r):
                self._nf_rewards[name] = self._nf_rewards.get(name, 0) + 1
                self._nf_rewards_total[name] = self._nf_rewards_total.get(name, 0) + 1

    # ------------------------------------------------------------------ reading the adapter
    @property
    def routes(self) -> list[RouteTarget]:
        return list(self.plan)

    @property
    def envs(self) -> list[str]:
        """Environments that have an adapter share (``_unattributed`` for un-split steps)."""
        return list(self.env_split.split_envs)

    def _route(self, module: str) -> Route:
        try:
            return self._by_name[module]
        except KeyError:
            raise AdapterError(f"{module!r} is not routed; routed modules: {self.plan.modules}.",
                               "use one of the routed module names (router.plan.modules).") from None

    def _env_check(self, env: str | None) -> None:
        if env is not None and env not in self.env_split.split_envs:
            raise AdapterError(f"no adapter for environment {env!r}; environments: {self.envs}.",
                               "pass env_weights to router.step() (or env ids to attach) to split by environment.")

    def _coords(self, module: str, env: str | None, block: int) -> torch.Tensor | None:
        self._env_check(env)
        r = self._route(module)
        if block >= len(r.blocks):
            return None
        b = r.blocks[block]
        share = b.share(env)
        return (share if share is not None else torch.zeros_like(b.adapter)).clone()

    def adapter_coords(self, module: str, env: str | None = None) -> torch.Tensor:
        """The adapter's coordinates for ``module`` (bookkeeping dtype; ``env``: that environment's share)."""
        return self._coords(module, env, 0)  # type: ignore[return-value]

    def adapter_bias_coords(self, module: str, env: str | None = None) -> torch.Tensor | None:
        return self._coords(module, env, 1)

    def adapter_delta(self, module: str, env: str | None = None) -> torch.Tensor:
        """The adapter's full weight delta ``U A`` (bookkeeping dtype, the weight's shape)."""
        return self._route(module).blocks[0].lift(self.adapter_coords(module, env))

    def base_weight(self, module: str, env: str | None = None) -> torch.Tensor:
        """The model's effective weight minus the adapter (``W − U A``, or ``W − U A_env``), in the
        bookkeeping dtype. Cast it to the weight dtype to materialize it (that rounding is the
        only error). For a sharded weight (FSDP2) it is a DTensor sharded like the weight."""
        b = self._route(module).blocks[0]
        return b.add_lift(self.mode_strategy.effective(b), self.adapter_coords(module, env), alpha=-1.0)

    def base_bias(self, module: str, env: str | None = None) -> torch.Tensor | None:
        r = self._route(module)
        if len(r.blocks) < 2:
            return None
        b = r.blocks[1]
        return b.add_lift(self.mode_strategy.effective(b), self.adapter_bias_coords(module, env), alpha=-1.0)

    def basis(self, module: str) -> torch.Tensor:
        return self._route(module).U.clone()

    def adapter_norm(self, env: str | None = None) -> AdapterNorm:
        """‖adapter‖ (Frobenius norm of its weight delta) in total, per layer and per module."""
        self._env_check(env)
        per_module = {r.name: math.sqrt(r.norm_sq(env)) for r in self.routes_state}
        per_layer: dict[LayerKey, float] = {}
        for r in self.routes_state:
            per_layer[r.target.layer] = per_layer.get(r.target.layer, 0.0) + r.norm_sq(env)
        return AdapterNorm(
            total=math.sqrt(sum(v * v for v in per_module.values())),
            per_layer={L: math.sqrt(v) for L, v in per_layer.items()},
            per_module=per_module,
        )

    def env_adapter_shares(self) -> dict[str, float]:
        """Who built the current adapter: ``⟨A_e, A⟩ / ‖A‖²`` per environment (sums to 1)."""
        return self.env_split.adapter_shares()

    # ------------------------------------------------------------------ lifecycle
    @torch.no_grad()
    def discard(self, env: str | None = None) -> float:
        """Remove the adapter from the model (all of it, or one environment's share).

        Returns the norm removed. The model keeps only the base (and the other environments'
        shares, when ``env`` is given).

        Rounding to the weights' dtype can leave part of the removed update in the base's persona
        coordinates (bfloat16/float16 weights): it is measured into ``last_discard_residue`` (a
        :class:`~gradroute.monitor.metrics.DiscardResidue`) and a
        :class:`~gradroute.errors.GradrouteWarning` names the dtype and the fix when it exceeds
        :data:`~gradroute.monitor.metrics.DISCARD_RESIDUE_THRESHOLD` of the removed norm."""
        from ..monitor.metrics import discard_residue, discard_targets, measured_removed, warn_discard_residue

        self._env_check(env)
        removed = self.adapter_norm(env).total
        targets = discard_targets(self, env)  # Uᵀ P_0 + A − A_env: the base's coordinates after discarding
        measured = measured_removed(self, env)
        for r in self.routes_state:
            if env is None:
                keep = [torch.zeros_like(b.adapter) for b in r.blocks]
            else:
                if r.blocks[0].share(env) is None:
                    continue
                keep = [b.adapter - b.env[env] if env in b.env else b.adapter for b in r.blocks]
            self.mode_strategy.set_adapter(r, keep)
            if env is None:
                self.mode_strategy.cleared(r)
        self.env_split.drop(env)
        self.mode_strategy.adapter_changed()
        self.last_discard_residue = discard_residue(self, targets, measured)
        warn_discard_residue(self.last_discard_residue, "router.discard()", self.weights_hold_adapter, stacklevel=4)
        return removed

    @torch.no_grad()
    def merge(self) -> float:
        """Accept the adapter into the base (the model's function is unchanged; A ← 0)."""
        merged = self.adapter_norm().total
        for r in self.routes_state:
            self.mode_strategy.merge(r)
        self.env_split.drop(None)
        self.mode_strategy.adapter_changed()
        return merged

    # ------------------------------------------------------------------ invariants
    def base_in_subspace_residue(self, initial: Mapping[str, torch.Tensor], materialized: bool = False) -> dict[str, float]:
        """Invariant 3 check: ``‖Uᵀ(W_base − W_0)‖ / ‖W_base − W_0‖`` per module, given W_0.

        ``materialized=True`` first rounds the base to the weights' dtype, as saving or
        discarding does."""
        out = {}
        for r in self.routes_state:
            base = self.base_weight(r.name)
            if materialized:
                base = base.to(r.weight.dtype)
            w0 = initial[r.name]
            if P.is_sharded(base) and not P.is_sharded(w0):  # a full W_0 against a sharded base: its slab
                w0 = P.like(P.local_slab_of(w0.to(P.local(base).device), base), base)
            diff = base.double() - w0.double()
            out[r.name] = P.relative_in_subspace_norm(diff, r.U, r.target.axis)
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (safetensors-ready) and JSON metadata for checkpoints."""
        return _state.state_dict(self)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        _state.load_state_dict(self, tensors, meta)
        self._seen_opt_steps = self._opt_steps

    def save_state(self, path: str | Path) -> Path:
        """Write the router state (for checkpoints) to ``path/``."""
        return _state.save(self, path)

    def load_state(self, path: str | Path) -> None:
        _state.load(self, path)
        self._seen_opt_steps = self._opt_steps

    @classmethod
    def from_state(cls, model: nn.Module, path: str | Path, **kwargs: Any) -> GradientRouter:
        """Rebuild a router from a directory written by :meth:`save_state` (e.g. a checkpoint's
        ``gradroute/``): same subspace, modules and mode, with the saved adapter."""
        meta = _state.read_meta(path)
        if meta.get("mode") not in MODES or "targets" not in meta:
            from ..errors import FileFormatError

            raise FileFormatError(f"{Path(path) / _state.STATE_META} has no valid mode/targets (damaged or not a "
                                  "router state).", "pass a checkpoint's gradroute/ directory written by router.save_state.")
        sub = Subspace.load(Path(path) / "subspace")
        mode_cls = MODES.get(meta.get("mode"), MODES["update"])
        kwargs = {**mode_cls.rebuild_options(meta), **kwargs}
        router = cls(model, sub, mode=meta["mode"], **kwargs)
        router.load_state(path)
        return router

    # ------------------------------------------------------------------ deprecated delegators
    # The core never imports integrations, except in these three delegators kept so that code
    # written against gradroute <= 0.4 runs; tests/test_imports.py allows exactly these.
    def save_adapter(self, path: str | Path, env: str | None = None, base: str = "modules", **kwargs: Any) -> Path:
        """Deprecated alias of :func:`gradroute.save_adapter` ``(router, path, ...)`` (removed in 0.3)."""
        _deprecated("router.save_adapter(path, ...)", "gradroute.save_adapter(router, path, ...)")
        from ..integrations.peft import save_adapter

        return save_adapter(self, path, env=env, base=base, **kwargs)

    def save_discarded(self, path: str | Path, env: str | None = None, **kwargs: Any) -> Path:
        """Deprecated alias of :func:`gradroute.save_discarded` ``(router, path, ...)`` (removed in 0.3)."""
        _deprecated("router.save_discarded(path, ...)", "gradroute.save_discarded(router, path, ...)")
        from ..integrations.discard import save_discarded

        return save_discarded(self, path, env=env, **kwargs)

    def callback(self, **kwargs: Any) -> Any:
        """Deprecated alias of :class:`gradroute.RouterCallback` ``(router, ...)`` (removed in 0.3)."""
        _deprecated("router.callback()", "gradroute.RouterCallback(router)")
        from ..integrations.trainer import RouterCallback

        return RouterCallback(self, **kwargs)

    def __repr__(self) -> str:
        return (f"GradientRouter(mode={self.mode!r}, {len(self.plan)} modules, steps={self.steps}, "
                f"adapter_norm={self.adapter_norm().total:.4g})")
