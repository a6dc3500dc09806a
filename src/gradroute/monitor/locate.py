"""The locating signal: which environment pushes the persona (issue 21).

The adapter's norm share says which environment *learns most* in the subspace; it does not say
which one pushes the persona. The persona push does. At every routed step, for environment e,
probe layer L and the subspace's direction u_L (a basis column, oriented along the direction it
was built from, e.g. persona − contrast)::

    p_{e,L,t} = Σ_{tokens of e} −u_Lᵀ ∂loss/∂h_L          (StepRecord.push)

is the first-order change the step asks of the persona coordinate of e's own tokens (the
residual gradient, read before any routing, so the same in every mode). The same sums along m
random directions ``r_{L,j}`` orthogonal to the subspace (``StepRecord.push_null``, m = 16) are
its null: what directions with no special role get pushed. The **locating score** of
environment e compares the run's cumulative push along u with the cumulative pushes along the
random directions::

    S_e(v) = Σ_{t, L} p_{e,L,t}(v)             Z_e = S_e(u) / sqrt(mean_j S_e(r_j)²)

Z of order 1: the environment pushes the persona no more than any direction gets pushed (a
learning environment pushes every direction somewhat, and a fixed direction's pushes
accumulate, so the null is cumulative too); Z ≫ 1: its loss keeps asking for more of the
persona; Z < 0: it pushes away from the persona.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..layers import LayerKey

if TYPE_CHECKING:
    from ..router.records import StepRecord

__all__ = ["locate_scores", "locate_trajectory", "push_terms", "singles_out", "z_score"]


def _watched(L: LayerKey) -> bool:
    return isinstance(L, str) and L.startswith("watch:")


def push_terms(rec: StepRecord, direction: int = 0, layers: Sequence[LayerKey] | None = None,
               watch: bool = False) -> dict[str, tuple[float, list[float]]]:
    """One record's ``{env: (Σ_L p_{e,L}(u), [Σ_L p_{e,L}(r_j)]_j)}`` along basis column ``direction``,
    over ``layers`` (default: the routed subspace's probe layers; ``watch=True``: the watched,
    not routed, ones — ``GradientRouter(watch=...)``, keys ``"watch:<L>"``)."""
    out: dict[str, tuple[float, list[float]]] = {}
    for env, per_layer in rec.push.items():
        nulls = rec.push_null.get(env, {})
        p_sum, r_sum = 0.0, None
        for L, p in per_layer.items():
            r = nulls.get(L)
            if layers is not None and L not in layers:
                continue
            if (layers is None and _watched(L) != watch) or direction >= len(p) or not r:
                continue
            if not (math.isfinite(p[direction]) and all(math.isfinite(x) for x in r)):
                continue
            p_sum += p[direction]
            r_sum = list(r) if r_sum is None else [a + b for a, b in zip(r_sum, r)]
        if r_sum:
            out[env] = (p_sum, r_sum)
    return out


def z_score(push: float, null: Sequence[float]) -> float | None:
    """``S(u) / sqrt(mean_j S(r_j)²)`` (None when the null is zero)."""
    den = math.sqrt(sum(x * x for x in null) / len(null)) if null else 0.0
    return push / den if den > 0 else None


def locate_scores(records: Iterable[StepRecord], direction: int = 0, layers: Sequence[LayerKey] | None = None,
                  window: int | None = None, watch: bool = False) -> dict[str, float]:
    """``{env: Z_e}`` over ``records`` (the last ``window`` of them when given), along basis column
    ``direction`` at ``layers`` (default: every probe layer of the routed subspace; ``watch=True``:
    of the watched one). Environments without a push are left out."""
    recs = list(records)
    if window is not None:
        recs = recs[-window:]
    sums: dict[str, tuple[float, list[float]]] = {}
    for rec in recs:
        for env, (p, r) in push_terms(rec, direction, layers, watch).items():
            if env in sums:
                p0, r0 = sums[env]
                sums[env] = (p0 + p, [a + b for a, b in zip(r0, r)])
            else:
                sums[env] = (p, r)
    out = {e: z_score(p, r) for e, (p, r) in sums.items()}
    return {e: z for e, z in out.items() if z is not None}


def locate_trajectory(records: Iterable[StepRecord], direction: int = 0,
                      watch: bool = False) -> list[dict[str, float]]:
    """The locating score after each record (cumulative from the first), in one pass."""
    sums: dict[str, tuple[float, list[float]]] = {}
    out = []
    for rec in records:
        for env, (p, r) in push_terms(rec, direction, None, watch).items():
            p0, r0 = sums.get(env, (0.0, [0.0] * len(r)))
            sums[env] = (p0 + p, [a + b for a, b in zip(r0, r)])
        out.append({e: z for e, (p, r) in sums.items() if (z := z_score(p, r)) is not None})
    return out


def singles_out(scores: dict[str, float], env: str, ratio: float = 1.5) -> bool:
    """Whether ``env`` is located: ``Z_env ≥ ratio · max(1, max_{e ≠ env} Z_e)`` — it pushes the
    persona ``ratio`` times more than directions with no special role get pushed (|Z| ~ 1) and
    than any other environment pushes it (one pushing *away* from the persona, Z < 0, is no rival)."""
    if env not in scores:
        return False
    others = [v for e, v in scores.items() if e != env and e != "_unattributed"]
    return scores[env] >= ratio * max([1.0, *others])
