"""The batched attribution paths (issue 21's cost item) against direct per-environment references.

Mixed micro-batches are summed per environment with one one-hot contraction (``Eᵀ``), masked
token sums are taken before projecting, and the replay advances every environment's moments in
one tensor op. Each is checked here against the plain per-environment loop it replaces (or
against separate runs on each environment's rows), to float round-off.
"""

from __future__ import annotations

import pytest
import torch

import gradroute as gr
from gradroute.orientation import orientation
from gradroute.router.attribution.capture import RowEnvs, contract_by_env, token_sums
from gradroute.router.attribution.replay import (
    OptimizerReplay,
    direction,
    first_moment,
    preconditioner,
    second_moment,
    shares_along,
    shares_of_rows,
)
from gradroute.testing import tiny_lm

LAYER = 1


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).norm()) <= rel * max(float(b.norm()), 1e-12)


def test_row_envs_sum_by_env_matches_masked_sums():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([2, 0, 2, 3, 0, 2])
    env = RowEnvs(ids)
    assert env.present == [0, 2, 3] and env.single is None and len(env) == 6
    v = torch.randn(6, 3, 5, generator=g)
    s = env.sum_by_env(v)
    assert s.shape == (3, 3, 5)
    for j, e in enumerate(env.present):
        assert _close(s[j], v[ids == e].sum(0), 1e-6)
    one = RowEnvs(torch.tensor([1, 1, 1]))
    assert one.single == 1 and one.present == [1]
    assert torch.equal(one.sum_by_env(v[:3]), v[:3].sum(0, keepdim=True))
    acc: dict[int, torch.Tensor] = {}
    env.accumulate(acc, v)
    env.accumulate(acc, v)
    assert set(acc) == {0, 2, 3} and _close(acc[3], 2 * v[3], 1e-6)


@pytest.mark.parametrize("kind,side", [("linear", "write"), ("linear", "read"), ("conv1d", "write"),
                                       ("conv1d", "read"), ("embedding", "embed")])
@pytest.mark.parametrize("ids", [[0, 1, 0, 2, 1], [1, 1, 1, 1, 1]])
def test_contract_by_env_matches_the_per_environment_contraction(kind, side, ids):
    g = torch.Generator().manual_seed(1)
    orient = orientation(kind, side)
    B, T, k, m, vocab = len(ids), 7, 3, 6, 11
    r = torch.randn(B, T, k, generator=g)
    o = torch.randint(0, vocab, (B, T), generator=g) if side == "embed" else torch.randn(B, T, m, generator=g)
    env = RowEnvs(torch.tensor(ids))
    got = contract_by_env(orient, r, o, vocab, env)
    assert got.shape[0] == len(env.present)
    for j, e in enumerate(env.present):
        rows = torch.tensor(ids) == e
        oo = o[rows].reshape(-1) if side == "embed" else o[rows].reshape(-1, m)
        ref = orient.contract(r[rows].reshape(-1, k), oo, vocab)
        assert got[j].shape == ref.shape and _close(got[j], ref, 1e-6)


def test_token_sums_are_the_masked_sums_over_tokens():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 4, generator=g)
    w = (torch.rand(3, 5, generator=g) > 0.3).float()
    assert _close(token_sums(x, w), (x * w[..., None]).sum(1), 1e-6)
    U = torch.linalg.qr(torch.randn(4, 2, generator=g))[0]
    # the projection of the sum is the sum of the projections
    assert _close(token_sums(x, w) @ U, ((x @ U) * w[..., None]).sum(1), 1e-6)


