"""The optimizer replay of per-environment attribution, on known numbers (no model)."""

from __future__ import annotations

import pytest
import torch

from gradroute.router.attribution.replay import (
    OptimizerReplay,
    direction,
    first_moment,
    flat_coords,
    preconditioner,
    second_moment,
    shares_along,
)

N = 12  # flat adapter coordinates of one module


def _grads(seed: int, envs=(0, 1, 2)) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {e: torch.randn(N, generator=g, dtype=torch.float64) for e in envs}


def _torch_step(opt_cls, grads: list[torch.Tensor], w0: torch.Tensor | None = None, **kw) -> list[torch.Tensor]:
    """The real optimizer's update ΔA at each step, for the total gradients ``grads``."""
    w = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64) if w0 is None else w0.clone())
    opt = opt_cls([w], **kw)
    out = []
    for G in grads:
        before = w.detach().clone()
        w.grad = G.clone()
        opt.step()
        out.append(w.detach() - before)
    return out


def test_plain_sgd_share_is_the_gradient_component_along_the_total():
    grads = _grads(0)
    G = sum(grads.values())
    (dA,) = _torch_step(torch.optim.SGD, [G], lr=0.1)
    replay = OptimizerReplay((0.0, None))
    replay.begin_step()
    s = replay.module_shares("m", grads, dA, 0.0, None)
    for e, g in grads.items():
        assert s[e] == pytest.approx(float(g @ G) / float(G @ G), rel=1e-12)
    assert sum(s.values()) == pytest.approx(1.0, abs=1e-12)
    assert not replay.m and not replay.v  # no momentum, no preconditioner: nothing kept


