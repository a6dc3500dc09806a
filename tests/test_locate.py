"""The locating signal (issue 21): the persona push per environment, its random null, the
cumulative z that locates the environment pushing the persona, and the PushRule halting on it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gradroute as gr
from gradroute.model import residual_hooks
from gradroute.monitor.locate import locate_scores, push_terms, singles_out
from gradroute.monitor.runlog import step_from_json, step_to_json
from gradroute.policy import HaltPolicy, PushRule
from gradroute.router.records import StepRecord
from gradroute.testing import tiny_lm

LAYER = 1


def _run(mode: str, steps: int = 6, pushes=(("up", 1.0), ("down", -1.0), ("plain", 0.0)), direction=None,
         watch=None):
    """Rows of each environment train a language-model loss plus ``−sign · uᵀh`` at LAYER (sign +1:
    the environment's loss asks for more of the persona direction u); returns the step records."""
    torch.manual_seed(0)
    model, _ = tiny_lm("llama")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=g)
    sub = gr.Subspace.from_directions({LAYER: u[None]}, names=["persona"])
    measured = u if direction is None else direction
    envs = [e for e, _ in pushes]
    router = gr.GradientRouter(model, sub, mode=mode, envs=envs, check_provenance=False, watch=watch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    router.bind_optimizer(opt)
    sign = {e: s for e, s in pushes}
    records = []
    captured = {}
    unit = measured / measured.norm()
    with residual_hooks(model, [LAYER], lambda L, h: captured.__setitem__(L, h)):
        for step in range(steps):
            x = torch.randint(3, 100, (6, 8), generator=torch.Generator().manual_seed(100 + step))
            env = [envs[i % len(envs)] for i in range(6)]
            with router.attribution.batch(env):
                out = model(input_ids=x, labels=x)
                h = captured[LAYER]
                s = torch.tensor([sign[e] for e in env])
                loss = out.loss - 0.5 * (s[:, None] * (h @ unit)).mean()
                loss.backward()
            opt.step()
            opt.zero_grad()
            records.append(router.step())
    return records, router


@pytest.mark.parametrize("mode", ["update", "activation"])
def test_the_environment_asking_for_the_persona_is_located(mode):
    records, _ = _run(mode)
    rec = records[-1]
    assert set(rec.push) == {"up", "down", "plain"} and all(LAYER in d for d in rec.push.values())
    z = locate_scores(records)
    assert z["up"] > 3 and z["down"] < -3, z          # a push that accumulates, signed
    assert singles_out(z, "up") and not singles_out(z, "down") and not singles_out(z, "plain")
    assert z["plain"] < z["up"] / 1.5


def test_the_push_is_the_residual_gradient_along_u():
    """One step by hand: p = Σ_t −uᵀ ∂loss/∂h_t over the environment's live tokens."""
    records, router = _run("update", steps=1, pushes=(("up", 1.0),))
    # the loss's gradient along u from the extra term alone is +0.5/(B·T) per token, so the push is
    # at least that part's total; the language-model part adds its own (checked by recomputing)
    torch.manual_seed(0)
    model, _ = tiny_lm("llama")
    u = torch.randn(64, generator=torch.Generator().manual_seed(0))
    unit = u / u.norm()
    x = torch.randint(3, 100, (6, 8), generator=torch.Generator().manual_seed(100))
    captured = {}
    with residual_hooks(model, [LAYER], lambda L, h: captured.__setitem__(L, h)):
        out = model(input_ids=x, labels=x)
        h = captured[LAYER]
        h.retain_grad()
        (out.loss - 0.5 * (h @ unit).mean()).backward()
    expected = float(-(h.grad @ unit).sum())
    got = records[0].push["up"][LAYER][0]
    assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-7), (got, expected)
    null = records[0].push_null["up"][LAYER]
    assert len(null) == 16 and any(abs(x) > 0 for x in null)


def test_pushing_a_direction_outside_the_subspace_locates_nobody():
    """The environments push a random direction the subspace does not hold: no environment is
    located (the control a random subspace stands for)."""
    records, _ = _run("update", direction=torch.randn(64, generator=torch.Generator().manual_seed(5)))
    z = locate_scores(records)
    assert not any(singles_out(z, e) for e in z), z


def test_push_survives_the_log_and_drives_the_push_rule():
    records, _ = _run("update")
    back = [step_from_json(step_to_json(r)) for r in records]
    assert back[-1].push == records[-1].push and back[-1].push_null == records[-1].push_null
    assert locate_scores(back) == pytest.approx(locate_scores(records))
    rule = PushRule(3.0, min_steps=2)
    fired = [rule.check(r, back[: i + 1]) for i, r in enumerate(back)]
    first = next(v for v in fired if v is not None)
    assert first.env == "up" and first.rule == "push_z" and first.value > 3.0
    # folded one record at a time = computed from scratch
    assert first.value == pytest.approx(locate_scores(back[: back.index(next(r for r, v in zip(back, fired) if v)) + 1])["up"])
    pol = HaltPolicy(max_push_z=3.0, push_min_steps=2)
    assert any(isinstance(r, PushRule) for r in pol.rules)
    with pytest.raises(gr.errors.ConfigError):
        PushRule(0.0)


