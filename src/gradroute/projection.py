"""The subspace algebra: the one implementation used by the router, monitor, anchoring terms
and interventions.

U is a (d x k) matrix with orthonormal columns (UᵀU = I_k). For a tensor ``x`` whose axis
``dim`` has size d:

    coords(x)  = Uᵀ x            (axis ``dim`` becomes size k)
    lift(c)    = U c             (axis ``dim`` goes back to size d)
    project(x) = U Uᵀ x          (the in-subspace part)
    remove(x)  = x − U Uᵀ x      (the orthogonal part)

``dim`` picks the side: a residual writer ``nn.Linear`` (weight d_out x d_in, d_out = d) is
split as ``U Uᵀ ΔW`` with ``dim=0``; a reader (d_in = d) as ``ΔW V Vᵀ`` with ``dim=1``; GPT-2's
transposed ``Conv1D`` and embeddings use the other axis. Arithmetic is done in float32 (float64
if the input is float64), whatever the storage dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import DegenerateDirectionsError, HiddenSizeMismatchError


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x: torch.Tensor, U: torch.Tensor, dim: int) -> None:
    if U.ndim != 2:
        raise HiddenSizeMismatchError(f"basis must be 2-D (d x k), got shape {tuple(U.shape)}.")
    if x.shape[dim] != U.shape[0]:
        raise HiddenSizeMismatchError(
            f"axis {dim} of a tensor of shape {tuple(x.shape)} has size {x.shape[dim]}, "
            f"but the basis has dimension d={U.shape[0]}.",
            "use a subspace built for this model's hidden size, or pass the right axis.",
        )


def coords(x: torch.Tensor, U: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Coordinates ``Uᵀ x`` along axis ``dim`` (size d → k), in the compute dtype."""
    _check(x, U, dim)
    dt = compute_dtype(x)
    xm = x.movedim(dim, -1).to(dt)
    return (xm @ U.to(device=x.device, dtype=dt)).movedim(-1, dim)


