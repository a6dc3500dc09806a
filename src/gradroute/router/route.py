"""Per-module route state: a routed module seen through its basis.

A :class:`Route` holds one module's basis U (in the bookkeeping dtype) and one
:class:`CoordBlock` per routed parameter — the weight (along its residual axis) and, for a
writer with ``route_bias``, its bias (axis 0) as one more block. Every weight operation is one
loop over the blocks. A block keeps

    ref0    = Uᵀ P_0     the parameter's initial in-subspace coordinates
    adapter = A          the adapter's coordinates (its weight delta is U A)
    env[e]  = A_e        environment e's share of A (Σ_e A_e = A once split by environment)

Bookkeeping is float64 by default: float32 storage of W rounds each entry by ~6e-8·|W|, which
in RL (tiny updates) can exceed the in-subspace update being accounted.

Sharded parameters (FSDP2 DTensors): the coordinates are always the full, replicated k-row
blocks; they are read from this rank's slab of the parameter and written back into it
(:mod:`gradroute.projection`, "sharded tensors"), so a block never gathers its weight. Blocks
know their parameter by name (module, attribute): when FSDP2 or accelerate's ``prepare``
replaces the parameter objects, :meth:`Route.rebind` finds the new ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import projection as P
from ..errors import RoutingError
from ..model import trainable_lora_parameters, user_lora_delta, weight_module
from ..plan import RouteTarget


class CoordBlock:
    """One parameter of a route, with its coordinates along ``axis``.

    ``delta``: for a module wrapped by the user's PEFT LoRA, a function returning the LoRA's
    current weight delta ``s·B·A`` in the parameter's layout; the block then reads the
    *effective* weight ``W + s·B·A`` (what the policy computes with)."""

    CHUNK_BYTES = 64 << 20  # bound on the temporary copy when converting a weight to the bookkeeping dtype

    def __init__(self, param: nn.Parameter, axis: int, route: Route, delta: Any = None,
                 source: tuple[nn.Module, str] | None = None):
        """``source``: (module, dotted attribute) where the parameter lives, so that it can be
        found again after it was replaced (:meth:`rebind`)."""
        self.param = param
        self.axis = axis
        self.route = route
        self.delta = delta
        self.source = source
        if delta is not None and P.is_sharded(param):
            raise _lora_sharded(route.name)
        self.ref0 = self.coords()
        self.adapter = torch.zeros_like(self.ref0)
        self.env: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, module: nn.Module, name: str, axis: int, route: Route) -> CoordBlock:
        """The block of ``module``'s parameter ``name`` (dotted), which it can re-find by name."""
        owner, _, attr = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        return cls(getattr(holder, attr), axis, route, source=(holder, attr))

    def _split_dim(self, x: torch.Tensor) -> int:
        """The axis the chunks are cut along: the other axis of a matrix, the experts of ``(E, ·, ·)``."""
        return 0 if x.ndim == 3 else 1 - self.axis

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``x`` split along a non-residual axis, each small enough to convert."""
        if x.ndim == 1 or x.numel() == 0:
            return [x]
        dim = self._split_dim(x)
        per_chunk = max(1, self.CHUNK_BYTES // (8 * max(1, x.numel() // x.shape[dim])))
        return list(x.split(per_chunk, dim=dim))

    def coords_of(self, x: torch.Tensor) -> torch.Tensor:
        """``Uᵀ x`` along the block's axis, in the bookkeeping dtype (for a DTensor: the full
        coordinates, from this rank's slab plus one small collective)."""
        x = x.detach()
        U, dt = self.route.basis(), self.route.dtype
        axis = self.axis % x.ndim
        sl = P.slab(x)
        data, Us = (x, U) if sl is None else (sl.local, P.slab_basis(U, axis, sl))
        parts = [P.coords(ch.to(dt), Us, axis) for ch in self._chunks(data)]
        c = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self._split_dim(data))
        return c if sl is None else P.gather_coords(c, axis, sl)

    def effective(self) -> torch.Tensor:
        """The parameter the module computes with (``W``, or ``W + s·B·A`` under a user LoRA)."""
        if self.delta is None:
            return self.param.detach()
        with torch.no_grad():
            return self.param.detach() + self.delta().to(self.param.dtype)

    def coords(self) -> torch.Tensor:
        return self.coords_of(self.effective())

    def lift(self, C: torch.Tensor) -> torch.Tensor:
        """``U C`` along the block's axis (bookkeeping dtype, the parameter's full shape)."""
        return P.lift(C.to(self.route.dtype), self.route.basis(), self.axis)

    def add_lift(self, x: torch.Tensor, C: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``x + α U C`` for ``x`` laid out like the parameter (a DTensor stays sharded)."""
        return P.add_lift(x, C.to(self.route.dtype), self.route.basis(), self.axis, alpha)

    @torch.no_grad()
    def split(self, x: torch.Tensor) -> torch.Tensor:
        """In place ``x ← x − U Uᵀ x``; returns ``Uᵀ x`` (bookkeeping dtype). float32 suffices on
        gradients: the weights' exact orthogonality is enforced afterwards by :meth:`set_coords`.
        A sharded ``x`` (FSDP2 gradient) is edited in its slab."""
        U = self.route.basis32()
        c = P.coords(x, U, self.axis)
        data = P.local(x)
        data.sub_(P.lift_local(c, U, self.axis, x).to(data.dtype))
        return c.to(self.route.dtype)

    @torch.no_grad()
    def set_coords(self, target: torch.Tensor, reread: bool = True) -> torch.Tensor | None:
        """In place ``P ← P + U (target − Uᵀ P)`` (orthogonal part untouched); returns the
        coordinates P realizes after rounding to its dtype, re-read in the bookkeeping dtype
        (``reread=False``: None, for callers that do not record them — a full pass saved).
        A sharded P gets its slab of the correction (``U[a:b] fix`` or ``U fix[a:b]``).

        The correction is computed in float32 (its ~eps·‖P‖ error only nudges where the
        coordinates land); the exact re-read is what callers record."""
        x = P.local(self.param) if P.is_sharded(self.param) else self.param.data
        U = self.route.basis32()
        fix = target.to(torch.float32) - P.coords(self.effective(), U, self.axis)
        x.add_(P.lift_local(fix, U, self.axis, self.param).to(x.dtype))
        return self.coords() if reread else None

    def version(self) -> tuple[int, ...]:
        """The parameter's version counter (and its slab's: edits of the slab do not bump the DTensor's)."""
        if P.is_sharded(self.param):
            return (self.param._version, P.local(self.param)._version)
        return (self.param._version,)

    def rebind(self) -> bool:
        """Find the parameter again by name, after FSDP2 / accelerate replaced it (True if it
        changed). FSDP2's unsharded parameter (registered on the module between its all-gather
        and reshard) is never taken for the sharded one the optimizer steps."""
        if self.source is None:
            return False
        holder, attr = self.source
        new = getattr(holder, attr, None)
        if not isinstance(new, torch.Tensor) or new is self.param:
            return False
        if P.is_sharded(self.param) and not P.is_sharded(new):
            return False
        if tuple(new.shape) != tuple(self.param.shape):
            raise RoutingError(
                f"the parameter {attr!r} of {self.route.name!r} was replaced by one of shape {tuple(new.shape)} "
                f"(was {tuple(self.param.shape)}): the routing plan no longer matches the model.",
                "build the router on the model as it is trained (same architecture and sizes).")
        if self.delta is not None and P.is_sharded(new):
            raise _lora_sharded(self.route.name)
        self.param = new
        return True

    def share(self, env: str | None) -> torch.Tensor | None:
        """The adapter (``env=None``) or one environment's share (None if it has none)."""
        return self.adapter if env is None else self.env.get(env)

    def to(self, device: torch.device) -> None:
        self.ref0, self.adapter = self.ref0.to(device), self.adapter.to(device)
        self.env = {e: t.to(device) for e, t in self.env.items()}


class Route:
    """State of one routed module: its basis and coordinate blocks (weight, optional bias)."""

    def __init__(self, target: RouteTarget, module: nn.Module, U: torch.Tensor, dtype: torch.dtype):
        self.target = target
        self.module = module                 # as found in the model (may be a PEFT-wrapped layer)
        wm = weight_module(module)
        self.weight: nn.Parameter = wm.weight
        self.bias: nn.Parameter | None = wm.bias if target.bias else None
        self.dtype = dtype
        self.U = P.refine_basis(U, dtype).to(self.weight.device)
        self._U32: torch.Tensor | None = None
        self.lora = user_lora_delta(module)
        self.blocks: list[CoordBlock] = [CoordBlock(self.weight, target.axis, self, self.lora, source=(wm, "weight"))]
        if self.bias is not None:
            self.blocks.append(CoordBlock(self.bias, 0, self, source=(wm, "bias")))
        self.version = self.versions()

    @property
    def name(self) -> str:
        return self.target.module

    def __iter__(self) -> Iterator[CoordBlock]:
        return iter(self.blocks)

    # ------------------------------------------------------------------ basis and device
    def basis(self) -> torch.Tensor:
        if self.U.device != self.weight.device:
            self.follow_device()
        return self.U

    def basis32(self) -> torch.Tensor:
        if self._U32 is None or self._U32.device != self.weight.device:
            self._U32 = self.basis().to(torch.float32)
        return self._U32

    def follow_device(self) -> None:
        """Move the basis and all bookkeeping to the weight's device (after ``model.to(...)``)."""
        dev = self.weight.device
        if self.U.device == dev and self.blocks[0].ref0.device == dev:
            return
        self.U = self.U.to(dev)
        self._U32 = None
        for b in self.blocks:
            b.to(dev)

    def rebind(self) -> bool:
        """Re-read the route's parameters by name from its module (FSDP2 / accelerate replaced
        them). True if any parameter object changed; the coordinates are kept (they are full-size
        on every rank, whatever the sharding)."""
        changed = [b.rebind() for b in self.blocks]  # every block, no short-circuit
        if not any(changed):
            return False
        self.weight = self.blocks[0].param
        if self.bias is not None:
            self.bias = self.blocks[1].param
        self._U32 = None
        self.follow_device()
        return True

    # ------------------------------------------------------------------ weights
    def versions(self) -> tuple[int, ...]:
        return tuple(v for b in self.blocks for v in b.version())

    def trainable(self) -> list[nn.Parameter]:
        """What training moves in this module: its own parameters, or the user LoRA's."""
        return [b.param for b in self.blocks if b.param.requires_grad] + trainable_lora_parameters(self.module)

    def adapters(self) -> list[torch.Tensor]:
        return [b.adapter for b in self.blocks]

    def realize(self, adapters: list[torch.Tensor]) -> None:
        """Make the parameters hold ``Uᵀ P_0 + A`` inside span(U) (orthogonal part untouched) and
        set the adapter to what they realize after rounding, so that ``P − U A`` keeps exactly
        the initial in-subspace coordinates."""
        for b, A in zip(self.blocks, adapters):
            b.adapter = b.set_coords(b.ref0 + A) - b.ref0
        self.version = self.versions()

    def resync(self) -> None:
        """The parameters were edited outside a routed step: that edit belongs to the base."""
        for b in self.blocks:
            b.ref0 = b.coords() - b.adapter
        self.version = self.versions()

    # ------------------------------------------------------------------ adapter views
    def flat(self, env: str | None = None) -> torch.Tensor | None:
        """All blocks' coordinates (or one environment's) as one float64 vector; None if absent."""
        parts = [b.share(env) for b in self.blocks]
        if parts[0] is None:
            return None
        return torch.cat([p.double().reshape(-1) for p in parts if p is not None])

    def norm_sq(self, env: str | None = None) -> float:
        f = self.flat(env)
        return 0.0 if f is None else float(f @ f)


def _lora_sharded(module: str) -> RoutingError:
    return RoutingError(
        f"{module!r} carries the user's PEFT LoRA and its weights are sharded (FSDP2 DTensors): gradroute does "
        "not read the effective weight W + s·B·A from shards.",
        "train the LoRA policy with DDP (the LoRA weights are small), or fully fine-tune under FSDP2.")
