"""Gather: sum each step's per-environment figures over ranks under torch.distributed.

Every rank captures what its own micro-batches produced; before the replay, one all-reduce
(:func:`gradroute.distributed.all_reduce_sum`) adds up, in the declared environment order, the
in-subspace gradients ``G_e`` (and bias blocks), the activation projection sums, the persona
push sums, and the counts
(rows, live tokens, reward sums and counts), so that every rank computes the same shares.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from ...distributed import all_reduce_sum, world_size
from ...errors import EnvColumnError

if TYPE_CHECKING:
    from .capture import Capture

__all__ = ["all_reduce_step"]


def all_reduce_step(cap: Capture) -> None:
    """All-reduce ``cap``'s per-env sums of this step over ranks (fixed vocabulary order), in place.
    A no-op in a single process."""
    if world_size() == 1:
        return
    if not cap.fixed_vocab:
        raise EnvColumnError(
            "under torch.distributed the environment vocabulary must be declared up front.",
            "pass envs=[...] (gradroute.attach does this from the dataset column).",
        )
    n = len(cap.vocab)
    tensors: list[torch.Tensor] = []
    layout: list[tuple[str, Any, Any, tuple[int, ...]]] = []
    for r in cap.routes:
        shape = r.target.adapter_shape
        for e in range(n):
            tensors.append(cap._G[r.target.module].get(e, torch.zeros(shape, device=r.weight.device)))
            layout.append(("G", r.target.module, e, shape))
            if len(r.blocks) > 1:
                tensors.append(cap._Gb[r.target.module].get(e, torch.zeros(r.target.rank, device=r.weight.device)))
                layout.append(("Gb", r.target.module, e, ()))
    for L, U in cap.probes.items():
        k = U.shape[1]
        for e in range(n):
            tensors.append(cap._act[L].get(e, torch.zeros(k)))
            layout.append(("act", L, e, ()))
        D = cap._push_dirs[L]
        for e in range(n):
            tensors.append(cap._push[L].get(e, torch.zeros(D.shape[1], device=D.device)))
            layout.append(("push", L, e, ()))
    counts = torch.tensor([cap._rows.get(e, 0.0) for e in range(n)]
                          + [cap._act_tokens[L].get(e, 0.0) for L in cap.probes for e in range(n)]
                          + [v for e in range(n) for v in cap._rewards.get(e, [0.0, 0.0])], dtype=torch.float64)
    out = all_reduce_sum(tensors + [counts])
    for (kind, key, e, _), t in zip(layout, out[:-1]):
        if kind == "G":
            cap._G[key][e] = t
        elif kind == "Gb":
            cap._Gb[key][e] = t
        elif kind == "push":
            cap._push[key][e] = t
        else:
            cap._act[key][e] = t
    c = out[-1].tolist()
    cap._rows = defaultdict(float, {e: c[e] for e in range(n)})
    i = n
    for L in cap.probes:
        cap._act_tokens[L] = {e: c[i + e] for e in range(n)}
        i += n
    cap._rewards = defaultdict(lambda: [0.0, 0.0], {e: [c[i + 2 * e], c[i + 2 * e + 1]] for e in range(n)})
