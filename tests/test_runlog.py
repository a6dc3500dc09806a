"""The run log's typed records: a StepRecord and a Violation reach the log and come back as the
same typed values (JSON exists only inside the writer and the readers), old logs included."""

from __future__ import annotations

import json

import torch

import gradroute as gr
from gradroute.monitor import (
    RunLog,
    read_log,
    step_from_json,
    step_metrics,
    step_to_json,
    violation_from_json,
)
from gradroute.policy import ActivationDriftRule, HaltPolicy, Violation
from gradroute.testing import tiny_lm


def _attributed_records(steps: int = 3):
    model, _ = tiny_lm("llama")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0)),
                                       2: torch.randn(2, 64, generator=torch.Generator().manual_seed(1))})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router = gr.GradientRouter(model, sub, optimizer=opt, envs=["a", "b"])
    seen = []

    class Keep:
        def observe(self, rec):
            seen.append(rec)

    router.subscribe(Keep())
    g = torch.Generator().manual_seed(2)
    for i in range(steps):
        x = torch.randint(3, 100, (4, 8), generator=g)
        with router.attribution.batch(["a", "a", "b", "b"]):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.record_rewards(["a", "a", "b", "b"], [1.0, 0.0, float("nan") if i == 1 else 0.5, None])
        router.step(at_step=10 + i)
        opt.zero_grad()
    return router, seen


def test_a_step_record_survives_the_log_as_the_same_typed_value(tmp_path):
    router, seen = _attributed_records()
    assert [r.step for r in seen] == [10, 11, 12]  # the number the caller (a trainer) gave
    log = RunLog(tmp_path / "gradroute.jsonl")
    for r in seen:
        log.write(step_to_json(r.replace(time=1.5)))
    log.close()
    back = read_log(tmp_path, warn=False).steps
    assert len(back) == 3
    for orig, got in zip(seen, back):
        assert got == orig.replace(time=1.5)  # every logged field equal, layer keys ints again
        assert set(got.activation["a"]) == {1, 2} and isinstance(next(iter(got.adapter_norm_per_layer)), int)
    # rewards: NaN/None are counted per environment, not averaged in
    assert seen[0].reward == {"a": 0.5, "b": 0.5} and seen[0].nonfinite_rewards == {"b": 1}
    assert seen[1].nonfinite_rewards == {"b": 2} and seen[2].nonfinite_rewards_total == {"b": 4}
    assert back[2].nonfinite_rewards_total == {"b": 4}


def test_the_router_keeps_the_nonfinite_reward_totals_in_its_state(tmp_path):
    router, seen = _attributed_records(steps=2)
    router.save_state(tmp_path / "state")
    router.detach()
    again = gr.GradientRouter.from_state(router.model, tmp_path / "state")
    assert again._nf_rewards_total == {"b": 3} == seen[-1].nonfinite_rewards_total


def test_metrics_read_the_typed_record():
    _, seen = _attributed_records(steps=2)
    m = step_metrics(seen)
    last = seen[-1]
    assert m["gradroute/adapter_norm"] == last.adapter_norm
    assert m["gradroute/samples/a"] == sum(r.samples["a"] for r in seen)
    assert m["gradroute/activation/a/1/0"] == last.activation["a"][1][0]
    assert m["gradroute/nonfinite_rewards_total/b"] == 3.0
    assert all(isinstance(v, float) for v in m.values())


def test_a_violation_reaches_the_report_typed(tmp_path):
    """ActivationDriftRule → crossing/halt in the log → read_log → the report's fired layer: the
    environment and the layer travel as fields, never through the detail text."""
    router, seen = _attributed_records(steps=1)
    base = seen[0]
    hist = [base.replace(step=s, activation={"a": {2: [1.0 + 0.01 * (s % 2), -0.5]}}) for s in range(1, 21)]
    drifted = base.replace(step=21, activation={"a": {2: [1.5, -0.5]}})
    v = ActivationDriftRule(4.0, baseline_steps=20).check(drifted, hist)
    assert (v.env, v.layer) == ("a", 2)
    v.detail = "reworded prose that names no layer"
    mon = gr.DriftMonitor(router, tmp_path, HaltPolicy(rules=[ActivationDriftRule(4.0, baseline_steps=20)]),
                          raise_on_halt=False, attach=False, checkpoint_for=lambda step: tmp_path / f"checkpoint-{step}")
    for h in hist:
        mon.observe(h)
    assert mon.observe(drifted) and mon.stopping
    view = read_log(tmp_path, warn=False)
    halt = view.halts[-1]
    assert (halt.violation.rule, halt.violation.env, halt.violation.layer) == ("activation_z", "a", 2)
    assert halt.checkpoint == "checkpoint-21"  # relative to the run directory
    assert view.crossings[-1].violation == mon.violations[-1]
    from gradroute.report import fired_layer

    assert fired_layer(view) == ("a", "2")


def test_old_logs_name_env_and_layer_only_in_prose():
    old = {"type": "crossing", "step": 4, "rule": "activation_z", "value": 9.0, "threshold": 4.0,
           "detail": "environment 'copy', layer 1", "top_envs": [["copy", 9.0]]}
    v = violation_from_json(json.loads(json.dumps(old)))
    assert isinstance(v, Violation) and (v.env, v.layer, v.step) == ("copy", 1, 4)
    share = violation_from_json({"step": 2, "rule": "max_env_share", "detail": "environment 'hack'"})
    assert (share.env, share.layer) == ("hack", None)


def test_a_line_without_attribution_reads_back_with_empty_fields():
    rec = step_from_json({"type": "step", "step": 3, "adapter_norm": 0.5, "update_norm": "inf"})
    assert rec.step == 3 and rec.adapter_norm == 0.5 and rec.update_norm == float("inf")
    assert rec.samples == {} and rec.activation == {} and rec.attribution is None