def test_push_terms_skip_missing_and_nonfinite():
    rec = StepRecord(step=1, update_norm=0.0, update_norm_per_layer={}, adapter_norm=0.0, adapter_norm_per_layer={},
                     push={"a": {0: [2.0], 1: [float("nan")], 2: [1.0]}, "b": {0: [1.0]}},
                     push_null={"a": {0: [1.0, -1.0], 1: [1.0, 1.0], 2: [0.5, 0.5]}})
    assert push_terms(rec) == {"a": (3.0, [1.5, -0.5])}
    assert locate_scores([rec, rec]) == pytest.approx({"a": 6.0 / math.sqrt((9.0 + 1.0) / 2)})


def test_a_grpo_run_logs_the_push_and_its_report_draws_who_pushes(tmp_path):
    """gradroute.attach on TRL's GRPOTrainer: the log carries the push, the report draws the
    locating score per environment and says it in words."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from gradroute import report as rp
    from gradroute.monitor import read_log

    torch.manual_seed(0)
    model, tok = tiny_lm("llama")
    args = GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=3e-3,
                      max_steps=4, report_to=[], logging_steps=1, seed=0, disable_tqdm=True, save_strategy="no")
    data = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(16)], "env": ["bang", "plain"] * 8})
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, env, **kw: [float(sum(map(ord, c)) % 7)
                                                                                    for c in completions],
                          args=args, train_dataset=data, processing_class=tok)
    sub = gr.Subspace.from_directions({3: torch.randn(1, 64, generator=torch.Generator().manual_seed(0))})
    gr.attach(trainer, sub, env_column="env", policy=HaltPolicy(max_push_z=50.0, action="warn"))
    trainer.train()
    steps = read_log(tmp_path / "run").steps
    assert steps and all(3 in layers for r in steps for layers in r.push.values())
    paths = rp.figures(tmp_path / "run", tmp_path / "figs")
    assert "locate.png" in {p.name for p in paths}
    text = rp.report(tmp_path / "run", out=tmp_path / "rep")
    assert "who pushes the persona" in text and "locate.png" in text


@pytest.mark.parametrize("mode", ["update", "activation"])
def test_watched_directions_show_a_push_the_routed_subspace_does_not_hold(mode):
    """The environments push a direction v the routed subspace does not hold; v is watched
    (monitored, not routed): the watched locating score finds the pushing environment, the
    routed one does not, and the watched rule fires naming it."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(5))
    watch = gr.Subspace.from_directions({LAYER: v[None]}, names=["elsewhere"])
    records, router = _run(mode, direction=v, watch=watch)
    assert f"watch:{LAYER}" in records[-1].push["up"] and LAYER in records[-1].push["up"]
    routed, watched = locate_scores(records), locate_scores(records, watch=True)
    assert singles_out(watched, "up") and not any(singles_out(routed, e) for e in routed), (routed, watched)
    rule = PushRule(3.0, min_steps=2, watch=True)
    fired = [v for i, r in enumerate(records) if (v := rule.check(r, records[: i + 1]))]
    assert fired and fired[0].env == "up" and fired[0].rule == "watch_push_z"
    assert not any(PushRule(3.0, min_steps=2).check(r, records[: i + 1]) for i, r in enumerate(records))
    back = [step_from_json(step_to_json(r)) for r in records]
    assert locate_scores(back, watch=True) == pytest.approx(watched)


def test_watch_is_refused_without_attribution_or_on_module_layers():
    model, _ = tiny_lm("llama")
    sub = gr.Subspace.from_directions({LAYER: torch.randn(1, 64)})
    with pytest.raises(gr.errors.ConfigError, match="watch"):
        gr.GradientRouter(model, sub, watch=sub, check_provenance=False)
    named = gr.Subspace.from_directions({"model.layers.1.mlp.down_proj": torch.randn(1, 64)})
    with pytest.raises(gr.errors.ConfigError, match="residual-stream layers"):
        gr.GradientRouter(model, sub, envs=["a"], watch=named, check_provenance=False)


def test_non_finite_pushes_survive_the_log_and_are_skipped():
    """The log writes NaN as null and inf as "inf": read back, they are floats again and the
    locating score skips them (was: a TypeError after a resume re-read the history)."""
    rec = StepRecord(step=1, update_norm=0.0, update_norm_per_layer={}, adapter_norm=0.0, adapter_norm_per_layer={},
                     samples={"a": 4.0}, push={"a": {0: [float("nan")], 1: [2.0]}},
                     push_null={"a": {0: [1.0, float("inf")], 1: [1.0, -1.0]}})
    from gradroute.monitor.runlog import _jsonable

    back = step_from_json(json.loads(json.dumps(_jsonable(step_to_json(rec)))))  # as the log writes it
    assert math.isnan(back.push["a"][0][0]) and math.isinf(back.push_null["a"][0][1])
    assert locate_scores([back]) == pytest.approx({"a": 2.0})
