"""Concept-anchoring regularizer terms.

Each term maps activations ``z`` (rows x d: samples, or tokens) to a per-row loss, computed in
float32. Angular terms work on ``ẑ = z/‖z‖`` (a residual stream is not unit norm). Directions
and subspaces come from a :class:`~gradroute.Subspace` (``Subspace.from_axes`` gives
axis-aligned ones for small latents) and the projection math is
:mod:`gradroute.projection`'s.

===================  =========================================================  ==========
term                 per-row loss                                               kind
===================  =========================================================  ==========
Unitarity            (‖z‖ − 1)²                                                 all rows
Anchor               1 − cos(z, u)                                              attractive
EuclideanAnchor      ‖z − a‖²                                                   attractive
AntiAnchor           relu(cos(z, u))                                            repulsive
InSubspace           1 − ‖Uᵀẑ‖²   (energy outside span U)                       attractive
AntiSubspace         ‖Uᵀẑ‖²       (energy inside span U; cos² for k = 1)        repulsive
Separate             Σ_j ((ẑᵢ·ẑⱼ + 1)/2)^p over other rows, duplicates excluded  repulsive
EuclideanRepulsion   Σ_j 1/‖zᵢ − zⱼ‖²  (conflicts with unitarity: kept to show it) repulsive
PooledAnchor         mellowmax_ω over a labelled span's tokens of (1 − cos(h_t, u))  attractive
===================  =========================================================  ==========

Weighting (:meth:`Term.__call__`): with per-row weights w (from labels × affinities × token
masks), a term is ``Σ w·loss / (Σ w + 1e-8)``; when no row has weight, it is a zero that
carries no gradient.
"""

from __future__ import annotations

import math

import torch

from .. import projection as P
from ..errors import HiddenSizeMismatchError
from ..layers import LayerKey
from ..subspace import Subspace

EPS = 1e-8


def unit(z: torch.Tensor) -> torch.Tensor:
    z = z.float()
    return z / z.norm(dim=-1, keepdim=True).clamp_min(EPS)


