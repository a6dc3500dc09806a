"""Capture: the hooks that record, per environment, each step's in-subspace gradient.

For every routed module a forward hook registers a tensor hook on the module's output, which
in the backward pass contracts the output gradient with the input, by environment, in the
adapter's coordinates. For a writer ``y = W x`` with basis U and output gradient ``δ_t`` at
token t:

    G_e = Σ_{t ∈ e} (Uᵀ δ_t) x_tᵀ            (k x d_in; Σ_e G_e = Uᵀ ∇_W L exactly)

(readers: ``Σ δ_t (Vᵀ x_t)ᵀ``; embeddings: ``Σ onehot(id_t) (Uᵀ δ_t)ᵀ``; writer biases:
``Σ Uᵀ δ_t``). Hooks act only when gradients are enabled and the module is training, so
generation and reference passes are ignored; contributions add up over gradient-accumulation
micro-batches; with gradient checkpointing the tensor hook on the module output fires once.

Also captured per environment: rows (samples), the projection sums ``Σ_t Uᵀh_t`` of the
probed layers' residual activations over live tokens, and rewards (:meth:`Capture.record_rewards`).
The rows' environments come before the forward pass (:meth:`Capture.set_batch` /
:meth:`Capture.batch`) or at the step (``router.step(env_ids=...)``, which resolves what was
captured per row in the meantime, :meth:`Capture._resolve_pending`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ... import projection as P
from ...distributed import world_size
from ...errors import EnvColumnError, PackingError
from ...hooks import LiveOnly
from ...layers import LayerKey
from ...model import add_residual_hook, weight_module
from ..envs import Environments

if TYPE_CHECKING:
    from ..route import Route

__all__ = ["WATCH", "Capture"]

#: the probe keys of watched (monitored, not routed) residual layers: ``"watch:<L>"``
WATCH = "watch:"


class Capture:
    """Hooks and per-step sums of what they capture, by environment index.

    Per step: ``_G[module][e]`` / ``_Gb[module][e]`` (in-subspace weight / bias gradient),
    ``_act[layer][e]`` and ``_act_tokens[layer][e]`` (projection sums and live-token counts),
    ``_rows[e]`` (samples), ``_rewards[e]`` (``[sum, count]``), ``_push[layer][e]`` (the persona
    push and its random null, :meth:`_push_backward`). What was captured before the
    environments were known waits in ``_pending*`` until :meth:`_resolve_pending`.
    """

    #: random directions per probe layer that the persona push is compared with (its null)
    NULL_DIRECTIONS = 16
    #: record the persona push (a backward hook per probe layer); off only to measure its cost
    record_push = True

    def __init__(
        self,
        model: torch.nn.Module,
        routes: Sequence[Route],
        environments: Environments,
        probes: dict[LayerKey, torch.Tensor],
        *,
        capture: bool = True,
        activations: bool = True,
    ):
        self.model = model
        self.routes = list(routes)
        self.environments = environments
        self.probes = dict(probes)
        self._ctx: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._G: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self._Gb: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self._pending: list[tuple[str, torch.Tensor, bool]] = []      # (module, per-row G, is_bias)
        self._pending_act: list[tuple[LayerKey, torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        self._act: dict[LayerKey, dict[int, torch.Tensor]] = defaultdict(dict)
        self._act_tokens: dict[LayerKey, dict[int, float]] = defaultdict(dict)
        self._push: dict[LayerKey, dict[int, torch.Tensor]] = defaultdict(dict)
        self._pending_push: list[tuple[LayerKey, torch.Tensor]] = []
        self._push_dirs = {L: self._with_null(U, i) for i, (L, U) in enumerate(self.probes.items())}
        self._rows: dict[int, float] = defaultdict(float)
        self._rewards: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._handles: list[Any] = []
        self._param_of: dict[str, torch.nn.Parameter] = {}
        self._last_grad: dict[str, torch.Tensor] = {}
        self._single_env: int | None = None
        self._ctx_single: int | None = None
        self._forward_rows = 0  # rows of the model's current training forward (its input's batch size)
        self._install(capture, activations)

    # ------------------------------------------------------------------ environments
    @property
    def vocab(self) -> list[str]:
        return self.environments.names

    @property
    def fixed_vocab(self) -> bool:
        return self.environments.fixed

    def env_index(self, name: Any) -> int:
        return self.environments.index(name)

    def _to_index(self, env_ids: Any) -> torch.Tensor:
        if torch.is_tensor(env_ids):
            ids = env_ids.detach().to("cpu").long().reshape(-1)
            if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.vocab)):
                raise EnvColumnError(f"env index out of range for environments {self.vocab}.",
                                     "pass indices into the declared environments, or their names.")
            return ids
        return torch.tensor([self.env_index(e) for e in env_ids], dtype=torch.long)

    def set_batch(self, env_ids: Any | None, attention_mask: torch.Tensor | None = None) -> None:
        """Environments of the rows of the next forward/backward passes (None clears)."""
        self._ctx = None if env_ids is None else self._to_index(env_ids)
        self._mask = attention_mask
        ctx = self._ctx  # one environment in the whole batch: the adapters' own gradients can be read
        self._ctx_single = (int(ctx[0]) if ctx is not None and ctx.numel() > 0 and bool((ctx == ctx[0]).all())
                            and world_size() == 1 else None)

    class _Batch:
        def __init__(self, attr: Capture, env_ids: Any, mask: Any):
            self.attr, self.env_ids, self.mask = attr, env_ids, mask

        def __enter__(self):
            self.attr.set_batch(self.env_ids, self.mask)
            return self.attr

        def __exit__(self, *exc):
            self.attr.set_batch(None)

    def batch(self, env_ids: Any, attention_mask: torch.Tensor | None = None) -> Capture._Batch:
        """Context manager: ``with attribution.batch(env_ids): loss = ...; loss.backward()``."""
        return Capture._Batch(self, env_ids, attention_mask)

    def record_rewards(self, env_ids: Sequence[Any], rewards: Sequence[float]) -> None:
        """Rewards of completions (RL), by environment, for the per-environment mean reward."""
        for e, r in zip(env_ids, rewards):
            if r is None or (isinstance(r, float) and math.isnan(r)):
                continue
            acc = self._rewards[self.env_index(e)]
            acc[0] += float(r)
            acc[1] += 1.0

    # ------------------------------------------------------------------ hooks
    def _install(self, capture: bool, activations: bool) -> None:
        modules = dict(self.model.named_modules())
        if capture:
            for r in self.routes:
                self._handles.append(weight_module(modules[r.name]).register_forward_hook(LiveOnly(
                    lambda m, a, out, r=r: self.capture(r, a[0] if a else None, out, m))))  # may expand out
        self._handles.append(self.model.register_forward_pre_hook(LiveOnly(self._model_pre_hook), with_kwargs=True))
        if activations:
            for L, U in self.probes.items():
                hook = self._activation_hook(U)
                if isinstance(L, int):
                    self._handles.append(add_residual_hook(self.model, L, hook, live_only=True))
                elif isinstance(L, str) and L.startswith(WATCH):  # a watched (not routed) residual layer
                    self._handles.append(add_residual_hook(self.model, int(L[len(WATCH):]),
                                                           lambda _, h, L=L, hook=hook: hook(L, h), live_only=True))
                else:
                    self._handles.append(modules[L].register_forward_hook(LiveOnly(
                        lambda m, a, out, L=L, hook=hook: hook(L, out if torch.is_tensor(out) else out[0]))))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _active(self, module: torch.nn.Module) -> bool:
        return torch.is_grad_enabled() and module.training

    def _model_pre_hook(self, module, args, kwargs):
        if not self._active(module):
            return
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.ndim == 2:
            self._mask = mask
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_tensor(ids):
            ids = kwargs.get("inputs_embeds")
        if torch.is_tensor(ids) and ids.ndim >= 1:
            B = ids.shape[0]
            self._forward_rows = B
            if self._ctx is not None:
                if self._ctx.numel() != B:
                    raise EnvColumnError(
                        f"{self._ctx.numel()} environment ids for a batch of {B} rows.",
                        "give one environment id per row of the batch that is run.",
                    )
                for e in self._ctx.tolist():
                    self._rows[e] += 1.0
            else:
                self._pending_rows += B
        return

    def capture(self, route: Route, x: Any, output: Any, module: torch.nn.Module) -> torch.Tensor | None:
        """Record, in the backward pass, the in-subspace gradient of ``route`` that flows through
        ``output`` (computed from input ``x``), by environment.

        Returns the tensor the module should output instead, or None to keep ``output``: an
        embedding computed once for the whole batch and broadcast over it (GPT-2's position
        embedding, ``wpe(position_ids)`` of shape ``(1, T, d)``) is expanded to one row per
        sample. The forward values are unchanged (the sum it enters broadcasts to the same
        numbers) and the gradient reaching the weight is the same (``expand``'s backward sums
        the rows), but the gradient at the expanded tensor is per row, so it can be matched to
        the rows' environments."""
        if not (self._active(module) and torch.is_tensor(output) and output.requires_grad) or x is None:
            return None
        env = self._ctx
        if route.name in self._param_of:
            self._single_env = self._ctx_single if env is not None else None
            if self._single_env is not None:  # read off the adapter's own gradient after the backward
                return None
        x = x.detach()
        replaced = None
        rows = self._forward_rows
        if (route.target.side == "embed" and rows > 1 and output.ndim >= 2 and output.shape[0] == 1
                and torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] == 1):
            output = replaced = output.expand(rows, *output.shape[1:])
            x = x.expand(rows, *x.shape[1:])
        output.register_hook(lambda g: self._backward(route, x, g.detach(), env))
        return replaced

    def use_parameter_gradients(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Routes whose adapter coordinates are these trainable parameters (activation mode):
        when a micro-batch holds a single environment, that environment's gradient is exactly
        the parameter's gradient increment in the backward pass, so it is read off ``.grad``
        (one subtraction per parameter) instead of contracted token by token. Mixed micro-batches
        and multi-process runs use the token hooks."""
        self._param_of = dict(params)
        for name, p in params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(lambda p, name=name: self._param_grad(name, p)))

    @torch.no_grad()
    def _param_grad(self, name: str, p: torch.nn.Parameter) -> None:
        if p.grad is None:
            return
        g = p.grad.detach()
        last = self._last_grad.get(name)
        delta = g if last is None else g - last
        self._last_grad[name] = g.clone()
        e = self._single_env
        if e is None:
            return  # the token hooks captured this backward
        acc = self._G[name]
        delta = delta.float()
        acc[e] = acc[e] + delta if e in acc else delta.clone()

    @torch.no_grad()
    def _backward(self, route: Route, x: torch.Tensor, g: torch.Tensor, env: torch.Tensor | None) -> None:
        t = route.target
        orient = t.orientation
        has_bias = len(route.blocks) > 1
        U = route.basis32()
        B = g.shape[0] if g.ndim >= 2 else 1
        if t.side == "read":                            # the sums are kept in float32, whatever the weights' dtype
            r = P.coords(x, U).float()                  # Vᵀ x_t
            o = g.float()
        else:
            r = P.coords(g, U).float()                  # Uᵀ δ_t
            o = x if t.side == "embed" else x.float()
        k = r.shape[-1]
        r = r.reshape(B, -1, k)
        T = r.shape[1]
        if t.side == "embed":
            o = o.reshape(B, T)
        else:
            o = o.reshape(B, T, o.shape[-1])
        rows_e = t.weight_shape[0]

        if env is None:  # environments come later, with router.step(env_ids=...)
            self._pending.append((t.module, orient.contract_rows(r, o, rows_e), False))
            if has_bias:
                self._pending.append((t.module, r.sum(1), True))
            return
        if env.numel() != B:
            raise PackingError(
                f"{env.numel()} environment ids for a batch of {B} rows at {t.module!r}: rows were packed or "
                "reshaped, so tokens cannot be matched to environments.",
                "keep one row per sample (no packing / padding-free batching) while attributing.",
            )
        env = env.to(r.device)
        present = env.unique().tolist()
        for e in present:
            if len(present) == 1:  # the usual case in GRPO (one prompt group per micro-batch): no copies
                rr, oo = r.reshape(-1, k), o
            else:
                rows = env == e
                rr, oo = r[rows].reshape(-1, k), o[rows]
            oo = oo.reshape(-1) if t.side == "embed" else oo.reshape(-1, oo.shape[-1])
            G = orient.contract(rr, oo, rows_e)
            acc = self._G[t.module]
            acc[e] = acc[e] + G if e in acc else G
            if has_bias:
                gb = rr.sum(0)
                accb = self._Gb[t.module]
                accb[e] = accb[e] + gb if e in accb else gb

    @classmethod
    def _with_null(cls, U: torch.Tensor, i: int) -> torch.Tensor:
        """``[U | R]`` (d x (k + m)): the probe basis (columns oriented along the subspace's
        directions) and m random orthonormal directions orthogonal to it (fixed seed per layer)."""
        d, k = U.shape
        m = min(cls.NULL_DIRECTIONS, d - k)
        g = torch.Generator().manual_seed(7919 + i)
        Ud = U.detach().double().cpu()
        R = torch.randn(d, m, generator=g, dtype=torch.float64)
        R = R - Ud @ (Ud.T @ R)
        R, _ = torch.linalg.qr(R)
        return torch.cat([Ud, R], dim=1).float().to(U.device)

    @torch.no_grad()
    def _push_backward(self, layer: LayerKey, g: torch.Tensor, w: torch.Tensor, env: torch.Tensor | None) -> None:
        """The persona push of the backward pass at ``layer``: per row, ``−Σ_t w_t D ᵀ g_t`` with
        ``g_t = ∂loss/∂h_t`` the residual gradient at token t, ``w`` the live-token mask and
        ``D = [U | R]`` (:meth:`_with_null`). ``−Uᵀg`` is the first-order direction in which the
        step moves the persona coordinates of these tokens (before any routing: it is what the
        environment's loss asks of the residual stream); ``−Rᵀg`` the same along random
        directions, whose spread is the push's null."""
        D = self._push_dirs[layer]
        D = D if D.device == g.device else D.to(g.device)
        B = g.shape[0]
        c = (g.float() @ D).reshape(B, -1, D.shape[1])
        sums = -(c * w.to(c.device, c.dtype)[..., None]).sum(1)  # (B, k + m)
        if env is None:
            self._pending_push.append((layer, sums))
            return
        env = env.to(sums.device)
        acc = self._push[layer]
        for e in env.unique().tolist():
            s = sums[env == e].sum(0)
            acc[e] = acc[e] + s if e in acc else s

    def _activation_hook(self, U: torch.Tensor):
        per_device = {U.device: U.to(torch.float32)}

        def hook(layer: LayerKey, h: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not self.model.training:
                return
            with torch.no_grad():
                if h.device not in per_device:
                    per_device[h.device] = per_device[next(iter(per_device))].to(h.device)
                c = P.coords(h.detach(), per_device[h.device])       # (B, T, k)
                B, k = c.shape[0], c.shape[-1]
                c = c.reshape(B, -1, k)
                mask = self._mask
                if mask is None or mask.shape[0] != B or mask.shape[1] != c.shape[1]:
                    w = torch.ones(B, c.shape[1], device=c.device)
                else:
                    w = mask.to(c.device, c.dtype)
                sums = (c * w[..., None]).sum(1)                  # (B, k)
                tokens = w.sum(1)                                 # (B,)
                if self.record_push and h.requires_grad:
                    h.register_hook(lambda g, L=layer, w=w, env=self._ctx: self._push_backward(L, g.detach(), w, env))
                if self._ctx is None:
                    self._pending_act.append((layer, sums, tokens))
                    return
                env = self._ctx.to(c.device)
                for e in env.unique().tolist():
                    rows = env == e
                    acc, cnt = self._act[layer], self._act_tokens[layer]
                    s = sums[rows].sum(0)
                    acc[e] = acc[e] + s if e in acc else s
                    cnt[e] = cnt.get(e, 0.0) + float(tokens[rows].sum())
            return
        return hook

    # ------------------------------------------------------------------ per step
    def _resolve_pending(self, env_ids: Any | None) -> None:
        """Split what was captured per row without environments by ``env_ids`` (one per row)."""
        if not self._has_pending():
            return
        self.check_ready(env_ids)
        ids = self._to_index(env_ids)
        by_module: dict[tuple[str, bool], list[torch.Tensor]] = defaultdict(list)
        for module, per_row, is_bias in self._pending:
            by_module[(module, is_bias)].append(per_row)
        for (module, is_bias), parts in by_module.items():
            rows = torch.cat(parts)
            env = ids.to(rows.device)
            acc = (self._Gb if is_bias else self._G)[module]
            for e in env.unique().tolist():
                s = rows[env == e].sum(0)
                acc[e] = acc[e] + s if e in acc else s
        by_layer: dict[LayerKey, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for layer, sums, tokens in self._pending_act:
            by_layer[layer].append((sums, tokens))
        for layer, parts in by_layer.items():
            sums = torch.cat([p[0] for p in parts])
            tokens = torch.cat([p[1] for p in parts])
            env = ids.to(sums.device)[: sums.shape[0]]
            for e in env.unique().tolist():
                rows = env == e
                acc = self._act[layer]
                acc[e] = acc[e] + sums[rows].sum(0) if e in acc else sums[rows].sum(0)
                self._act_tokens[layer][e] = self._act_tokens[layer].get(e, 0.0) + float(tokens[rows].sum())
        by_layer_push: dict[LayerKey, list[torch.Tensor]] = defaultdict(list)
        for layer, sums in self._pending_push:
            by_layer_push[layer].append(sums)
        for layer, parts in by_layer_push.items():
            sums = torch.cat(parts)
            env = ids.to(sums.device)[: sums.shape[0]]
            acc = self._push[layer]
            for e in env.unique().tolist():
                s = sums[env == e].sum(0)
                acc[e] = acc[e] + s if e in acc else s
        for e in ids.tolist():
            self._rows[e] += 1.0
        self._pending, self._pending_act, self._pending_rows, self._pending_push = [], [], 0, []

    def _has_pending(self) -> bool:
        return bool(self._pending or self._pending_act or self._pending_rows or self._pending_push)

    def _pending_row_count(self) -> int:
        """Rows run this step without environment ids (counted at the model's forward, or, for
        calls without ``input_ids``, read off the captured per-row gradients)."""
        if self._pending_rows:
            return self._pending_rows
        first = next(((m, b) for m, _, b in self._pending), None)
        return sum(rows.shape[0] for m, rows, b in self._pending if (m, b) == first) if first else 0

    def check_ready(self, env_ids: Any | None) -> None:
        """Raise now (before the router changes anything) if this step cannot be attributed."""
        if not self._has_pending():
            return
        if env_ids is None:
            raise EnvColumnError(
                "gradients were recorded without environment ids.",
                "set them before the forward pass (attribution.batch(env_ids) / attach(..., env_column=...)) "
                "or pass router.step(env_ids=...) with one id per row of the step's micro-batches, in order.",
            )
        n = len(env_ids) if not torch.is_tensor(env_ids) else env_ids.numel()
        expected = self._pending_row_count()
        if expected and n != expected:
            raise EnvColumnError(
                f"router.step(env_ids=...) got {n} ids but the step ran {expected} rows.",
                "give one id per row of every micro-batch of the step, in order.",
            )
        self._to_index(env_ids)  # unknown names raise here too

    def _clear_step(self) -> None:
        """Forget this step's sums (gradients, activations, rows) and the batch's environments."""
        for d in (self._G, self._Gb, self._act, self._act_tokens, self._push):
            d.clear()
        self._last_grad.clear()  # the optimizer step is followed by zero_grad
        self._rows.clear()
        self._ctx = None

    def reset_step(self) -> None:
        """Forget what was captured for a step the optimizer skipped."""
        self._clear_step()
        self._pending, self._pending_act, self._pending_rows, self._pending_push = [], [], 0, []