def test_adam_first_step_matches_the_elementwise_formula():
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    grads = _grads(1)
    G = sum(grads.values())
    (dA,) = _torch_step(torch.optim.Adam, [G], lr=lr, betas=(b1, b2), eps=eps)
    # step 1: m̂_e = G_e, v̂ = G², so p_e = G_e / (|G| + ε) and ΔA = −lr·Σ_e p_e
    p = {e: g / (G.abs() + eps) for e, g in grads.items()}
    P = sum(p.values())
    assert torch.allclose(dA, -lr * P, rtol=1e-10, atol=0)
    replay = OptimizerReplay((b1, b2), eps)
    assert replay.begin_step() == (b1, b2) and replay.t == 1
    s = replay.module_shares("m", grads, dA, b1, b2)
    for e in grads:
        assert s[e] == pytest.approx(float(p[e] @ dA) / float(P @ dA), rel=1e-10)
        assert s[e] == pytest.approx(float(p[e] @ P) / float(P @ P), rel=1e-10)
    assert sum(s.values()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(replay.v["m"], (1 - b2) * G * G, rtol=1e-15)


def test_weight_decay_is_spread_along_the_actual_update():
    """AdamW: ΔA = −lr·(Σ_e p_e + λ·W) is not parallel to Σ_e p_e; the shares are the
    components along ΔA itself, ⟨p_e, ΔA⟩ / ⟨Σ p, ΔA⟩, not along the prediction."""
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-2, 0.5
    grads = _grads(10)
    G = sum(grads.values())
    w0 = torch.randn(N, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    (dA,) = _torch_step(torch.optim.AdamW, [G], w0=w0, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p = {e: g / (G.abs() + eps) for e, g in grads.items()}
    P = sum(p.values())
    assert torch.allclose(dA, -lr * (P + wd * w0), rtol=1e-10)
    replay = OptimizerReplay((b1, b2), eps)
    replay.begin_step()
    s = replay.module_shares("m", grads, dA, b1, b2)
    for e in grads:
        assert s[e] == pytest.approx(float(p[e] @ dA) / float(P @ dA), rel=1e-10)
    assert max(abs(s[e] - float(p[e] @ P) / float(P @ P)) for e in grads) > 1e-3  # the two differ here
    assert sum(s.values()) == pytest.approx(1.0, abs=1e-12)


def test_adam_moments_over_steps_sum_to_the_optimizers_and_an_env_without_gradient_keeps_a_share():
    """Per-environment first moments sum to Adam's; the replayed directions sum to the real
    step; an environment absent this step still moves the update through its momentum."""
    b1, b2, eps, lr = 0.8, 0.99, 1e-8, 1e-2
    steps = [_grads(2), _grads(3), _grads(4, envs=(0, 2))]
    steps[2][1] = torch.zeros(N, dtype=torch.float64)  # what Attribution passes for a moment-only env
    totals = [sum(gs.values()) for gs in steps]
    dAs = _torch_step(torch.optim.Adam, totals, lr=lr, betas=(b1, b2), eps=eps)
    replay = OptimizerReplay(lambda: (b1, b2), eps)
    m = {e: torch.zeros(N, dtype=torch.float64) for e in (0, 1, 2)}  # independent reference
    v = torch.zeros(N, dtype=torch.float64)
    for t, (gs, G, dA) in enumerate(zip(steps, totals, dAs), start=1):
        replay.begin_step()
        s = replay.module_shares("m", gs, dA, b1, b2)
        v = b2 * v + (1 - b2) * G * G
        denom = (v / (1 - b2**t)).sqrt() + eps
        p = {}
        for e, g in gs.items():
            m[e] = b1 * m[e] + (1 - b1) * g
            p[e] = m[e] / (1 - b1**t) / denom
        P = sum(p.values())
        assert torch.allclose(-lr * P, dA, rtol=1e-9, atol=1e-15)  # Σ_e p_e is Adam's direction
        for e in gs:
            assert s[e] == pytest.approx(float(p[e] @ dA) / float(P @ dA), rel=1e-9, abs=1e-12)
        assert sum(s.values()) == pytest.approx(1.0, abs=1e-12)
    assert s[1] != 0.0  # env 1 had no gradient at step 3, only momentum
    assert torch.allclose(sum(replay.m["m"].values()), sum(m.values()), rtol=1e-12)


def test_sgd_momentum_first_moments_are_torch_buffers_split_by_environment():
    b1, lr = 0.9, 0.1
    steps = [_grads(5), _grads(6)]
    totals = [sum(gs.values()) for gs in steps]
    dAs = _torch_step(torch.optim.SGD, totals, lr=lr, momentum=b1)
    replay = OptimizerReplay((b1, None))
    buf = {e: None for e in (0, 1, 2)}
    for gs, dA in zip(steps, dAs):
        replay.begin_step()
        s = replay.module_shares("m", gs, dA, b1, None)
        for e, g in gs.items():  # torch's buffer without dampening: b ← β1·b + g (b = g first)
            buf[e] = g.clone() if buf[e] is None else b1 * buf[e] + g
        B = sum(buf.values())
        assert torch.allclose(dA, -lr * B, rtol=1e-12)
        for e in gs:
            assert s[e] == pytest.approx(float(buf[e] @ B) / float(B @ B), rel=1e-10)
    assert not replay.v


def test_moment_and_direction_formulas():
    g = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(second_moment(None, g, 0.9), 0.1 * g * g)
    v0 = torch.ones(3, dtype=torch.float64)
    assert torch.allclose(second_moment(v0, g, 0.9), 0.9 * v0 + 0.1 * g * g)
    assert torch.allclose(preconditioner(0.1 * g * g, 0.9, 1, 0.5), g.abs() + 0.5)
    assert torch.allclose(first_moment(None, g, 0.9, adam=True), 0.1 * g)
    assert torch.equal(first_moment(None, g, 0.9, adam=False), g)
    assert torch.allclose(first_moment(g, g, 0.9, adam=True), 0.9 * g + 0.1 * g)
    assert torch.allclose(first_moment(g, g, 0.9, adam=False), 1.9 * g)
    assert torch.equal(direction(g, 0.9, 3, None), g)
    d = torch.full((3,), 2.0, dtype=torch.float64)
    assert torch.allclose(direction(g, 0.5, 2, d), g / 0.75 / 2.0)


def test_shares_fall_back_when_the_update_is_orthogonal_and_none_without_direction():
    p = {0: torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1: torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)}
    P = p[0] + p[1]
    orth = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # e.g. pure weight decay on an untouched axis
    for update in (orth, torch.zeros(3, dtype=torch.float64)):
        s = shares_along(p, update)
        assert s == pytest.approx({0: float(p[0] @ P) / float(P @ P), 1: float(p[1] @ P) / float(P @ P)})
        assert sum(s.values()) == pytest.approx(1.0)
    zero = {0: torch.zeros(3, dtype=torch.float64)}
    assert shares_along(zero, orth) is None
    # an environment pushing against the update gets a negative share
    s = shares_along({0: torch.tensor([2.0, 0.0]), 1: torch.tensor([-1.0, 0.0])}, torch.tensor([1.0, 0.0]))
    assert s == pytest.approx({0: 2.0, 1: -1.0})


def test_flat_coords_and_replay_state_round_trip():
    W, b = torch.arange(6.0).reshape(2, 3), torch.tensor([7.0, 8.0])
    f = flat_coords(W, b)
    assert f.dtype == torch.float64 and f.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0]
    assert flat_coords(W).tolist() == f[:6].tolist()
    replay = OptimizerReplay((0.9, 0.999))
    for seed in (7, 8):
        replay.begin_step()
        gs = _grads(seed)
        replay.module_shares("m", gs, -sum(gs.values()), 0.9, 0.999)
    tensors = replay.state_dict()
    assert set(tensors) == {"m.0.m", "m.1.m", "m.2.m", "v.m"}
    again = OptimizerReplay((0.9, 0.999))
    again.load_state_dict(tensors, replay.t, remap={0: 2, 1: 0, 2: 1}, devices={"m": torch.device("cpu")})
    assert again.t == 2 and torch.equal(again.v["m"], replay.v["m"])
    assert torch.equal(again.m["m"][2], replay.m["m"][0]) and torch.equal(again.m["m"][0], replay.m["m"][1])
    gs = _grads(9)
    replay.begin_step(), again.begin_step()
    remapped = {2: gs[0], 0: gs[1], 1: gs[2]}
    s1 = replay.module_shares("m", gs, -sum(gs.values()), 0.9, 0.999)
    s2 = again.module_shares("m", dict(sorted(remapped.items())), -sum(gs.values()), 0.9, 0.999)
    assert s1[0] == pytest.approx(s2[2], rel=1e-12) and s1[1] == pytest.approx(s2[0], rel=1e-12)