def weighted_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``Σ w·loss / (Σ w + 1e-8)``; an un-weighted mean when ``weights`` is None; a zero with no
    gradient when every weight is 0."""
    if weights is None:
        return per_row.mean()
    w = weights.to(per_row.device, per_row.dtype).reshape(per_row.shape)
    total = w.sum()
    if float(total) == 0.0:
        return torch.zeros((), device=per_row.device, dtype=per_row.dtype)
    return (w * per_row).sum() / (total + EPS)


class Term:
    """Base class. ``per_row(z)`` is the formula; ``term(z, weights)`` the weighted scalar.

    ``attractive`` terms act on labelled rows only; repulsive ones on every live row.
    """

    name = "term"
    attractive = False

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    def per_row(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, z: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        z = z.float().reshape(-1, z.shape[-1])
        return weighted_mean(self.per_row(z), None if weights is None else weights.reshape(-1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _Directional(Term):
    """A term that needs one direction u or a basis U from a subspace."""

    def __init__(self, subspace: Subspace, layer: LayerKey, directions: int | str | list[int | str] | None = None,
                 name: str | None = None):
        super().__init__(name)
        self.U = subspace.select(layer, directions)
        self.layer = layer

    def _basis(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.U.shape[0]:
            raise HiddenSizeMismatchError(
                f"{self.name}: activations have size {z.shape[-1]} but the subspace's layer {self.layer!r} "
                f"has dimension {self.U.shape[0]}.",
                "use a subspace built for this model / layer.",
            )
        return self.U.to(z.device)

    @property
    def u(self) -> torch.Tensor:
        return self.U[:, 0]


class Unitarity(Term):
    name = "unitarity"

    def per_row(self, z):
        return (z.norm(dim=-1) - 1.0).pow(2)


class Anchor(_Directional):
    """Angular anchor ``1 − cos(z, u)`` (u: the first selected direction)."""

    name = "anchor"
    attractive = True

    def per_row(self, z):
        return 1.0 - P.coords(unit(z), self._basis(z)[:, :1])[:, 0]


class EuclideanAnchor(Term):
    """``‖z − a‖²`` (seed 000's first version; ``a`` a point, e.g. a unit direction)."""

    name = "euclidean_anchor"
    attractive = True

    def __init__(self, point: torch.Tensor, name: str | None = None):
        super().__init__(name)
        self.point = torch.as_tensor(point, dtype=torch.float32)

    def per_row(self, z):
        return (z - self.point.to(z.device)).pow(2).sum(-1)


class AntiAnchor(_Directional):
    """``relu(cos(z, u))``: keep rows out of the half-space around u."""

    name = "anti_anchor"

    def per_row(self, z):
        return torch.relu(P.coords(unit(z), self._basis(z)[:, :1])[:, 0])


class InSubspace(_Directional):
    """Energy outside span(U): ``1 − ‖Uᵀẑ‖²``."""

    name = "subspace"
    attractive = True

    def per_row(self, z):
        return 1.0 - P.coords(unit(z), self._basis(z)).pow(2).sum(-1)


class AntiSubspace(_Directional):
    """Energy inside span(U): ``‖Uᵀẑ‖²`` (cos² for one direction)."""

    name = "anti_subspace"

    def per_row(self, z):
        return P.coords(unit(z), self._basis(z)).pow(2).sum(-1)


def _pair_mask(zh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos = zh @ zh.T
    keep = ~torch.isclose(cos, torch.ones_like(cos), atol=1e-6)  # self and duplicates
    return cos, keep


class Separate(Term):
    """Angular repulsion ``Σ_j ((ẑᵢ·ẑⱼ + 1)/2)^p`` over the other rows, duplicates excluded.

    ``max_rows`` caps the rows used (a random subset; pairwise cost is quadratic)."""

    name = "separate"

    def __init__(self, power: float = 100.0, max_rows: int | None = 2048, name: str | None = None):
        super().__init__(name)
        self.power = float(power)
        self.max_rows = max_rows

    def per_row(self, z):
        zh = unit(z)
        cos, keep = _pair_mask(zh)
        return (((cos + 1.0) / 2.0).pow(self.power) * keep).sum(-1)

    def __call__(self, z, weights=None):
        z = z.float().reshape(-1, z.shape[-1])
        w = None if weights is None else weights.reshape(-1)
        if w is not None:  # only live rows take part in the pairs
            live = w > 0
            z, w = z[live], w[live]
        if self.max_rows is not None and z.shape[0] > self.max_rows:
            idx = torch.randperm(z.shape[0], device=z.device)[: self.max_rows]
            z = z[idx]
            w = None if w is None else w[idx]
        if z.shape[0] < 2:
            return torch.zeros((), device=z.device)
        return weighted_mean(self.per_row(z), w)


class EuclideanRepulsion(Separate):
    """``Σ_j 1/‖zᵢ − zⱼ‖²``: fights unitarity (seed 000's combined loss near 10,000); for demonstration."""

    name = "euclidean_repulsion"

    def __init__(self, max_rows: int | None = 2048, name: str | None = None):
        super().__init__(power=1.0, max_rows=max_rows, name=name)

    def per_row(self, z):
        _, keep = _pair_mask(unit(z))
        d2 = torch.cdist(z, z).pow(2)
        return ((1.0 / (d2 + EPS)) * keep).sum(-1)


def mellowmax(x: torch.Tensor, omega: float, dim: int = -1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log(mean(exp(ω x))) / ω`` over ``dim`` (masked entries excluded): ω → −∞ is the min."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    n = mask.sum(dim).clamp_min(1)
    z = torch.where(mask, omega * x, torch.full_like(x, -math.inf))
    return (torch.logsumexp(z, dim) - torch.log(n.to(x.dtype))) / omega


class PooledAnchor(_Directional):
    """Anchor a labelled *span*: soft-min (mellowmax, ω < 0) over its tokens of ``1 − cos(h_t, u)``,
    so the span is satisfied when some of its tokens carry the concept. ``repel=True`` is the
    counterpart for spans that should *not* carry it: soft-max (ω > 0) over the tokens of
    ``relu(cos(h_t, u))``, so the most aligned token is pushed out. Input ``(B, T, d)`` with a
    span mask; one loss per sample."""

    name = "pooled_anchor"
    attractive = True

    def __init__(self, subspace: Subspace, layer: LayerKey, directions=None, omega: float | None = None,
                 repel: bool = False, name: str | None = None):
        super().__init__(subspace, layer, directions, name)
        self.repel = repel
        self.omega = omega if omega is not None else (10.0 if repel else -10.0)
        if repel:
            self.attractive = False
            if name is None:
                self.name = "pooled_repel"

    def per_sample(self, h: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        cos = P.coords(unit(h), self._basis(h)[:, :1])[..., 0]  # (B, T)
        per_token = torch.relu(cos) if self.repel else 1.0 - cos
        pooled = mellowmax(per_token, self.omega, dim=-1, mask=span.bool())
        return torch.where(span.bool().any(-1), pooled, torch.zeros_like(pooled))  # no span: no loss

    def __call__(self, h, weights=None, span=None):
        if h.ndim != 3:
            raise HiddenSizeMismatchError("PooledAnchor needs (batch, tokens, d) activations.")
        span = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if span is None else span
        has = span.bool().any(-1)
        w = has.float() if weights is None else weights.reshape(-1).to(h.device) * has.float()
        return weighted_mean(self.per_sample(h.float(), span), w)
