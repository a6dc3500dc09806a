"""router.envs: the environment list (Environments) and the per-environment split (EnvSplit).

The split is checked against its definition: ``A_e += s_e ΔA`` per module and coordinate block,
shares per module summing to exactly 1 in float64, so that Σ_e A_e = A (invariant 5), and what
the adapter held before the first split step becomes the reserved ``_unattributed`` share.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradroute as gr
from gradroute.errors import ConfigError, EnvColumnError, GradrouteError
from gradroute.plan import build_plan
from gradroute.router.envs import UNATTRIBUTED, Environments, EnvSplit
from gradroute.router.route import Route
from gradroute.testing import tiny_lm


@pytest.fixture(scope="module")
def gpt2():
    return tiny_lm("gpt2")[0]


def _split(model, names=None):
    """An EnvSplit over GPT-2's writers of block 1 (weight + bias blocks each)."""
    g = torch.Generator().manual_seed(0)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=g)})
    plan = build_plan(model, sub)
    mods = dict(model.named_modules())
    routes = [Route(t, mods[t.module], sub.basis(t.layer), torch.float64) for t in plan]
    envs = Environments(names)
    return EnvSplit(routes, envs), routes, envs


def _step(routes, seed):
    """One routed step: a random ΔA per block, added to the adapter (as the modes do)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for r in routes:
        deltas[r.name] = []
        for b in r.blocks:
            d = torch.randn(b.adapter.shape, generator=g, dtype=torch.float64)
            b.adapter = b.adapter + d
            deltas[r.name].append(d)
    return deltas


def _flat(routes, env=None):
    parts = [(b.adapter if env is None else b.env[env]).reshape(-1) for r in routes for b in r.blocks]
    return torch.cat(parts).double()


# ------------------------------------------------------------------------------ Environments
def test_declared_environments_are_fixed():
    envs = Environments(["math", "code", 3])
    assert envs.fixed and envs.names == ["math", "code", "3"] and len(envs) == 3
    assert envs.index("code") == 1 and envs.index(3) == 2 and envs[0] == "math"
    with pytest.raises(EnvColumnError) as e:
        envs.index("poetry")
    assert "poetry" in str(e.value) and "envs=[...]" in str(e.value).split("Fix:")[1]
    assert envs.names == ["math", "code", "3"]  # nothing was added


def test_learned_environments_in_first_seen_order():
    envs = Environments()
    assert not envs.fixed and envs.names == []
    assert [envs.index(n) for n in ("b", "a", "b", "c", "a")] == [0, 1, 0, 2, 1]
    assert envs.names == ["b", "a", "c"]


@pytest.mark.parametrize("names,err", [(["a", "a"], ConfigError), ([UNATTRIBUTED], EnvColumnError),
                                       (["x", UNATTRIBUTED], EnvColumnError)])
def test_bad_declarations(names, err):
    with pytest.raises(err) as e:
        Environments(names)
    assert isinstance(e.value, GradrouteError) and "Fix:" in str(e.value)


def test_reserved_name_is_refused_when_learned():
    envs = Environments()
    with pytest.raises(EnvColumnError, match="reserved"):
        envs.index(UNATTRIBUTED)
    assert envs.names == []


def test_register_and_all():
    envs = Environments(["a"])
    assert envs.all() == ["a"] and not envs.unattributed
    envs.register("z")  # explicit env_weights may name an environment never declared
    envs.register("a")
    assert envs.names == ["a", "z"]
    envs.register(UNATTRIBUTED)
    assert envs.unattributed and envs.names == ["a", "z"]
    assert envs.all() == [UNATTRIBUTED, "a", "z"]  # _unattributed first, never among the names


# ------------------------------------------------------------------------------ parse
def test_parse_global_shares_give_every_module_shares_summing_to_exactly_one(gpt2):
    split, routes, _ = _split(gpt2)
    assert split.parse(None) is None
    third = 1 / 3
    shares = split.parse({"a": third, "b": third, 7: third})
    assert set(shares) == {r.name for r in routes}
    for per in shares.values():
        assert list(per) == ["a", "b", "7"]
        assert math.fsum(per.values()) == 1.0  # exact in float64
        assert all(abs(v - third) < 1e-15 for v in per.values())
    neg = split.parse({"a": 1.5, "b": -0.5})  # negative shares are allowed
    assert all(math.fsum(p.values()) == 1.0 and p["b"] == -0.5 for p in neg.values())


def test_parse_per_module_shares(gpt2):
    split, routes, _ = _split(gpt2)
    m1, m2 = (r.name for r in routes)
    shares = split.parse({"a": {m1: 1.0, m2: 0.25}, "b": {m2: 0.75}})
    assert shares == {m1: {"a": 1.0}, m2: {"a": 0.25, "b": 0.75}}
    with pytest.raises(ConfigError, match="missing"):
        split.parse({"a": {m1: 1.0}})  # m2 gets no share at all


BAD_WEIGHTS = [
    ("empty", {}, "non-empty mapping"),
    ("list", [("a", 1.0)], "non-empty mapping"),
    ("mixed", {"a": 0.5, "b": {"m": 0.5}}, "mixes"),
    ("string", {"a": "1"}, "not a number"),
    ("bool", {"a": True}, "not a number"),
    ("nan", {"a": float("nan"), "b": 1.0}, "not finite"),
    ("inf", {"a": float("inf")}, "not finite"),
    ("sum", {"a": 0.5, "b": 0.4}, "sum to 0.9"),
]


@pytest.mark.parametrize("name,weights,needle", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_parse_refuses_bad_weights(gpt2, name, weights, needle):
    split, _, _ = _split(gpt2)
    with pytest.raises(ConfigError) as e:
        split.parse(weights)
    assert needle in str(e.value) and str(e.value).split(" Fix: ", 1)[1].strip()


# ------------------------------------------------------------------------------ accumulate
def test_accumulate_splits_each_step_by_its_shares(gpt2):
    split, routes, envs = _split(gpt2)
    assert split.split_envs == []
    d1 = _step(routes, 1)
    s1 = split.parse({"a": 0.25, "b": 0.75})
    split.accumulate(s1, d1)
    for r in routes:
        assert len(r.blocks) == 2  # weight and bias
        for b, d in zip(r.blocks, d1[r.name]):
            assert torch.equal(b.env["a"], d * 0.25) and torch.equal(b.env["b"], d * 0.75)
            assert UNATTRIBUTED not in b.env  # nothing was routed before the first split step
    d2 = _step(routes, 2)
    split.accumulate(split.parse({"b": -1.0, "c": 2.0}), d2)
    assert split.split_envs == ["a", "b", "c"] and envs.names == ["a", "b", "c"]
    for r in routes:
        for i, b in enumerate(r.blocks):
            assert torch.equal(b.env["a"], d1[r.name][i] * 0.25)
            assert torch.equal(b.env["b"], d1[r.name][i] * 0.75 + d2[r.name][i] * -1.0)
            assert torch.equal(b.env["c"], d2[r.name][i] * 2.0)
            total = sum(b.env.values())
            assert torch.allclose(total, b.adapter, rtol=0, atol=1e-12 * float(b.adapter.abs().max()))


def test_updates_before_the_first_split_become_unattributed(gpt2):
    split, routes, envs = _split(gpt2)
    d0 = _step(routes, 0)  # routed, but not split by environment
    before = {r.name: [b.adapter.clone() for b in r.blocks] for r in routes}
    d1 = _step(routes, 1)
    split.accumulate(split.parse({"a": 1.0}), d1)
    assert envs.unattributed and envs.all()[0] == UNATTRIBUTED
    assert split.split_envs == [UNATTRIBUTED, "a"]
    for r in routes:
        for i, b in enumerate(r.blocks):
            assert torch.allclose(b.env[UNATTRIBUTED], before[r.name][i], rtol=0, atol=1e-12)
            assert torch.allclose(b.env[UNATTRIBUTED], d0[r.name][i], rtol=0, atol=1e-12)
            assert torch.equal(b.env["a"], d1[r.name][i])
    assert split.unattributed() == {r.name: {UNATTRIBUTED: 1.0} for r in routes}
    split.accumulate(split.unattributed(), _step(routes, 2))  # an un-split step after splitting
    for r in routes:
        for b in r.blocks:
            assert torch.allclose(b.env[UNATTRIBUTED] + b.env["a"], b.adapter, rtol=0, atol=1e-12)


def test_drop_one_environment_or_all(gpt2):
    split, routes, _ = _split(gpt2)
    split.accumulate(split.parse({"a": 0.5, "b": 0.5}), _step(routes, 1))
    split.drop("a")
    assert split.split_envs == ["b"]
    assert all("a" not in b.env for r in routes for b in r.blocks)
    split.drop("never-seen")  # unknown: nothing to forget
    assert split.split_envs == ["b"]
    split.drop(None)
    assert split.split_envs == [] and all(not b.env for r in routes for b in r.blocks)


def test_adapter_shares_and_norms(gpt2):
    split, routes, _ = _split(gpt2)
    assert split.adapter_shares() == {} and split.adapter_norms() == {}
    split.accumulate(split.parse({"a": 0.3, "b": 0.7}), _step(routes, 1))
    split.accumulate(split.parse({"a": 1.0}), _step(routes, 2))
    A = _flat(routes)
    shares = split.adapter_shares()
    assert set(shares) == {"a", "b"}
    for e, s in shares.items():
        assert s == pytest.approx(float(_flat(routes, e) @ A / (A @ A)), rel=1e-12)
    assert math.fsum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    norms = split.adapter_norms()
    for e, n in norms.items():
        assert n == pytest.approx(float(_flat(routes, e).norm()), rel=1e-12)


def test_adapter_shares_of_an_empty_adapter_are_zero(gpt2):
    split, routes, _ = _split(gpt2)
    zero = {r.name: [torch.zeros_like(b.adapter) for b in r.blocks] for r in routes}
    split.accumulate(split.parse({"a": 1.0}), zero)
    assert split.adapter_shares() == {"a": 0.0}
