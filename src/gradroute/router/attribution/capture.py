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
from ...orientation import Orientation
from ..envs import Environments

if TYPE_CHECKING:
    from ..route import Route

__all__ = ["WATCH", "Capture"]

#: the probe keys of watched (monitored, not routed) residual layers: ``"watch:<L>"``
WATCH = "watch:"


class RowEnvs:
    """The environments of one micro-batch's rows, for per-environment sums in one contraction.

    ``ids``: (B,) environment indices (CPU); ``present``: the distinct ones, ascending;
    ``single``: the one environment when all rows share it (else None). With ``E`` the rows'
    one-hot (B x n, ``E[b, j] = 1`` iff row b is in ``present[j]``), a per-environment sum of
    per-row values ``V`` (B x ...) is ``Eᵀ V`` (:meth:`sum_by_env`): one matmul for every
    environment of a mixed micro-batch instead of a masked copy and a sum per environment.
    """

    __slots__ = ("_cache", "ids", "present", "single")

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.present: list[int] = sorted(set(ids.tolist()))
        self.single: int | None = self.present[0] if len(self.present) == 1 else None
        self._cache: dict[Any, Any] = {}

    def __len__(self) -> int:
        return self.ids.numel()

    def position(self, device: torch.device) -> torch.Tensor:
        """(B,) long: each row's index into ``present``."""
        key = ("pos", device)
        pos = self._cache.get(key)
        if pos is None:
            index = {e: j for j, e in enumerate(self.present)}
            pos = self._cache[key] = torch.tensor([index[e] for e in self.ids.tolist()], dtype=torch.long,
                                                  device=device)
        return pos

    def onehot(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``E`` (B x n): ``E[b, j] = 1`` iff row b belongs to environment ``present[j]``."""
        key = ("onehot", device, dtype)
        E = self._cache.get(key)
        if E is None:
            pos = self.position(torch.device("cpu"))
            E = torch.zeros(pos.numel(), len(self.present), dtype=dtype)
            E[torch.arange(pos.numel()), pos] = 1
            E = self._cache[key] = E.to(device)
        return E

    def sum_by_env(self, values: torch.Tensor) -> torch.Tensor:
        """``S[j] = Σ_{b : env_b = present[j]} values[b]`` (n x ...), as ``Eᵀ V`` over the rows
        (a plain sum over rows when one environment holds them all)."""
        if self.single is not None:
            return values.sum(0, keepdim=True)
        B = values.shape[0]
        E = self.onehot(values.device, values.dtype)
        return (E.T @ values.reshape(B, -1)).reshape(len(self.present), *values.shape[1:])

    def token_weights(self, w: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """``W`` (n x B·T): ``W[j, (b, t)] = E[b, j]·w_bt`` for the live-token weights ``w`` (B, T),
        so that ``W X`` sums the live tokens of each environment's rows; and each environment's
        live-token count. Kept for the last ``w`` seen (the probe layers of one forward share it)."""
        hit = self._cache.get("tokens")
        if hit is not None and hit[0] is w:
            return hit[1], hit[2]
        W = (self.onehot(w.device, w.dtype).T[:, :, None] * w[None]).reshape(len(self.present), -1)
        counts = W.sum(1).tolist()
        self._cache["tokens"] = (w, W, counts)  # type: ignore[assignment]
        return W, counts

    def accumulate(self, acc: dict[int, torch.Tensor], values: torch.Tensor) -> None:
        """``acc[e] += Σ_{b ∈ e} values[b]`` for every present environment e (:meth:`sum_by_env`)."""
        add_by_env(acc, self.present, self.sum_by_env(values))


def contract_by_env(orient: Orientation, r: torch.Tensor, o: torch.Tensor, rows: int, env: RowEnvs) -> torch.Tensor:
    """The token contraction of :meth:`Orientation.contract` summed per environment:
    ``G_e = Σ_{b ∈ e} Σ_t r_bt ⊗ o_bt`` in C's orientation, stacked (n x ...) in ``env.present``
    order; ``r`` (B, T, k), ``o`` (B, T, m) or token ids (B, T), ``rows`` the embedding's rows.

    One environment: one contraction over all tokens. Mixed rows: writers and readers contract
    per row (:meth:`Orientation.contract_rows`, one batched matmul) and sum the rows by
    environment (``Eᵀ``, :meth:`RowEnvs.sum_by_env`); embeddings index-add into one table of
    ``n·rows`` rows, token ``id`` of a row in ``present[j]`` landing on row ``j·rows + id``."""
    k = r.shape[-1]
    if env.single is not None:
        flat = o.reshape(-1) if orient.side == "embed" else o.reshape(-1, o.shape[-1])
        return orient.contract(r.reshape(-1, k), flat, rows).unsqueeze(0)
    if orient.side == "embed":
        n = len(env.present)
        ids = o + (env.position(o.device) * rows)[:, None]
        return orient.contract(r.reshape(-1, k), ids.reshape(-1), n * rows).reshape(n, rows, k)
    return env.sum_by_env(orient.contract_rows(r, o, rows))


def token_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row, the weighted sum over tokens ``Σ_t w_t x_t`` (B x d) of ``x`` (B, T, d) with
    token weights ``w`` (B, T) (the live-token mask): one batched matmul. Projections of it are
    the projections' sums (``Σ_t w_t Uᵀx_t = Uᵀ Σ_t w_t x_t``), at a d-vector per row instead of
    a k-vector per token."""
    B = x.shape[0]
    return torch.bmm(w.to(x.dtype).reshape(B, 1, -1), x.reshape(B, w.shape[-1], -1)).reshape(B, -1)


def add_by_env(acc: dict[int, torch.Tensor], envs: Sequence[int], sums: torch.Tensor) -> None:
    """``acc[envs[j]] += sums[j]``, in place (a new entry is ``sums[j]`` itself: the entries are
    the capture's own sums, never a tensor held elsewhere)."""
    for j, e in enumerate(envs):
        if e in acc:
            acc[e].add_(sums[j])
        else:
            acc[e] = sums[j]


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
        self._envs: RowEnvs | None = None  # self._ctx, ready for per-environment sums
        self._mask: torch.Tensor | None = None
        self._weights: tuple[Any, Any, torch.Tensor] | None = None  # _live_weights' last (mask, shape, w)
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
        self._envs = None if self._ctx is None else RowEnvs(self._ctx)
        self._mask = attention_mask
        # one environment in the whole batch: the adapters' own gradients can be read
        self._ctx_single = self._envs.single if self._envs is not None and world_size() == 1 else None

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
        env = self._envs
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
        self._last_grad[name] = g.clone()
        e = self._single_env
        if e is None:
            return  # the token hooks captured this backward
        delta = g if last is None else g - last
        acc = self._G[name]
        delta = delta.float()
        acc[e] = acc[e] + delta if e in acc else delta.clone()

    @torch.no_grad()
    def _backward(self, route: Route, x: torch.Tensor, g: torch.Tensor, env: RowEnvs | None) -> None:
        """The hook's work: this backward's ``G_e`` by environment, added to ``_G``."""
        G = self._contract(route, x, g, env)
        if G is not None:
            add_by_env(self._G[route.target.module], env.present, G)  # type: ignore[union-attr]

    def _contract(self, route: Route, x: torch.Tensor, g: torch.Tensor, env: RowEnvs | None) -> torch.Tensor | None:
        """``G_e`` of the rows (n x ..., in ``env.present`` order); writer-bias sums go to ``_Gb``.
        Without environments (None returned) the per-row sums wait in ``_pending``."""
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
            return None
        if len(env) != B:
            raise PackingError(
                f"{len(env)} environment ids for a batch of {B} rows at {t.module!r}: rows were packed or "
                "reshaped, so tokens cannot be matched to environments.",
                "keep one row per sample (no packing / padding-free batching) while attributing.",
            )
        if has_bias:
            env.accumulate(self._Gb[t.module], r.sum(1))
        return contract_by_env(orient, r, o, rows_e, env)

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
    def _push_backward(self, layer: LayerKey, g: torch.Tensor, w: torch.Tensor, env: RowEnvs | None) -> None:
        """The persona push of the backward pass at ``layer``: per row, ``−Σ_t w_t D ᵀ g_t`` with
        ``g_t = ∂loss/∂h_t`` the residual gradient at token t, ``w`` the live-token mask and
        ``D = [U | R]`` (:meth:`_with_null`). ``−Uᵀg`` is the first-order direction in which the
        step moves the persona coordinates of these tokens (before any routing: it is what the
        environment's loss asks of the residual stream); ``−Rᵀg`` the same along random
        directions, whose spread is the push's null."""
        D = self._push_dirs[layer]
        D = D if D.device == g.device else D.to(g.device)
        g = g.float()
        if env is None:
            self._pending_push.append((layer, -(token_sums(g, w) @ D)))  # per row (B, k + m)
            return
        W, _ = env.token_weights(w)
        add_by_env(self._push[layer], env.present, -((W.to(g.dtype) @ g.reshape(W.shape[1], -1)) @ D))

    def _live_weights(self, B: int, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The live-token weights ``w`` (B, T) of the current forward: the attention mask when it
        matches the activations' shape, else ones. The same tensor for every probe layer of a
        forward (so what is derived from it is computed once)."""
        mask = self._mask
        if mask is not None and (mask.shape[0] != B or mask.shape[1] != T):
            mask = None
        key = (B, T, device, dtype)
        hit = self._weights
        if hit is not None and hit[0] is mask and hit[1] == key:
            return hit[2]
        w = torch.ones(B, T, device=device, dtype=dtype) if mask is None else mask.to(device, dtype)
        self._weights = (mask, key, w)
        return w

    def _activation_hook(self, U: torch.Tensor):
        per_device = {U.device: U.to(torch.float32)}

        def hook(layer: LayerKey, h: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not self.model.training:
                return
            with torch.no_grad():
                if h.device not in per_device:
                    per_device[h.device] = per_device[next(iter(per_device))].to(h.device)
                x = h.detach()
                B = x.shape[0]
                x = x.reshape(B, -1, x.shape[-1]).to(P.compute_dtype(x))
                T = x.shape[1]
                w = self._live_weights(B, T, x.device, x.dtype)
                U = per_device[h.device]
                env = self._envs
                if self.record_push and h.requires_grad:
                    h.register_hook(lambda g, L=layer, w=w, env=env: self._push_backward(L, g.detach(), w, env))
                if P.is_sharded(x):  # a DTensor: its coordinates come from the slabs (P.coords), then the sums
                    x = P.coords(x, U)
                    U = None
                if env is None:
                    sums = token_sums(x, w)                                # (B, ·): Σ_t w_t h_t per row
                    self._pending_act.append((layer, sums if U is None else P.coords(sums, U), w.sum(1)))
                    return
                W, counts = env.token_weights(w)
                sums = W @ x.reshape(W.shape[1], -1)                       # (n, ·): Σ_{t live, row ∈ e} h_t
                add_by_env(self._act[layer], env.present, sums if U is None else P.coords(sums, U))
                cnt = self._act_tokens[layer]
                for e, n in zip(env.present, counts):
                    cnt[e] = cnt.get(e, 0.0) + n
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
            RowEnvs(ids).accumulate((self._Gb if is_bias else self._G)[module], torch.cat(parts))
        by_layer: dict[LayerKey, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for layer, sums, tokens in self._pending_act:
            by_layer[layer].append((sums, tokens))
        for layer, parts in by_layer.items():
            sums = torch.cat([p[0] for p in parts])
            tokens = torch.cat([p[1] for p in parts])
            env = RowEnvs(ids[: sums.shape[0]])
            env.accumulate(self._act[layer], sums)
            cnt = self._act_tokens[layer]
            for e, n in zip(env.present, env.sum_by_env(tokens).tolist()):
                cnt[e] = cnt.get(e, 0.0) + n
        by_layer_push: dict[LayerKey, list[torch.Tensor]] = defaultdict(list)
        for layer, sums in self._pending_push:
            by_layer_push[layer].append(sums)
        for layer, parts in by_layer_push.items():
            sums = torch.cat(parts)
            RowEnvs(ids[: sums.shape[0]]).accumulate(self._push[layer], sums)
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
        self._envs = None

    def reset_step(self) -> None:
        """Forget what was captured for a step the optimizer skipped."""
        self._clear_step()
        self._pending, self._pending_act, self._pending_rows, self._pending_push = [], [], 0, []