def _reference_shares(state: dict, grads: dict[int, torch.Tensor], update: torch.Tensor, b1: float, b2: float | None,
                      t: int, eps: float = 1e-8) -> dict[int, float] | None:
    """The replay written one environment at a time (the formulas of replay.py, unbatched)."""
    denom = None
    if b2 is not None:
        total = sum(grads.values())
        state["v"] = second_moment(state.get("v"), total, b2)
        denom = preconditioner(state["v"], b2, t, eps)
    p = {}
    for e, g in grads.items():
        if b1 > 0:
            m = state.setdefault("m", {})[e] = first_moment(state.get("m", {}).get(e), g, b1, adam=b2 is not None)
        else:
            m = g
        p[e] = direction(m, b1, t, denom)
    Ptot = sum(p.values())
    dot = float(Ptot @ update)
    return {e: float(pe @ update) / dot for e, pe in p.items()}


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, None), (0.0, None)])
def test_batched_replay_matches_the_per_environment_replay(betas):
    b1, b2 = betas
    g = torch.Generator().manual_seed(3)
    replay, state = OptimizerReplay(betas), {}
    # env 2 joins at the second step; env 0 has no gradient at the third (carried by its moment)
    schedule = [(0, 1), (0, 1, 2), (1, 2)]
    for t, present in enumerate(schedule, start=1):
        envs = sorted(set(present) | replay.envs("m"))
        grads = {e: (torch.randn(12, generator=g, dtype=torch.float64) if e in present
                     else torch.zeros(12, dtype=torch.float64)) for e in envs}
        update = -sum(grads.values()) + 0.1 * torch.randn(12, generator=g, dtype=torch.float64)
        assert replay.begin_step() == (b1, b2)
        got = replay.module_shares("m", grads, update, b1, b2)
        ref = _reference_shares(state, grads, update, b1, b2, t)
        assert got is not None and got.keys() == ref.keys()
        for e in ref:
            assert got[e] == pytest.approx(ref[e], rel=1e-10, abs=1e-12)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)
        if b1 > 0:
            for e in state["m"]:
                assert torch.allclose(replay.m["m"][e], state["m"][e], rtol=1e-12, atol=0)
    if b1 > 0:  # saved moments are independent tensors (no shared storage)
        saved = replay.state_dict()
        ptrs = {t.untyped_storage().data_ptr() for k, t in saved.items() if k.startswith("m.")}
        assert len(ptrs) == sum(k.startswith("m.") for k in saved)


def test_shares_of_rows_is_shares_along_stacked():
    g = torch.Generator().manual_seed(4)
    p = {0: torch.randn(5, generator=g, dtype=torch.float64), 3: torch.randn(5, generator=g, dtype=torch.float64)}
    u = torch.randn(5, generator=g, dtype=torch.float64)
    s = shares_along(p, u)
    rows = shares_of_rows(torch.stack([p[0], p[3]]), u)
    assert s is not None and rows is not None and list(s.values()) == rows
    P = p[0] + p[3]
    assert s[0] == pytest.approx(float(p[0] @ u) / float(P @ u), rel=1e-12)


def _subspace(d: int = 64, k: int = 2) -> gr.Subspace:
    g = torch.Generator().manual_seed(0)
    return gr.Subspace.from_directions({L: torch.randn(k, d, generator=g) for L in (0, 1)})


@pytest.mark.parametrize("mode,hooks_only", [("update", True), ("activation", True), ("activation", False)])
def test_mixed_micro_batch_gradients_push_and_projections_equal_runs_on_each_environment_alone(mode, hooks_only):
    """In a micro-batch mixing environments, each environment's in-span gradient, persona push
    and activation projection sum equal those of a run on its rows alone (losses summed over
    rows, so rows add). ``hooks_only=False``: the single-environment references in activation
    mode read the adapters' ``.grad`` increments."""
    torch.manual_seed(0)
    x = torch.randint(3, 100, (6, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the projections count live tokens only
    mask[3, :2] = 0
    envs = ["a", "b", "a", "c", "b", "a"]

    def run(rows: list[int], env_ids: list[str], hooks: bool = True):
        torch.manual_seed(0)
        model, _ = tiny_lm("llama")
        router = gr.GradientRouter(model, _subspace(), mode=mode, envs=["a", "b", "c"])
        att = router.attribution
        if mode == "activation" and hooks:
            att._param_of = {}  # token hooks for every micro-batch (the single-env reference too)
        xs = x[rows]
        with att.batch(env_ids):
            logits = model(input_ids=xs, attention_mask=mask[rows]).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), xs[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss.backward()
        G = {m: {e: t.clone() for e, t in d.items()} for m, d in att._G.items()}
        push = {L: {e: t.clone() for e, t in d.items()} for L, d in att._push.items()}
        act = {L: {e: t.clone() for e, t in d.items()} for L, d in att._act.items()}
        tokens = {L: dict(d) for L, d in att._act_tokens.items()}
        router.detach()
        return G, push, act, tokens

    G, push, act, tokens = run(list(range(6)), envs)
    assert G and push and act
    for e, name in enumerate(("a", "b", "c")):
        rows = [i for i, v in enumerate(envs) if v == name]
        G1, push1, act1, tokens1 = run(rows, [name] * len(rows), hooks_only)
        for m in G1:
            assert _close(G[m][e], G1[m][e]), (m, name)
        for L in push1:
            assert _close(push[L][e], push1[L][e]), (L, name)
            assert _close(act[L][e], act1[L][e]), (L, name)
            assert tokens[L][e] == tokens1[L][e] == float(mask[rows].sum())
