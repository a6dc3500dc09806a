"""``mode="quarantine"`` — data-dependent routing: flagged rows train only a discardable adapter.

Activation mode (:mod:`~gradroute.router.modes.activation`) plus one boolean per row, the
row's *flag* (a detector's verdict on the rollout: the environment's own exploit check, a probe
threshold, the monitor's flag on its environment). For every training forward (gradients on)
the rows' flags must be set first (:meth:`QuarantineMode.set_flags`; ``gradroute.attach(...,
quarantine=detector)`` does it per micro-batch). Then:

- **flagged rows train only the quarantine adapter.** Every module of the model that holds
  parameters is a known row-separable leaf (``Linear``, ``Embedding``, GPT-2 ``Conv1D``,
  ``LayerNorm``, ``*RMSNorm``; anything else is refused with
  :class:`~gradroute.errors.RoutingError`). A forward hook recomputes the flagged rows' output of
  each one with its parameters detached and puts it in place of theirs
  (``out.index_copy(0, flagged, f(x_flagged; W.detach()))``): the gradient reaches those rows'
  inputs, never ``W``. So no base parameter — full weights, embeddings, norms, the head, a user's
  LoRA — receives anything from a flagged row, and the persona adapter neither (its output on
  flagged rows is detached). The quarantine adapter ``Q`` (one per residual writer: a dense
  ``d x d_in`` delta, or a LoRA of rank ``quarantine_rank``) is added to the flagged rows' writes,
  and learns what they ask for. The cost is one extra forward of the flagged rows' leaves.
- **unflagged rows train the base as activation mode does** (the persona coordinates of every
  write routed to the persona adapter, the base pinned out of the span after every step), and
  they do not see ``Q``: ``Q`` is added to the flagged rows only. Hence the invariant that
  makes discarding exact: *the base and the persona adapter after training on mixed batches are
  those of activation-mode training on the unflagged rows alone* (same data, same per-row loss
  terms; with any optimizer whose update of a parameter depends only on that parameter's
  gradients), and discarding leaves that model.
- **forwards without gradients** (rollouts, evaluation) need no flags: ``Q`` is added to every
  row, so the policy that generates is the whole trained model (base + persona adapter + ``Q``);
  its flagged behaviour keeps being sampled, flagged and routed away. Unflagged rows are then
  trained at the model without ``Q`` (an off-policy term; PPO-style ratios see it).

Why ``Q`` is not in the unflagged rows' forward (the alternative: in every row's forward, trained
by flagged rows only): the base would then learn *in the presence of* ``Q`` — it could come to
rely on, or compensate for, what ``Q`` does — so the discarded model would not be what the
unflagged data alone trains; nothing bounds that difference. Gating makes it zero.

``router.discard()`` zeroes the persona adapter and ``Q``: the model is then the base.
``merge()`` is refused while ``Q`` holds anything. Refused too (typed errors with a fix):
mixture-of-experts blocks and post-norm branches, sharded (FSDP2) models, modules with their own
parameters that cannot be recomputed row by row, a training forward without flags, flags whose
count is not the forward's row count (packed or chunked rows).

A parameter used outside its module's forward escapes the leaf hooks. Two guards: at attach the
construction checks itself (one forward and backward of a two-row batch whose flagged row alone
makes the loss must give exactly zero gradient to every base parameter, through the model's
plain forward and, where TRL added it, its fused LM head); and during training a tensor hook on
every base parameter refuses (:class:`~gradroute.errors.RoutingError`) a gradient that arrives
while flagged rows are in the batch through a use none of the constructions saw. TRL's trainers
score through ``add_fused_lm_head`` (``lm_head.weight`` used directly): that call gets its own
exact construction (:meth:`QuarantineMode._wrap_fused_head`). A parameter used both inside its
module and around it is not caught by the tensor hook (only by the self-check's paths).

**Advantages** (GRPO): TRL normalizes each rollout's reward against its group, flagged rollouts
included, so an unflagged honest rollout in a group where others hacked gets a *negative*
advantage — the base is taught away from what the flagged rows were paid for instead. With
``advantages="exclude"`` (:func:`unflagged_advantages`) the unflagged rows' advantages are
recomputed over their unflagged group-mates only, so the base trains as RL on a world where the
flagged rollouts were never sampled; the flagged rows keep TRL's advantages (they train ``Q``).

Per-environment attribution counts the unflagged rows (it contracts the persona adapter's
gradient, which flagged rows do not reach); the monitor's activation and push records still see
every row.
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import AdapterError, CheckpointError, ConfigError, PackingError, RoutingError
from ...model import unwrap_model
from .activation import ActivationMode, _Adapters, _RemoveSpanGrad

QUARANTINE_ATTR = "gradroute_quarantine"
ADVANTAGES = ("keep", "exclude")


def unflagged_advantages(rewards: torch.Tensor, flags: torch.Tensor, advantages: torch.Tensor, group: int,
                         scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages with the flagged rows left out of every unflagged row's baseline.

    For an unflagged row ``i`` in group ``g`` (``group`` consecutive rows share a prompt), with
    ``F`` the flagged rows and NaN rewards (unscorable) left out as TRL does:
    ``A_i = (r_i − mean_{j∈g∖F} r_j) / (σ + eps)``, ``σ = std_{j∈g∖F} r_j`` (``scale="group"``),
    the std over every unflagged row (``"batch"``), or no division (``"none"``); 0 where that is
    undefined (a group with fewer than two unflagged rows). Flagged rows keep ``advantages``."""
    if scale not in ("group", "batch", "none"):
        raise ConfigError(f"unknown reward scaling {scale!r}.", "use 'group', 'batch' or 'none' (TRL's scale_rewards).")
    if rewards.shape != flags.shape or rewards.shape != advantages.shape or rewards.numel() % group:
        raise PackingError(f"rewards {tuple(rewards.shape)}, flags {tuple(flags.shape)} and advantages "
                           f"{tuple(advantages.shape)} must be one value per rollout, in groups of {group}.",
                           "pass the generation batch's rewards, flags and advantages as TRL computed them.")
    r = torch.where(flags.to(rewards.device), torch.full_like(rewards, float("nan")), rewards.double())
    g = r.view(-1, group)
    n = (~torch.isnan(g)).sum(1, keepdim=True)
    mean = torch.nanmean(g, dim=1, keepdim=True)
    out = g - mean
    if scale != "none":
        if scale == "group":
            var = torch.nansum((g - mean) ** 2, dim=1, keepdim=True) / (n - 1).clamp(min=1)
            std = var.sqrt()
        else:
            flat = r[~torch.isnan(r)]
            std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=flat.dtype)
        out = out / (std + eps)
    out = torch.where(n >= 2, out, torch.zeros_like(out)).view(-1)
    out = torch.nan_to_num(out, nan=0.0).to(advantages.dtype)
    return torch.where(flags.to(advantages.device), advantages, out.to(advantages.device))

