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
    # the monitor sees the exploitable environment drift, the halt fires and the run restarts clean
    # (in --quick the first crossing can be an honest environment's: copy, layer 1)
    assert any(c["detail"].startswith("environment 'arith'") for c in runs["persona_update"]["crossings"])
    halt = runs["halt_and_fix"]["halt"]
    # the stop fires on the activation rule; which environment crosses first in the short --quick
    # run is machine-dependent (here: copy, layer 1, z 6.37 > 6 at step 18, also on the landed
    # a3dda3e); the full demo halts on arith (README)
    assert halt is not None and halt["rule"] == "activation_z"
    assert runs["halt_and_fix"]["restart_from"] is not None
    fixed = runs["halt_and_fix"]["after_fix"]["arith"]["hack"]
    assert fixed < runs["halt_and_fix"]["at_halt"]["arith"]["hack"]
    assert sum(runs["persona"]["env_adapter_share"].values()) == pytest.approx(1.0, abs=1e-6)


def test_report_command_on_a_run(demo, capsys):
    out, _ = demo
    assert main(["report", str(out / "runs" / "halt"), "--out", str(out / "halt_report")]) == 0
    text = capsys.readouterr().out
    assert "halted" in text and "last clean checkpoint" in text and "resumed from step" in text
    assert (out / "halt_report" / "figures" / "halt" / "adapter_norm.png").is_file() or \
        any((out / "halt_report").rglob("adapter_norm.png"))
    capsys.readouterr()
    assert main(["report", str(out / "nothing")]) == 2
