"""DriftMonitor, the JSONL log, HaltPolicy rules, DriftHalt, last_clean_checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import gradroute as gr
from gradroute.errors import ConfigError, DriftHalt, FileFormatError, GradrouteWarning
from gradroute.monitor import RunLog, read_records, step_from_json
from gradroute.policy import (
    ActivationDriftRule,
    AdapterNormRule,
    EnvShareRule,
    GrowthRule,
    HaltPolicy,
    NonFiniteRule,
)
from gradroute.testing import tiny_lm


def _rec(step, norm=0.0, shares=None, act=None, nonfinite=False, update=0.1):
    return {"type": "step", "step": step, "adapter_norm": norm, "update_norm": update, "nonfinite": nonfinite,
            "env_adapter_share": shares or {}, "activation": act or {}}


def _step(*args, **kwargs):
    """The typed step record the rules read (as the monitor hands it, or read back from a log)."""
    return step_from_json(_rec(*args, **kwargs))


def test_log_is_append_only_flushed_and_survives_a_torn_line(tmp_path):
    log = RunLog(tmp_path / "gradroute.jsonl")
    log.write({"type": "header"})
    log.write(_rec(1, 0.1))
    # flushed: another reader sees it before close
    assert len(read_records(tmp_path)) == 2
    log.close()
    with open(tmp_path / "gradroute.jsonl", "a") as f:
        f.write('{"type": "step", "step": 2, "adapter_no')  # a crash mid-write
    assert [r["type"] for r in read_records(tmp_path)] == ["header", "step"]
    log = RunLog(tmp_path / "gradroute.jsonl")  # reopening ends the torn line
    log.write(_rec(2, 0.2))
    log.close()
    assert [r.get("step") for r in read_records(tmp_path)] == [None, 1, 2]


def test_resume_supersedes_later_records(tmp_path):
    log = RunLog(tmp_path / "gradroute.jsonl")
    for s in (1, 2, 3, 4):
        log.write(_rec(s, s / 10))
    log.write({"type": "checkpoint", "step": 2, "path": str(tmp_path / "checkpoint-2")})
    log.write({"type": "crossing", "step": 4, "rule": "x"})
    log.write({"type": "resume", "from_step": 2})
    for s in (3, 4, 5):
        log.write(_rec(s, s))
    log.close()
    df = gr.load_log(tmp_path)
    assert df["step"].tolist() == [1, 2, 3, 4, 5]
    assert df["adapter_norm"].tolist() == [0.1, 0.2, 3, 4, 5]
    # the crossing that caused the restart is kept, flagged; it no longer taints checkpoints
    assert [(e["type"], e.get("superseded", False)) for e in df.attrs["events"]] == [
        ("checkpoint", False), ("crossing", True), ("resume", False)]
    (tmp_path / "checkpoint-2").mkdir()
    assert gr.last_clean_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(FileFormatError, match="no gradroute log"):
        gr.load_log(tmp_path / "elsewhere")


def test_rules():
    hist = [_step(s, 0.1 * s, act={"a": {"1": [1.0 + 0.01 * (s % 2), -0.5]}}) for s in range(1, 21)]
    assert AdapterNormRule(1.0).check(_step(21, 1.5), hist).value == 1.5
    assert AdapterNormRule(1.0).check(_step(21, 0.5), hist) is None
    v = GrowthRule(0.5, window=3).check(_step(21, 2.8), hist)  # 2.8 − norm at step 18 (1.8)
    assert v is not None and v.value == pytest.approx(1.0)
    assert GrowthRule(0.5, window=3).check(_step(21, 2.1), hist) is None
    v = EnvShareRule(0.8).check(_step(21, 1.0, {"hack": 0.9, "math": 0.1}), hist)
    assert v.value == 0.9 and "hack" in v.detail and v.top_envs[0] == ("hack", 0.9)
    assert EnvShareRule(0.8, min_norm=2.0).check(_step(21, 1.0, {"hack": 0.9}), hist) is None
    z = ActivationDriftRule(4.0, baseline_steps=20).check(_step(21, act={"a": {"1": [1.5, -0.5]}}), hist)
    assert z is not None and z.value == pytest.approx(0.495 / 0.005, rel=1e-6) and "layer 1" in z.detail
    assert z.top_envs[0][0] == "a"
    assert (z.env, z.layer) == ("a", 1) and z.to_dict()["layer"] == 1  # typed: the report reads fields, not prose
    # a sign flip at the same norm is drift too
    assert ActivationDriftRule(4.0, baseline_steps=20).check(_step(21, act={"a": {"1": [1.005, 0.5]}}), hist)
    assert ActivationDriftRule(4.0, baseline_steps=20).check(_step(21, act={"a": {"1": [1.01, -0.5]}}), hist) is None
    # a window averages the recent values (σ of the mean shrinks with √window)
    drifted = hist + [_step(s, act={"a": {"1": [1.0 + 0.01 * (s % 2) + 0.01, -0.5]}}) for s in range(21, 24)]
    one = ActivationDriftRule(4.0, baseline_steps=20).check(_step(24, act={"a": {"1": [1.012, -0.5]}}), drifted)
    four = ActivationDriftRule(4.0, baseline_steps=20, window=4).check(_step(24, act={"a": {"1": [1.012, -0.5]}}), drifted)
    assert one is None and four is not None
    assert NonFiniteRule().check(_step(21, nonfinite=True), hist) is not None
    assert NonFiniteRule().check(_step(21, update=float("nan")), hist) is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_adapter_norm=-1), "positive"),
    (dict(max_adapter_norm=float("nan")), "positive"),
    (dict(max_env_share=1.5), r"\(0, 1\]"),
    (dict(max_env_share=0.5, env_share_min_norm=-1), ">= 0"),
    (dict(max_growth=1.0, growth_window=0), "window"),
    (dict(max_activation_z=3, baseline_steps=1), "baseline_steps"),
    (dict(action="explode"), "action"),
])
def test_thresholds_out_of_range(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HaltPolicy(**kwargs)


def test_actions_warn_stop_callable():
    rec = _step(5, 3.0)
    with pytest.warns(GradrouteWarning, match="max_adapter_norm"):
        out = HaltPolicy(max_adapter_norm=1.0, action="warn").evaluate(rec, [])
    assert [(v.rule, stop) for v, stop in out] == [("max_adapter_norm", False)]
    seen = []
    out = HaltPolicy(max_adapter_norm=1.0, action=lambda v, r: seen.append(v.value) or True).evaluate(rec, [])
    assert out[0][1] is True and seen == [3.0]
    combo = HaltPolicy(max_adapter_norm=1.0) | HaltPolicy(max_env_share=0.5)
    assert [r.name for r in combo.rules].count("nonfinite_update") == 1
    assert {r.name for r in combo.rules} >= {"max_adapter_norm", "max_env_share"}


def _plain_run(tmp_path, policy, steps=30):
    model, _ = tiny_lm("llama")
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(0))})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router = gr.GradientRouter(model, sub, optimizer=opt, envs=["a", "b"])
    monitor = gr.DriftMonitor(router, tmp_path, policy, config={"lr": 1e-2})
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randint(3, 100, (4, 8), generator=g)
        with router.attribution.batch(["a", "a", "b", "b"]):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        router.step()  # the monitor observes every step
        opt.zero_grad()
    return router, monitor


def test_plain_loop_logs_every_step_and_raises_drift_halt(tmp_path):
    router, monitor = _plain_run(tmp_path / "free", None, steps=12)
    df = gr.load_log(tmp_path / "free")
    assert df["step"].tolist() == list(range(1, 13))
    assert {"adapter_norm", "update_norm", "env_adapter_share.a", "env_share.b", "samples.a",
            "grad_norm.a", "activation_norm.a.1"} <= set(df.columns)
    header = df.attrs["header"]
    assert header["subspace_hash"] == router.subspace.content_hash and header["envs"] == ["a", "b"]
    assert header["config"] == {"lr": 0.01} and "torch" in header["versions"]
    norms = df["adapter_norm"].tolist()
    threshold = (norms[4] + norms[5]) / 2  # crossed at step 6
    with pytest.raises(DriftHalt) as e:
        _plain_run(tmp_path / "halt", HaltPolicy(max_adapter_norm=threshold))
    rec = e.value.record
    assert rec["step"] == 6 and rec["rule"] == "max_adapter_norm" and rec["value"] > threshold
    assert rec["top_envs"] and "Fix:" in str(e.value)
    written = read_records(tmp_path / "halt")
    assert written[-1]["type"] == "halt" and written[-2]["type"] == "crossing"
    assert max(r["step"] for r in written if r["type"] == "step") == 6


def test_metrics_are_flat_scalars(tmp_path):
    router, monitor = _plain_run(tmp_path, None, steps=2)
    m = monitor.metrics()
    assert m["gradroute/adapter_norm"] > 0 and "gradroute/env_adapter_share/a" in m
    assert all(isinstance(v, float) for v in m.values())


def test_last_clean_checkpoint(tmp_path):
    for n in (5, 10, 15):
        (tmp_path / f"checkpoint-{n}").mkdir()
    log = RunLog(tmp_path / "gradroute.jsonl")
    for s in range(1, 16):
        log.write(_rec(s))
    assert gr.last_clean_checkpoint(tmp_path) == tmp_path / "checkpoint-15"  # no crossing yet
    log.write({"type": "crossing", "step": 12, "rule": "max_adapter_norm"})
    log.close()
    assert gr.last_clean_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / "gradroute.jsonl").write_text(json.dumps({"type": "crossing", "step": 3}) + "\n")
    assert gr.last_clean_checkpoint(tmp_path) is None


def test_a_run_directory_can_be_moved_copied_and_read_from_anywhere(tmp_path, monkeypatch):
    import shutil

    from gradroute.monitor import DriftMonitor

    monkeypatch.chdir(tmp_path)
    router, monitor = _plain_run(tmp_path / "unused", None, steps=1)
    run = "runs/orig"  # relative to the training process's working directory, as TRL's output_dir usually is
    mon = DriftMonitor(router, run, None, attach=False)
    for n in (2, 4):
        (tmp_path / run / f"checkpoint-{n}").mkdir(parents=True)
        mon.on_checkpoint(n, f"{run}/checkpoint-{n}")
    mon._write({"type": "crossing", "step": 6, "rule": "max_adapter_norm"})
    mon.close()
    stored = [r["path"] for r in read_records(run) if r.get("type") == "checkpoint"]
    assert stored == ["checkpoint-2", "checkpoint-4"]  # relative to the run directory
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / run, copy)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert gr.last_clean_checkpoint("copy") == __import__("pathlib").Path("copy") / "checkpoint-4"
    monkeypatch.chdir("/")
    assert gr.last_clean_checkpoint(copy) == copy / "checkpoint-4"
    assert gr.last_clean_checkpoint(tmp_path / run) == tmp_path / run / "checkpoint-4"
    # logs written before paths were relative: cwd-relative or absolute paths into the original run
    for old in (f"{run}/checkpoint-4", str(tmp_path / run / "checkpoint-4")):
        legacy = tmp_path / "legacy"
        shutil.rmtree(legacy, ignore_errors=True)
        shutil.copytree(copy, legacy)
        recs = [json.loads(line) for line in (legacy / "gradroute.jsonl").read_text().splitlines()]
        for r in recs:
            if r.get("type") == "checkpoint":
                r["path"] = old.replace("checkpoint-4", f"checkpoint-{r['step']}")
        (legacy / "gradroute.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        assert gr.last_clean_checkpoint(legacy) == legacy / "checkpoint-4"


def test_report_reads_the_violations_typed_env_and_layer():
    from gradroute.report import fired_layer

    typed = {"type": "halt", "rule": "activation_z", "env": "arith", "layer": 3, "detail": "reworded prose"}
    assert fired_layer([typed]) == ("arith", "3")
    old_log = {"type": "crossing", "rule": "activation_z", "detail": "environment 'copy', layer 1"}
    assert fired_layer([old_log]) == ("copy", "1")  # logs written before violations carried their layer
    assert fired_layer([{"type": "halt", "rule": "max_adapter_norm", "detail": ""}]) is None


def test_halt_policy_from_a_config_mapping_or_text():
    """HaltPolicy.from_dict: the one schema that YAML configs and command lines (the recipe's
    --gradroute_policy) use; values get the keyword's type, mistakes name the key."""
    from gradroute.errors import ConfigError
    from gradroute.policy import ActivationDriftRule, EnvShareRule, NonFiniteRewardRule

    p = gr.HaltPolicy.from_dict("max_env_share=0.95, env_share_min_norm=0.05,action=warn")
    assert p.action == "warn" and isinstance(p.rules[0], EnvShareRule) and p.rules[0].max_share == 0.95
    q = gr.HaltPolicy.from_dict({"max_activation_z": "6", "baseline_steps": "10", "halt_on_nonfinite": "false",
                                 "max_nonfinite_rewards": 2})
    assert [type(r) for r in q.rules] == [ActivationDriftRule, NonFiniteRewardRule]
    assert q.rules[0].baseline_steps == 10 and isinstance(q.rules[0].baseline_steps, int)
    assert gr.HaltPolicy.from_dict(None) is None and gr.HaltPolicy.from_dict("") is None
    with pytest.raises(ConfigError, match="--pol: unknown keys \\['max_norm'\\]"):
        gr.HaltPolicy.from_dict("max_norm=3", what="--pol")
    with pytest.raises(ConfigError, match="not key=value"):
        gr.HaltPolicy.from_dict("max_env_share")
    with pytest.raises(ConfigError, match="give numbers"):
        gr.HaltPolicy.from_dict({"max_env_share": "high"})