#: leaf module types whose parameters are used only in their own forward, row by row along dim 0
_LEAF_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm)
_LEAF_NAMES = ("Conv1D",)  # transformers.pytorch_utils.Conv1D (GPT-2)


def _recomputable(m: nn.Module) -> bool:
    if any(True for _ in m.children()):
        return False
    name = type(m).__name__
    return isinstance(m, _LEAF_TYPES) or name in _LEAF_NAMES or name.endswith(("RMSNorm", "LayerNorm"))


class _Quarantine(nn.Module):
    """The quarantine adapters, registered on the model so that optimizers see them:
    ``D[key]`` (dense, ``d x d_in``) or ``A[key]`` (``r x d_in``) and ``B[key]`` (``d x r``)."""

    def __init__(self) -> None:
        super().__init__()
        self.D = nn.ParameterDict()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()


class QuarantineMode(ActivationMode):
    name = "quarantine"
    supports_sharding = False
    #: ``GradientRouter(mode_options=...)`` keys: the quarantine adapter's rank (None: full width,
    #: a dense ``d x d_in`` delta per writer) and the seed of a low-rank adapter's random ``A``
    option_names = ("quarantine_rank", "quarantine_seed")

    @classmethod
    def rebuild_options(cls, meta: dict[str, Any]) -> dict[str, Any]:
        out = super().rebuild_options(meta)
        rank = (meta.get("mode_state") or {}).get("quarantine_rank")
        if rank is not None:
            out["mode_options"] = {"quarantine_rank": rank}
        return out

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        super().setup()
        try:
            self._setup_quarantine()
        except BaseException:
            self.remove()
            raise

    def _setup_quarantine(self) -> None:
        if self.moe or self.post_norm:
            some = min(self.moe or self.post_norm)
            raise ConfigError(
                f"mode='quarantine' routes pre-norm dense models only; {some!r} writes through a "
                f"{'mixture-of-experts block' if self.moe else 'post-norm'}, whose flagged rows cannot be recomputed "
                "leaf by leaf.", "use mode='activation' for this model (no per-row quarantine).")
        for h in self.handles:  # activation's write hooks are replaced by the quarantine's own (below)
            h.remove()
        self.handles = []
        rank = self.options.get("quarantine_rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"quarantine_rank must be a positive integer or None (full width), got {rank!r}.",
                              "pass e.g. mode_options={'quarantine_rank': 16}, or leave it unset.")
        self.rank = rank
        base = unwrap_model(self.ctx.model)
        if getattr(base, QUARANTINE_ATTR, None) is not None:
            raise ConfigError("this model already has quarantine adapters (a second router?).",
                              "route a model with one router; call router.detach() on the old one first.")
        self._flags: torch.Tensor | None = None
        self._idx: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        q = _Quarantine()
        gen = torch.Generator().manual_seed(int(self.options.get("quarantine_seed") or 0))  # not the global RNG
        dev = next(base.parameters()).device
        self.qkeys: dict[str, str] = {}
        for r in self.ctx.routes:
            t = r.target
            if t.side != "write":
                continue  # embeddings: the persona adapter routes their span; Q sits on the block writers
            d_out, d_in = t.weight_shape if t.kind == "linear" else t.weight_shape[::-1]
            dtype = torch.float64 if r.weight.dtype == torch.float64 else torch.float32
            key = _Adapters.key(r.name)
            if rank is None:
                q.D[key] = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype, device=dev))
            else:
                a = torch.randn(rank, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
                q.A[key] = nn.Parameter(a.to(dtype).to(dev))
                q.B[key] = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=dev))
            self.qkeys[r.name] = key
        base.add_module(QUARANTINE_ATTR, q)
        self.quarantine = q
        keys = {f"{QUARANTINE_ATTR}.{part}.{k}" for part in ("D", "A", "B") for k in getattr(q, part)}
        base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) | keys
        self.q_nonzero = False
        # the base-detach hooks go on every module holding parameters (first, so that the write
        # hooks below act on the replaced output), then the write hooks on the routed writes
        own = {id(p) for p in self.params.values()} | {id(p) for p in q.parameters()}
        inputs = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        for name, m in base.named_modules():
            direct = [p for _, p in m.named_parameters(recurse=False) if id(p) not in own]
            if not direct:
                continue
            if not _recomputable(m):
                if any(p.requires_grad for p in direct):
                    raise RoutingError(
                        f"{name!r} ({type(m).__name__}) holds its own parameters but is not a leaf module quarantine "
                        "mode can recompute row by row, so a flagged row could train it.",
                        "use mode='activation' for this model, or freeze that module's parameters "
                        "(requires_grad_(False)) if it need not train.")
                continue
            kind = "input" if m is inputs else ("embedding" if isinstance(m, nn.Embedding) else "leaf")
            self.handles.append(m.register_forward_hook(_BaseDetach(self, name, kind), with_kwargs=True, prepend=True))
        for r in self.ctx.routes:
            self.handles.append(r.module.register_forward_hook(_QuarantineWrite(self, r)))
        self._fused_call = False
        self._fused_saved: tuple[nn.Module, dict[str, Any]] | None = None
        self._wrap_fused_head(base)
        # the sentinel: a base parameter whose gradient arrives while flagged rows are in the
        # batch, and whose use none of the constructions above saw, is a leak: refused
        self._handled: set[int] = set()
        for name, p in base.named_parameters():
            if id(p) not in own and p.requires_grad:
                self.handles.append(p.register_hook(_Sentinel(self, name, id(p))))
        self._self_check(base)

    def _wrap_fused_head(self, base: nn.Module) -> None:
        """TRL's fused LM head (``add_fused_lm_head``: ``model(..., fused_lm_head=True)`` runs the
        backbone, then uses ``lm_head.weight`` directly, never calling ``lm_head``): for a training
        call with flagged rows, the backbone's last hidden state ``h`` is widened to
        ``[m h, (1−m) h (, m, 1−m)]`` (m: 1 on unflagged rows) and the head's weight, for that call,
        to ``[W, W.detach() (, b, b.detach())]`` (bias folded in): the same logits, the same
        gradient to ``h``, and to ``W`` (and ``b``) from the unflagged rows only."""
        fwd = base.__dict__.get("forward")  # TRL's patch is an instance attribute
        self._fused_forward = None
        if fwd is None or "fused_lm_head" not in inspect.signature(fwd, follow_wrapped=False).parameters:
            return
        backbone = getattr(base, "base_model", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if backbone is None or backbone is base or head is None or not isinstance(getattr(head, "weight", None),
                                                                                    torch.Tensor):
            raise RoutingError("this model has TRL's fused LM head but no backbone / output embedding quarantine mode "
                               "can find, so flagged rows would train the head.", "use mode='activation' for this model.")
        base._gradroute_inner_forward = fwd  # a plain attribute: a deep copy rebinds it to the copy
        base.forward = types.MethodType(_fused_forward, base)  # type: ignore[method-assign]
        _FUSED[base] = self  # a copy of the model is not here: its forward is the plain fused one
        self._fused_forward = (base, fwd)
        self.handles.append(backbone.register_forward_hook(_FusedHead(self, head)))

    def _self_check(self, base: nn.Module) -> None:
        """A two-row batch whose flagged row alone makes the loss: every base parameter must get
        exactly zero gradient (else something uses it outside a recomputed leaf)."""
        cfg = getattr(base, "config", None)
        vocab = getattr(cfg, "vocab_size", None) or base.get_input_embeddings().weight.shape[0]
        dev = next(base.parameters()).device
        ids = torch.arange(4, dtype=torch.long).remainder(vocab).repeat(2, 1).to(dev)
        ids[1] = ids[1].flip(0)
        params = [p for p in base.parameters()]
        saved = [p.grad for p in params]
        mine = {id(p) for p in self.trainable_parameters()}
        try:
            for p in params:
                p.grad = None
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                self.set_flags([True, False])
                out = base(input_ids=ids, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                logits[0].float().pow(2).mean().backward()
                if self._fused_forward is not None:  # TRL's fused head: the path its trainers train through
                    self.set_flags([True, False])
                    out = base(input_ids=ids, labels=ids, fused_lm_head=True)
                    out.log_probs[0].float().pow(2).sum().backward()
            leaked = [n for n, p in base.named_parameters() if id(p) not in mine and p.grad is not None
                      and bool(p.grad.abs().max() > 0)]
            if leaked:
                raise RoutingError(
                    f"a flagged row still reaches {leaked[0]!r} ({len(leaked)} parameters): it is used outside the "
                    "module that owns it (tied or shared in a way quarantine mode does not recompute).",
                    "use mode='activation' for this model, or freeze those parameters.")
            qg = [p.grad for p in self.quarantine.parameters() if p.grad is not None]
            if self.quarantine_parameters() and not any(bool(g.abs().max() > 0) for g in qg):
                raise RoutingError("the quarantine adapters get no gradient from a flagged row: they are not on "
                                   "the model's forward path.", "use mode='activation' for this model.")
        finally:
            self.set_flags(None)
            for p, g in zip(params, saved):
                p.grad = g

    # ------------------------------------------------------------------ flags
    def set_flags(self, flags: Any) -> None:
        """The flags (one bool per row, True: quarantined) of the next training forwards, in row
        order; None clears them. They hold until replaced, or until the optimizer step is
        accounted (``router.step()``); a training forward without flags is refused."""
        self._handled = set()
        if flags is None:
            self._flags, self._idx = None, {}
            return
        if isinstance(flags, str | bytes):
            raise ConfigError(f"flags must be one bool per row, got {flags!r}.", "pass a list or tensor of bools.")
        t = flags.detach().cpu() if torch.is_tensor(flags) else torch.tensor(list(flags))
        if t.ndim != 1:
            raise ConfigError(f"flags must be one bool per row (a 1-D sequence), got shape {tuple(t.shape)}.",
                              "pass one bool per row of the batch.")
        if t.dtype != torch.bool:
            if t.is_floating_point() and bool(torch.isnan(t).any()):
                raise ConfigError("a row's flag is NaN: it is neither flagged nor clean.",
                                  "give every row a True/False flag (the detector must decide every row).")
            if not bool(((t == 0) | (t == 1)).all()):
                raise ConfigError(f"flags must be booleans (or 0/1), got values {sorted(set(t.tolist()))[:5]}.",
                                  "pass one bool per row.")
            t = t.bool()
        self._flags, self._idx = t, {}

    @property
    def flags(self) -> torch.Tensor | None:
        return None if self._flags is None else self._flags.clone()

    def _rows(self, device: torch.device, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (B,), flagged indices) on ``device`` for a training forward; refuses without flags."""
        if self._flags is None:
            raise ConfigError(
                f"a training forward (gradients on) reached {where!r} in quarantine mode without the rows' flags, so "
                "it cannot tell which rows may train the base.",
                "set them before every training forward: router.set_flags(flags) (or router.mode_strategy.set_flags), "
                "or gradroute.attach(..., mode='quarantine', quarantine=detector); run other forwards under "
                "torch.no_grad().")
        hit = self._idx.get(device)
        if hit is None:
            mask = self._flags.to(device)
            hit = self._idx[device] = (mask, mask.nonzero().reshape(-1))
        return hit

    def _check_rows(self, n: int, where: str) -> None:
        if self._flags is not None and n != self._flags.numel():
            raise PackingError(
                f"{self._flags.numel()} quarantine flags for a forward of {n} rows at {where!r}: rows were packed, "
                "chunked or reshaped, so they cannot be matched to their flags.",
                "run one forward per micro-batch with one row per sample (no packing / padding-free batching), "
                "with one flag per row.")

    # ------------------------------------------------------------------ adapters
    def quarantine_parameters(self) -> list[nn.Parameter]:
        return list(self.quarantine.parameters()) if getattr(self, "quarantine", None) is not None else []

    def quarantine_norm(self) -> float:
        """‖Q‖: the Frobenius norm of the quarantine adapters' weight deltas (B A for a LoRA)."""
        total = 0.0
        with torch.no_grad():
            for key in self.qkeys.values():
                total += float(self._q_delta(key).double().pow(2).sum())
        return math.sqrt(total)

    def _q_delta(self, key: str) -> torch.Tensor:
        q = self.quarantine
        return q.D[key].detach() if key in q.D else q.B[key].detach() @ q.A[key].detach()

    def _q_forward(self, key: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = self.quarantine
        if key in q.D:
            return F.linear(x, q.D[key].to(dtype))
        return F.linear(F.linear(x, q.A[key].to(dtype)), q.B[key].to(dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + self.quarantine_parameters()

    def check_optimizer(self, stepped: set[int]) -> None:
        missing = [n for n, p in self.quarantine.named_parameters() if id(p) not in stepped]
        if missing:
            raise ConfigError(
                f"the optimizer does not train the quarantine adapters ({len(missing)} missing, e.g. {missing[0]!r}): "
                "it was probably created before the router.",
                "create the optimizer after GradientRouter(..., mode='quarantine'), over model.parameters().")
        super().check_optimizer(stepped)

    def remove(self) -> None:
        super().remove()
        fused = getattr(self, "_fused_forward", None)
        if fused is not None:
            model, fwd = fused
            if getattr(model.__dict__.get("forward"), "__func__", None) is _fused_forward:
                model.forward = fwd
            model.__dict__.pop("_gradroute_inner_forward", None)
            _FUSED.pop(model, None)
        self._fused_forward = None
        base = unwrap_model(self.ctx.model)
        q = getattr(self, "quarantine", None)
        if q is not None and getattr(base, QUARANTINE_ATTR, None) is q:
            delattr(base, QUARANTINE_ATTR)
            keys = {f"{QUARANTINE_ATTR}.{part}.{k}" for part in ("D", "A", "B") for k in getattr(q, part)}
            base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) - keys

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def after_step(self) -> dict[str, list[torch.Tensor]]:
        deltas = super().after_step()
        self.q_nonzero = True
        self.set_flags(None)  # each step's micro-batches set their own
        return deltas

    def skipped(self) -> None:
        super().skipped()
        self.set_flags(None)

    # ------------------------------------------------------------------ the adapter in the model
    @torch.no_grad()
    def cleared(self, route: Any) -> None:
        super().cleared(route)
        key = self.qkeys.get(route.name)
        if key is None:
            return
        q = self.quarantine
        if key in q.D:
            q.D[key].zero_()
        else:
            q.B[key].zero_()  # Q = B A = 0; A keeps its random start, so B trains again from here

    def merge(self, route: Any) -> None:
        if self.q_nonzero and any(bool(self._q_delta(k).abs().max() > 0) for k in self.qkeys.values()):
            raise AdapterError(
                "the quarantine adapter holds what the flagged rows trained; merging would put it into the base.",
                "discard it first (router.discard(), which removes the persona adapter too), or keep training.")
        super().merge(route)

    def adapter_changed(self) -> None:
        super().adapter_changed()
        self.q_nonzero = any(bool(self._q_delta(k).abs().max() > 0) for k in self.qkeys.values())

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_dict()
        for part in ("D", "A", "B"):
            for k, p in getattr(self.quarantine, part).items():
                tensors[f"quarantine.{part}.{k}"] = p.detach().cpu().contiguous()
        meta = {**meta, "quarantine_rank": self.rank}
        return tensors, meta

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        for part in ("D", "A", "B"):
            for k, p in getattr(self.quarantine, part).items():
                v = tensors.get(f"quarantine.{part}.{k}")
                if v is None or tuple(v.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"the router state has no quarantine adapter {part}.{k} of shape {tuple(p.shape)}: it was "
                        "saved by another routing (or another quarantine_rank).",
                        "resume with the mode and quarantine_rank the run was started with (see its router state).")
                p.copy_(v.to(p.device, p.dtype))
        self.adapter_changed()


def _swap_detached(m: nn.Module) -> dict[str, Any]:
    saved = dict(m._parameters)
    for n, p in saved.items():
        if p is not None:
            m._parameters[n] = p.detach()  # type: ignore[assignment]
    return saved


class _BaseDetach:
    """Forward hook on a leaf holding parameters: the flagged rows' output is recomputed with
    the parameters detached (``module.forward``, bypassing every hook) and put in place."""

    def __init__(self, mode: QuarantineMode | None, name: str, kind: str):
        self.mode, self.name, self.kind = mode, name, kind

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mode": None}  # a copied model computes the plain forward

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        mode = self.mode
        if mode is None or not torch.is_grad_enabled() or not torch.is_tensor(output):
            return None
        if not any(p is not None and p.requires_grad for p in module._parameters.values()):
            return None
        if kwargs or len(args) != 1 or not torch.is_tensor(args[0]):
            raise RoutingError(f"{self.name!r} ({type(module).__name__}) was called with other than one tensor "
                               "argument, so quarantine mode cannot recompute its flagged rows.",
                               "use mode='activation' for this model.")
        x = args[0]
        mask, idx = mode._rows(output.device, self.name)
        B = mask.numel()
        if self.kind == "input":
            mode._check_rows(x.shape[0], self.name)
        if idx.numel() == 0:
            return None
        mode._handled.update(id(p) for p in module._parameters.values() if p is not None)
        saved = _swap_detached(module)
        try:
            if output.shape[0] == B and x.shape[0] == B:
                alt = module.forward(x[idx])
                return output.index_copy(0, idx, alt.to(output.dtype))
            if self.kind == "embedding" and output.shape[0] == 1 and x.shape[0] == 1:
                # computed once and broadcast over the batch (GPT-2's position embedding): one row per sample
                alt = module.forward(x).to(output.dtype)
                full = output.expand(B, *output.shape[1:])
                return full.index_copy(0, idx, alt.expand(idx.numel(), *alt.shape[1:]))
        finally:
            module._parameters.update(saved)
        mode._check_rows(output.shape[0], self.name)
        raise PackingError(f"{self.name!r} got {x.shape[0]} input rows and gave {output.shape[0]} for {B} flags: its "
                           "rows cannot be matched to the flags.", "run the model on one row per sample.")


_FUSED: weakref.WeakKeyDictionary[nn.Module, QuarantineMode] = weakref.WeakKeyDictionary()


def _fused_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's forward over TRL's fused one: marks a training call with the fused head so that
    :class:`_FusedHead` widens it, and restores the head's parameters afterwards."""
    inner = model.__dict__["_gradroute_inner_forward"]
    mode = _FUSED.get(model)
    if mode is None or not (kwargs.get("fused_lm_head") and torch.is_grad_enabled()):
        return inner(*args, **kwargs)
    mode._fused_call = True
    try:
        return inner(*args, **kwargs)
    finally:
        mode._fused_call = False
        if mode._fused_saved is not None:
            m, saved = mode._fused_saved
            m._parameters.update(saved)
            mode._fused_saved = None


_fused_forward.__name__ = "forward"  # a pickled model finds it again as its forward (as TRL's own patch)


class _Sentinel:
    """Tensor hook on a base parameter: its gradient while flagged rows are in the batch must come
    from a use the quarantine saw (a recomputed leaf, the fused head), else it is refused."""

    def __init__(self, mode: QuarantineMode | None, name: str, pid: int):
        self.mode, self.name, self.pid = mode, name, pid

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mode": None}

    def __call__(self, grad: torch.Tensor) -> None:
        mode = self.mode
        if mode is None or mode._flags is None or not bool(mode._flags.any()) or self.pid in mode._handled:
            return
        if not bool(grad.abs().max() > 0):
            return
        raise RoutingError(
            f"{self.name!r} got a gradient while flagged rows were in the batch, through a use quarantine mode did "
            "not see (the parameter was used outside its module's forward), so a flagged row may have trained it.",
            "use mode='activation' for this model or training loop (or report the model: its use of this parameter "
            "needs its own construction).")


class _FusedHead:
    """Forward hook on the backbone during a fused-head training call (see
    :meth:`QuarantineMode._wrap_fused_head`): widens the last hidden state and swaps the head's
    weight (and bias) for the call."""

    def __init__(self, mode: QuarantineMode | None, head: nn.Module):
        self.mode, self.head = mode, head

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mode": None}

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        mode = self.mode
        if mode is None or not mode._fused_call:
            return None
        h = getattr(output, "last_hidden_state", None)
        if h is None:
            raise RoutingError("the fused LM head's backbone returned no last_hidden_state.",
                               "use mode='activation' for this model.")
        mask, idx = mode._rows(h.device, "fused lm_head")
        mode._check_rows(h.shape[0], "fused lm_head")
        if idx.numel() == 0:
            return None
        head = self.head
        W, b = head.weight, getattr(head, "bias", None)
        m = (~mask).to(h.dtype).reshape(-1, *([1] * (h.ndim - 1)))
        parts = [h * m, h * (1 - m)]
        cols = [W, W.detach()]
        if b is not None:
            ones = torch.ones(*h.shape[:-1], 1, dtype=h.dtype, device=h.device)
            parts += [ones * m, ones * (1 - m)]
            cols += [b.reshape(-1, 1), b.detach().reshape(-1, 1)]
        output.last_hidden_state = torch.cat(parts, dim=-1)
        saved = dict(head._parameters)
        head._parameters["weight"] = torch.cat([c.to(W.dtype) for c in cols], dim=1)  # type: ignore[assignment]
        if b is not None:
            head._parameters["bias"] = None
        mode._fused_saved = (head, saved)
        mode._handled.update(id(p) for p in saved.values() if p is not None)
        return output


class _QuarantineWrite:
    """The forward hook on a routed write ``y`` with input x (after :class:`_BaseDetach`)::

        y' = RemoveSpanGrad(y) + s · Ũ (C x)  [C detached on flagged rows]  + flagged · Q x

    without gradients (no flags): ``y + s · Ũ (C x) + Q x`` on every row."""

    def __init__(self, mode: QuarantineMode | None, r: Any):
        self.mode, self.route = mode, r
        self.name = r.name
        self.orient = r.target.orientation
        self.U32, self.U64 = r.basis32(), r.basis()
        self.container = mode.container if mode is not None else None
        self.quarantine = mode.quarantine if mode is not None else None
        self.key = _Adapters.key(r.name)
        self.qkey = mode.qkeys.get(r.name) if mode is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "mode": None, "route": None}

    def _q(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = self.quarantine
        assert q is not None and self.qkey is not None
        if self.qkey in q.D:
            return F.linear(x, q.D[self.qkey].to(dtype))
        return F.linear(F.linear(x, q.A[self.qkey].to(dtype)), q.B[self.qkey].to(dtype))

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not torch.is_tensor(output):
            return None
        mode = self.mode
        x = args[0] if args else None
        grad = torch.is_grad_enabled()
        train = grad and mode is not None  # the adapters always take gradients: a training forward
        if not grad and mode is not None and not mode.nonzero and not mode.q_nonzero:
            return None  # both adapters are exactly zero: the plain forward
        if x is None:
            raise RoutingError(f"{self.name!r} was called without a positional input, so its adapters cannot be applied.",
                               "call the model's forward as a whole (input_ids=...), or use mode='activation'.")
        U = self.U64 if output.dtype == torch.float64 else self.U32
        U = U if U.device == output.device else U.to(output.device)
        Ut = U.to(output.dtype)
        C = self.container.coords[self.key]
        xin = x.detach()
        if not train:
            out = output + self.orient.delta_forward(xin, C.to(output.dtype), Ut)
            if self.qkey is not None:
                out = out + self._q(x, output.dtype)
            return out
        assert mode is not None
        mask, idx = mode._rows(output.device, self.name)
        y = _RemoveSpanGrad.apply(output, U) if output.requires_grad else output
        delta = self.orient.delta_forward(xin, C.to(output.dtype), Ut)
        attribution = mode.attribution
        if attribution is not None and delta.requires_grad:
            per_row = attribution.capture(self.route, xin, delta, self.route.module)  # sees the unflagged rows' gradient
            delta = delta if per_row is None else per_row
        if idx.numel():
            shape = (mask.numel(),) + (1,) * (delta.ndim - 1)
            delta = torch.where(mask.reshape(shape), delta.detach(), delta)  # flagged rows: nothing reaches C
        out = y + delta
        if self.qkey is not None and idx.numel():
            if out.shape[0] != mask.numel() or x.shape[0] != mask.numel():
                mode._check_rows(out.shape[0], self.name)
                mode._check_rows(x.shape[0], self.name)
            out = out.index_add(0, idx, self._q(x[idx], output.dtype))
        return out


__all__ = ["QUARANTINE_ATTR", "QuarantineMode"]
