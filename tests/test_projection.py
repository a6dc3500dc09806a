"""Property tests for the subspace algebra (invariant 1 and the projection identities)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradroute import projection as P
from gradroute.errors import DegenerateDirectionsError, GradrouteWarning

settings.register_profile("gradroute", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("gradroute")


@st.composite
def direction_sets(draw):
    """Arbitrary direction sets: wild scales, near-duplicates, rank deficiency, zero rows."""
    d = draw(st.integers(1, 48))
    n = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n, d, generator=g, dtype=torch.float64)
    scales = torch.tensor(draw(st.lists(st.sampled_from([1e-8, 1e-3, 1.0, 1e3, 1e8]), min_size=n, max_size=n)),
                          dtype=torch.float64)
    D = D * scales[:, None]
    kind = draw(st.sampled_from(["plain", "dup", "combo", "zero", "near"]))
    if n >= 2 and kind == "dup":
        D[1] = D[0] * 3.0
    elif n >= 3 and kind == "combo":
        D[2] = D[0] - 2 * D[1]
    elif kind == "zero":
        D[-1] = 0
    elif n >= 2 and kind == "near":
        D[1] = D[0] + 1e-9 * D[0].norm() * torch.randn(d, generator=g, dtype=torch.float64)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return D.to(dtype)


@given(direction_sets(), st.sampled_from(["error", "warn", "drop"]))
def test_orthonormalize_is_orthonormal_or_refuses(D, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradrouteWarning)
        try:
            U, rep = P.orthonormalize(D, on_degenerate=mode)
        except DegenerateDirectionsError:
            # refused only if some row really is zero or (near-)dependent: Gram-Schmidt's
            # residual bounds the smallest singular value of the normalized rows from above
            Dd = D.double()
            norms = Dd.norm(dim=1)
            if (norms == 0).any():
                return
            s = torch.linalg.svdvals(Dd / norms[:, None])
            assert D.shape[0] > D.shape[1] or s.min() <= 1e-3 + 1e-9
            return
    # invariant 1: orthonormal to 1e-6 in float32
    assert U.dtype == torch.float32
    assert P.orthonormality_error(U) <= 1e-6
    assert U.shape == (D.shape[1], len(rep.kept))
    assert len(rep.kept) + len(rep.dropped) == D.shape[0]
    # every kept direction lies in the span, with positive orientation
    Dk = D[rep.kept].double()
    Dk = Dk / Dk.norm(dim=1, keepdim=True)
    resid = Dk - P.project(Dk, U.double())
    assert resid.norm(dim=1).max() < 1e-4
    assert (P.coords(Dk, U.double()).diagonal() > 0).all()
    # dropped ones are (near-)dependent on the kept span, or zero
    for i, _ in rep.dropped:
        v = D[i].double()
        if v.norm() > 0:
            v = v / v.norm()
            assert (v - P.project(v, U.double())).norm() <= 2e-3


def test_orthonormalize_reports_what_it_drops():
    D = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 0], [0, 1.0, 0]])
    with pytest.raises(DegenerateDirectionsError, match="direction 1.*dependent") as e:
        P.orthonormalize(D, names=["a", "b", "c", "d"])
    assert "'b'" in str(e.value) and "zero vector" in str(e.value) and "Fix:" in str(e.value)
    with pytest.warns(GradrouteWarning, match="dropped"):
        U, rep = P.orthonormalize(D, on_degenerate="warn")
    assert rep.kept == [0, 3] and [i for i, _ in rep.dropped] == [1, 2]
    assert torch.allclose(U, torch.tensor([[1.0, 0], [0, 1], [0, 0]]))
    with pytest.raises(DegenerateDirectionsError, match="NaN"):
        P.orthonormalize(torch.tensor([[float("nan"), 1.0]]), on_degenerate="drop")


@st.composite
def basis_and_tensor(draw):
    d = draw(st.integers(2, 40))
    k = draw(st.integers(1, d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    U = P.random_basis(d, k, g)
    shape = draw(st.sampled_from([(d,), (5, d), (d, 7), (3, d, 2)]))
    x = torch.randn(*shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    dim = shape.index(d) if shape.count(d) == 1 else (0 if shape[0] == d else -1)
    return U, x, dim


@given(basis_and_tensor())
def test_projection_identities(case):
    U, x, dim = case
    scale = float(x.abs().max()) + 1e-30
    p = P.project(x, U, dim)
    r = P.remove(x, U, dim)
    # idempotent
    assert torch.allclose(P.project(p, U, dim), p, atol=1e-5 * scale)
    # project + remove = identity
    assert torch.allclose(p + r, x, atol=1e-5 * scale)
    # the orthogonal part has no coordinates; lift(coords) = project
    assert P.coords(r, U, dim).abs().max() <= 1e-5 * scale
    assert torch.allclose(P.lift(P.coords(x, U, dim), U, dim), p.float(), atol=1e-5 * scale)
    e = P.energy_fraction(x, U, dim)
    assert ((e >= 0) & (e <= 1 + 1e-5)).all()


def test_sides_of_a_weight_matrix():
    """dim=0 is U Uᵀ W (writer), dim=1 is W V Vᵀ (reader)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    U = P.random_basis(6, 2, g).double()
    V = P.random_basis(4, 3, g).double()
    assert torch.allclose(P.project(W, U, 0), U @ U.T @ W)
    assert torch.allclose(P.project(W, V, 1), W @ V @ V.T)
    assert torch.allclose(P.coords(W, U, 0), U.T @ W)


def test_principal_angles_and_overlap():
    g = torch.Generator().manual_seed(1)
    U = P.random_basis(64, 4, g)
    assert torch.allclose(P.principal_cosines(U, U), torch.ones(4), atol=1e-6)
    assert P.overlap(U, U) == pytest.approx(1.0, abs=1e-6)
    # random subspaces: expected overlap k/d = 4/64
    vals = [P.overlap(U, P.random_basis(64, 4, g)) for _ in range(200)]
    assert sum(vals) / len(vals) == pytest.approx(4 / 64, rel=0.25)
    # an orthogonal complement has overlap 0
    W = P.remove(torch.randn(64, 4, generator=g), U, 0)
    U2, _ = P.orthonormalize(W.T)
    assert P.overlap(U, U2) < 1e-10


def test_bfloat16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    U = P.random_basis(32, 3, g)
    x = torch.randn(4, 32, generator=g).bfloat16()
    assert P.coords(x, U).dtype == torch.float32
    assert P.project(x, U).dtype == torch.bfloat16
    assert torch.allclose(P.coords(x, U), x.float() @ U)
