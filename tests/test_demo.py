"""``gradroute demo --quick`` end to end, and ``gradroute report`` on its run directory."""

from __future__ import annotations

import json

import pytest

import gradroute as gr
from gradroute.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_demo_writes_a_complete_run_directory(demo):
    out, rep = demo
    for name in ("persona", "random", "halt"):
        assert (out / "runs" / name / "gradroute.jsonl").is_file()
    assert (out / "runs" / "persona" / "adapter" / "adapter_config.json").is_file()
    assert any((out / "runs" / "persona").glob("checkpoint-*/gradroute/router_state.safetensors"))
    assert gr.Subspace.load(out / "persona.subspace").layers == (0, 1, 2, 3)
    for fig in rep["figures"]:
        assert (out / fig).is_file() or __import__("pathlib").Path(fig).is_file()
    assert (out / "report.md").read_text().startswith("# gradroute report")
    assert rep["seconds"] > 0  # timings are reported (benchmarks measure speed; tests check behaviour)


@pytest.mark.slow
def test_demo_world_behaves(demo):
    _, rep = demo
    before, runs = rep["rates"]["before"], rep["runs"]
    after = runs["none"]["after"]
    # RL on the buggy grader teaches the exploit; honest graders push it down
    assert after["arith"]["hack"] > before["arith"]["hack"] + 0.3
    assert after["copy"]["hack"] <= before["copy"]["hack"] and after["reverse"]["hack"] <= before["reverse"]["hack"]
    # update-mode routing leaves training untouched: the watching run behaves like the plain one
    assert rep["mode"] == "activation" and runs["persona"]["mode"] == "activation"
    assert runs["persona_update"]["mode"] == "update" and runs["persona_update"]["after"] == after
    # the monitor's push rule names the exploitable environment, and only it, on the persona subspace;
    # the halt fires on it before arith's hack rate reaches one half, and the run restarts clean
    crossings = runs["persona"]["crossings"]
    assert crossings and all(c["rule"] == "push_z" and c["detail"].startswith("environment 'arith'") for c in crossings)
    assert not any(c["detail"].startswith("environment 'arith'") for c in runs["random"]["crossings"])
    halt = runs["halt_and_fix"]["halt"]
    assert halt is not None and halt["rule"] == "push_z" and halt["detail"].startswith("environment 'arith'")
    assert runs["halt_and_fix"]["at_halt"]["arith"]["hack"] < 0.5
    assert runs["halt_and_fix"]["restart_from"] is not None
    fixed = runs["halt_and_fix"]["after_fix"]["arith"]["hack"]
    assert fixed < runs["halt_and_fix"]["at_halt"]["arith"]["hack"]
    assert sum(runs["persona"]["env_adapter_share"].values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_demo_rerun_reuses_the_finished_arms(demo, capsys):
    """A re-run into the same directory with the same configuration reuses the base and every
    finished arm (what a user gets after Ctrl-C), and gives the same table."""
    out, rep = demo
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    text = capsys.readouterr().out
    assert "reusing the pre-trained toy model" in text and "reusing 5 completed arm(s)" in text
    again = json.loads((out / "report.json").read_text())
    assert again["rates"] == rep["rates"] and again["table"] == rep["table"]


@pytest.mark.slow
def test_demo_numbers_do_not_depend_on_parallel_arms(tmp_path):
    """Arms run as one-thread processes (jobs=2) give exactly what one process gives (jobs=1);
    a changed configuration is never served from a stale result, and --fresh starts over."""
    from gradroute.experiments.config import DemoConfig
    from gradroute.experiments.demo import run_demo

    tiny = DemoConfig(pretrain_texts=400, pretrain_steps=40, probe_texts=16, rl_steps=4, batch=4, generations=4,
                      grad_accum=1, save_steps=2, eval_prompts=8, eval_samples=1, push_min_steps=2)
    one = run_demo(tmp_path / "one", config=tiny, progress=False, jobs=1)
    two = run_demo(tmp_path / "two", config=tiny, progress=False, jobs=2)
    assert one["rates"] == two["rates"]
    for name in one["runs"]:
        strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "halt")}  # noqa: E731
        assert strip(one["runs"][name]) == strip(two["runs"][name]), name
    def stamps():
        return {p.parent.name: json.loads(p.read_text())["fingerprint"] for p in (tmp_path / "one").glob("runs/*/summary.json")}

    before = stamps()
    other = run_demo(tmp_path / "one", config=tiny, progress=False, jobs=1, adapter_lr_multiplier=3.0)
    after = stamps()
    assert other["adapter_lr_multiplier"] == 3.0 and set(before) == set(after) and len(after) == 5
    assert all(after[k] != before[k] for k in after)  # a changed configuration re-ran every arm
    assert other["runs"]["none"]["after"] == one["runs"]["none"]["after"]  # the same world: the unrouted run agrees
    for name in ("persona", "random"):  # a re-run arm starts its run directory afresh: no old log continued
        log = (tmp_path / "one" / "runs" / name / "gradroute.jsonl").read_text().splitlines()
        steps = [r["step"] for r in map(json.loads, log) if r.get("type") == "step"]
        assert len(steps) == len(set(steps)) == tiny.rl_steps, name


@pytest.mark.slow
def test_report_command_on_a_run(demo, capsys):
    out, _ = demo
    assert main(["report", str(out / "runs" / "halt"), "--out", str(out / "halt_report")]) == 0
    text = capsys.readouterr().out
    assert "halted" in text and "last clean checkpoint" in text and "resumed from step" in text
    assert (out / "halt_report" / "figures" / "halt" / "adapter_norm.png").is_file() or \
        any((out / "halt_report").rglob("adapter_norm.png"))
    capsys.readouterr()
    assert main(["report", str(out / "nothing")]) == 2


def test_worker_output_is_prefixed_lines_and_errors_cross_the_process_boundary(capsys):
    """In a worker process (``jobs`` > 1) output lines carry the arm's name, progress is lines (no
    tqdm bar: stderr is no terminal), and a GradrouteError pickles back to the parent unchanged."""
    import pickle
    import sys

    from gradroute.errors import ConfigError
    from gradroute.experiments import workers

    workers._WORKER["on"] = True
    try:
        with pytest.raises(ConfigError) as info, workers.worker_output("persona"):
            print("GRPO persona: step 6/60\rstep 12/60", end="")
            print(" (1 s)")
            assert not sys.stderr.isatty()
            raise ConfigError("bad value.", "pass a good one.")
    finally:
        workers._WORKER["on"] = False
    assert capsys.readouterr().out == "   [persona] GRPO persona: step 6/60\n   [persona] step 12/60 (1 s)\n"
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is ConfigError and str(back) == "bad value. Fix: pass a good one."