def lift(c: torch.Tensor, U: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``U c`` along axis ``dim`` (size k → d), in the compute dtype."""
    if c.shape[dim] != U.shape[1]:
        raise HiddenSizeMismatchError(
            f"axis {dim} has size {c.shape[dim]} but the basis has rank k={U.shape[1]}."
        )
    dt = compute_dtype(c)
    cm = c.movedim(dim, -1).to(dt)
    return (cm @ U.to(device=c.device, dtype=dt).T).movedim(-1, dim)


def project(x: torch.Tensor, U: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """In-subspace part ``U Uᵀ x`` along ``dim``, returned in ``x``'s dtype."""
    return lift(coords(x, U, dim), U, dim).to(x.dtype)


def remove(x: torch.Tensor, U: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthogonal part ``x − U Uᵀ x`` along ``dim``, returned in ``x``'s dtype."""
    dt = compute_dtype(x)
    return (x.to(dt) - lift(coords(x, U, dim), U, dim)).to(x.dtype)


def energy_fraction(x: torch.Tensor, U: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``‖Uᵀx‖² / ‖x‖²`` along ``dim`` (that axis is reduced). 0 for a zero vector."""
    c = coords(x, U, dim)
    num = c.pow(2).sum(dim)
    den = x.to(c.dtype).pow(2).sum(dim)
    return num / den.clamp_min(eps)


def relative_in_subspace_norm(x: torch.Tensor, U: torch.Tensor, dim: int) -> float:
    """``‖Uᵀx‖_F / ‖x‖_F`` for a whole tensor (0.0 for a zero tensor).

    Invariant 3 checks ``relative_in_subspace_norm(W_base − W_0, U, dim) <= 1e-5``.
    """
    xf = x.double()
    total = xf.norm()
    if total == 0:
        return 0.0
    return float(coords(xf, U.double(), dim).norm() / total)


# --- building bases ------------------------------------------------------------------------
@dataclass
class OrthonormalizationReport:
    """What :func:`orthonormalize` kept and dropped (indices into the input rows)."""

    kept: list[int] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    residual_norms: list[float] = field(default_factory=list)     # relative, per input row


def orthonormalize(
    directions: torch.Tensor,
    rtol: float = 1e-3,
    names: list[str] | None = None,
    on_degenerate: str = "error",
) -> tuple[torch.Tensor, OrthonormalizationReport]:
    """Orthonormal basis (d x r) for the rows of ``directions`` (n x d), in input order.

    Modified Gram-Schmidt in float64 with re-orthogonalization: row i contributes a new
    column iff ``‖(I − QQᵀ) vᵢ‖ / ‖vᵢ‖ > rtol``, where Q holds the columns kept so far. Column j
    is oriented so that it has a positive dot product with the row it came from, so the first
    column is exactly the first direction normalized. NaN/Inf rows always raise; zero and
    (near-)dependent rows raise (``on_degenerate="error"``) or are dropped and reported
    (``"warn"``: a :class:`GradrouteWarning` is emitted; ``"drop"``: reported only).
    """
    import warnings

    from .errors import GradrouteWarning

    if on_degenerate not in ("error", "warn", "drop"):
        from .errors import ConfigError

        raise ConfigError(f"on_degenerate must be 'error', 'warn' or 'drop', got {on_degenerate!r}.",
                          "pass one of those three.")
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not (0 < rtol < 1):
        raise DegenerateDirectionsError(f"rtol must be a number in (0, 1), got {rtol!r}.", "pass e.g. rtol=1e-3.")
    D = torch.as_tensor(directions)
    if D.ndim == 1:
        D = D[None]
    if D.ndim != 2 or D.shape[0] == 0 or D.shape[1] == 0:
        raise DegenerateDirectionsError(
            f"directions must be a non-empty (n x d) array, got shape {tuple(D.shape)}."
        )
    D = D.detach().to("cpu", torch.float64)
    label = (lambda i: f"direction {i} ({names[i]!r})") if names else (lambda i: f"direction {i}")
    bad = ~torch.isfinite(D).all(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DegenerateDirectionsError(
            f"{label(i)} contains NaN or Inf.", "check the activations or file it came from."
        )
    report = OrthonormalizationReport()
    cols: list[torch.Tensor] = []
    for i in range(D.shape[0]):
        v = D[i]
        n0 = float(v.norm())
        if n0 == 0.0 or not math.isfinite(n0):
            rel, reason = 0.0, "zero vector"
        else:
            r = v / n0
            for _ in range(2):  # twice is enough (Kahan/Parlett)
                for q in cols:
                    r = r - (q @ r) * q
            rel = float(r.norm())
            reason = f"linearly dependent on earlier directions (residual {rel:.2e} <= rtol {rtol:g})"
        report.residual_norms.append(rel)
        if rel <= rtol:
            report.dropped.append((i, reason))
            continue
        q = r / rel
        if q @ v < 0:
            q = -q
        cols.append(q)
        report.kept.append(i)
    if report.dropped:
        msg = "; ".join(f"{label(i)}: {why}" for i, why in report.dropped)
        if on_degenerate == "error" or not cols:
            raise DegenerateDirectionsError(
                f"degenerate directions: {msg}.",
                "remove zero or duplicate directions, or pass on_degenerate='warn' to drop them "
                "(a looser rtol keeps nearly-dependent ones).",
            )
        if on_degenerate == "warn":
            warnings.warn(f"dropped degenerate directions: {msg}", GradrouteWarning, stacklevel=3)
    U = torch.stack(cols, dim=1)
    return U.to(torch.float32), report


def random_basis(d: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Haar-random (d x k) orthonormal basis (QR of a Gaussian matrix, signs fixed), float32."""
    if not (0 < k <= d):
        raise DegenerateDirectionsError(f"cannot draw a rank-{k} basis in dimension {d}.")
    G = torch.randn(d, k, generator=generator, dtype=torch.float64)
    return _qr_q(G).to(torch.float32)


def _qr_q(X: torch.Tensor) -> torch.Tensor:
    """Q of X = QR with R's diagonal made positive (so Q's columns keep X's orientation)."""
    Q, R = torch.linalg.qr(X)
    signs = torch.diagonal(R).sign()
    signs[signs == 0] = 1.0
    return Q * signs


def orthonormality_error(U: torch.Tensor) -> float:
    """``max |UᵀU − I|`` computed in float32 (invariant 1 bounds it by 1e-6)."""
    U32 = U.to(torch.float32)
    return float((U32.T @ U32 - torch.eye(U.shape[1], dtype=torch.float32, device=U.device)).abs().max())


def principal_cosines(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(U1) and span(U2), descending."""
    if U1.shape[0] != U2.shape[0]:
        raise HiddenSizeMismatchError(
            f"cannot compare subspaces of dimension {U1.shape[0]} and {U2.shape[0]}."
        )
    s = torch.linalg.svdvals(U1.double().T @ U2.double().to(U1.device))
    return s.clamp(0.0, 1.0).to(torch.float32)


def overlap(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Mean squared principal cosine, ``‖U1ᵀU2‖²_F / min(k1, k2)``: 1 = nested, 0 = orthogonal.

    For Haar-random subspaces in dimension d its expected value is ``max(k1, k2)/d``.
    """
    c = principal_cosines(U1, U2)
    return float(c.double().pow(2).sum() / min(U1.shape[1], U2.shape[1]))


def refine_basis(U: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U`` re-orthonormalized in ``dtype`` (QR, signs kept), so that ``UᵀU = I`` to that
    dtype's precision; the span and column orientation are unchanged.

    A float32 basis is orthonormal only to ~1e-7, so ``Uᵀ(U A) = A`` holds only to
    ~1e-7·‖A‖; bookkeeping that subtracts a large adapter needs the refined basis.
    """
    return _qr_q(U.to(dtype))
