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

Sharded tensors (FSDP2 ``DTensor`` parameters and gradients, see "Sharded tensors" below) are
read and written slab by slab, never gathered: ``coords`` of a DTensor returns the full
(replicated) coordinates, ``project``/``remove``/:func:`add_lift` return DTensors sharded like
their input, and :func:`lift_local` gives the rank's slab of ``U c`` for in-place edits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DegenerateDirectionsError, HiddenSizeMismatchError, RoutingError


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
    """Coordinates ``Uᵀ x`` along axis ``dim`` (size d → k), in the compute dtype.

    For a sharded ``x`` (a DTensor) the result is the full coordinates on every rank, read from
    the slabs (:func:`gather_coords`): a collective, so every rank of the mesh must call it."""
    s = slab(x)
    if s is not None:
        _check(x, U, dim)
        d = dim % x.ndim
        return gather_coords(coords(s.local, slab_basis(U, d, s), d), d, s)
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
    """In-subspace part ``U Uᵀ x`` along ``dim``, returned in ``x``'s dtype (and layout: a
    DTensor comes back sharded like ``x``)."""
    return like(lift_local(coords(x, U, dim), U, dim, x), x).to(x.dtype)


def remove(x: torch.Tensor, U: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthogonal part ``x − U Uᵀ x`` along ``dim``, returned in ``x``'s dtype (and layout)."""
    return add_lift(x.to(compute_dtype(x)), coords(x, U, dim), U, dim, alpha=-1.0).to(x.dtype)


def add_lift(x: torch.Tensor, c: torch.Tensor, U: torch.Tensor, dim: int = -1, alpha: float = 1.0) -> torch.Tensor:
    """``x + α U c`` along ``dim`` (``c``: full coordinates), in ``x``'s dtype and layout: for a
    DTensor each rank adds its slab of ``U c`` (:func:`lift_local`), nothing is gathered."""
    s = slab(x)
    local = x if s is None else s.local
    out = local + (alpha * lift_local(c, U, dim, x)).to(local.dtype)
    return like(out, x)


def energy_fraction(x: torch.Tensor, U: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``‖Uᵀx‖² / ‖x‖²`` along ``dim`` (that axis is reduced). 0 for a zero vector."""
    c = coords(x, U, dim)
    num = c.pow(2).sum(dim)
    den = full(x.to(c.dtype).pow(2).sum(dim))
    return num / den.clamp_min(eps)


def relative_in_subspace_norm(x: torch.Tensor, U: torch.Tensor, dim: int) -> float:
    """``‖Uᵀx‖_F / ‖x‖_F`` for a whole tensor (0.0 for a zero tensor).

    Invariant 3 checks ``relative_in_subspace_norm(W_base − W_0, U, dim) <= 1e-5``.
    """
    xf = x.double()
    total = full(xf.norm())
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


# --- sharded tensors (FSDP2) ---------------------------------------------------------------
# FSDP2 (``torch.distributed.fsdp.fully_shard``) holds parameters and their gradients as
# DTensors sharded along one axis (axis 0 by default): rank r stores the slab ``x[a_r:b_r]``
# (torch.chunk sizes: ⌈N/R⌉ rows each, the last ones shorter or empty). The algebra acts on the
# slabs and exchanges only coordinate-sized tensors, never the weights:
#
#   sharded along the basis axis (e.g. a writer's rows):  Uᵀ x = Σ_r U[a_r:b_r]ᵀ x[a_r:b_r]
#       (per-rank partial products, one all-reduce of the k x d_in result);
#   sharded along another axis (a reader's or an embedding's rows):  (Uᵀ x)[a_r:b_r] = Uᵀ x[a_r:b_r]
#       (local; the k-wide rows are all-gathered so every rank holds the full coordinates);
#
# and back: rank r's slab of ``U c`` is ``U[a_r:b_r] c``, or ``U c[a_r:b_r]``. Replicated
# mesh dimensions (HSDP) hold identical slabs and are left alone. Every function here that reads
# coordinates of a DTensor is a collective: all ranks of its mesh must call it, in the same order.
@dataclass(frozen=True)
class Slab:
    """This rank's piece of a DTensor: ``local = x[start : start + local.shape[dim]]`` along the
    sharded axis ``dim`` (None: replicated, ``local`` is all of x). ``local`` is the DTensor's own
    storage, so in-place edits of it are edits of x (what FSDP2 all-gathers in the next forward)."""

    local: torch.Tensor
    dim: int | None
    start: int
    shape: torch.Size          # the global shape
    mesh: Any                  # the DeviceMesh
    placements: tuple[Any, ...]

    @property
    def rows(self) -> int:
        return self.local.shape[self.dim] if self.dim is not None else 0


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(x: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient)."""
    dt = _dtensor_type()
    return dt is not None and isinstance(x, dt)


def slab(x: torch.Tensor) -> Slab | None:
    """The rank's :class:`Slab` of a DTensor ``x``; None for a plain tensor.

    Supported layouts: on every mesh dimension ``Replicate()``, except at most one ``Shard(dim)``
    (FSDP2, HSDP). Anything else (strided shards of FSDP+TP, several sharded axes, pending
    reductions) raises :class:`~gradroute.errors.RoutingError`: routing it would read the wrong
    rows."""
    if not is_sharded(x):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = x.device_mesh, tuple(x.placements)
    sharded = [(i, p) for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    with torch.no_grad():
        local = x.to_local()
    if not sharded:
        return Slab(local, None, 0, x.shape, mesh, placements)
    if len(sharded) > 1 or type(sharded[0][1]) is not Shard:
        raise RoutingError(
            f"a parameter of shape {tuple(x.shape)} is laid out as {placements} on its device mesh: gradroute reads "
            "coordinates only from tensors sharded along one axis on one mesh dimension (FSDP2 / HSDP), not "
            "tensor-parallel, strided or pending-reduction layouts.",
            "shard the routed modules with fully_shard only (no tensor parallelism on them), or route "
            "without FSDP (DDP).")
    mesh_dim, placement = sharded[0]
    dim = placement.dim % x.ndim
    coord = mesh.get_coordinate()
    if coord is None:
        raise RoutingError("this rank is not part of the device mesh of a routed parameter.",
                           "build the router on the ranks that hold the model's shards.")
    n = x.shape[dim]
    chunk = -(-n // mesh.size(mesh_dim))
    start = min(coord[mesh_dim] * chunk, n)
    if local.shape[dim] != max(0, min(chunk, n - start)):
        raise RoutingError(
            f"a DTensor of shape {tuple(x.shape)} holds {local.shape[dim]} rows of axis {dim} on this rank, not the "
            f"torch.chunk share ({max(0, min(chunk, n - start))}) gradroute reads coordinates from.",
            "use FSDP2's default (even chunk) sharding for the routed modules.")
    return Slab(local, dim, start, x.shape, mesh, placements)


def local(x: torch.Tensor) -> torch.Tensor:
    """``x``'s data on this rank: the slab of a DTensor (its storage), ``x`` itself otherwise."""
    if not is_sharded(x):
        return x
    with torch.no_grad():
        return x.to_local()


def slab_basis(U: torch.Tensor, dim: int, s: Slab) -> torch.Tensor:
    """The rows of U that meet the slab: ``U[a:b]`` when the slab cuts the basis axis ``dim``,
    else all of U."""
    return U.narrow(0, s.start, s.rows) if s.dim == dim else U


def gather_coords(c: torch.Tensor, dim: int, s: Slab) -> torch.Tensor:
    """The full coordinates from this rank's ``c = coords(slab)`` (``dim``: the basis axis):
    the sum over ranks (all-reduce) when the slab cuts ``dim``, else the slabs' coordinates
    concatenated along the sharded axis (all-gather). A collective."""
    if s.dim is None:
        return c
    from torch.distributed.tensor import DTensor, Partial, Replicate

    home, c = c.device, _to_mesh_device(c, s.mesh)
    if s.dim == dim:
        placements = tuple(p if isinstance(p, Replicate) else Partial() for p in s.placements)
        out = DTensor.from_local(c, s.mesh, placements, run_check=False).full_tensor()
    else:
        shape = list(s.shape)
        shape[dim] = c.shape[dim]
        out = DTensor.from_local(c.contiguous(), s.mesh, s.placements, run_check=False, shape=torch.Size(shape),
                                 stride=_contiguous_stride(shape)).full_tensor()
    return _waited(out).to(home)


def lift_local(c: torch.Tensor, U: torch.Tensor, dim: int, x: torch.Tensor) -> torch.Tensor:
    """This rank's slab of ``U c`` along ``dim`` laid out like ``x`` (``c``: full coordinates;
    for a plain ``x``, all of ``U c``): ``U[a:b] c`` or ``U c[a:b]``. No communication."""
    s = slab(x)
    if s is None or s.dim is None:
        return lift(c, U, dim)
    d = dim % x.ndim
    if d == s.dim:
        return lift(c, slab_basis(U, d, s), d)
    return lift(c.narrow(s.dim, s.start, s.rows), U, d)


def like(local_part: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``local_part`` (this rank's slab) as a tensor laid out like ``x``: a DTensor with x's mesh
    and placements, or ``local_part`` itself when x is a plain tensor."""
    s = slab(x)
    if s is None:
        return local_part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_part, s.mesh, s.placements, run_check=False, shape=s.shape,
                              stride=_contiguous_stride(s.shape))


def full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (a collective; meant for small tensors — the
    adapters, reductions — never for routed weights), any other tensor unchanged."""
    if not is_sharded(x):
        return x
    mesh, data = x.device_mesh, local(x)
    if data.device.type == mesh.device_type:
        return _waited(x.full_tensor())
    from torch.distributed.tensor import DTensor  # CPU-offloaded shards of an accelerator mesh

    moved = DTensor.from_local(_to_mesh_device(data, mesh), mesh, x.placements, run_check=False, shape=x.shape,
                               stride=x.stride())
    return _waited(moved.full_tensor()).to(data.device)


def local_slab_of(full_tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rows of a full (replicated) tensor that this rank's slab of ``x`` holds (all of it
    for a plain ``x``)."""
    s = slab(x)
    if s is None or s.dim is None:
        return full_tensor
    return full_tensor.narrow(s.dim, s.start, s.rows)


def _to_mesh_device(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """``t`` on the device type its mesh communicates on (FSDP2's CPU offload keeps shards on the
    CPU of a CUDA mesh, whose collectives need CUDA tensors)."""
    return t if t.device.type == mesh.device_type else t.to(torch.device(mesh.device_type))


def _contiguous_stride(shape: Any) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(list(shape)):
        stride.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(stride))


def _waited(t: torch.Tensor) -> torch.Tensor:
    """Collective results may come back as lazy wrappers; return a plain, ready tensor."""
    wait = getattr(t, "wait", None)
    if callable(wait) and type(t) is not torch.Tensor:
        t = wait()
    return t
