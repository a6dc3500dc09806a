"""``gradroute.report`` on a synthetic run log: what a researcher reads, and that reading a run
never writes into it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import gradroute.report as rp
from gradroute.monitor import RunLog

ENVS = ("arith", "copy")


def _step(n: int, drift: float = 0.0) -> dict:
    return {"type": "step", "step": n, "adapter_norm": 0.01 * n, "update_norm": 0.01,
            "adapter_norm_per_layer": {"2": 0.006 * n, "3": 0.008 * n},
            "env_adapter_share": {"arith": 0.6, "copy": 0.4},
            "env_adapter_norm": {"arith": 0.006 * n, "copy": 0.004 * n},
            "activation": {e: {"2": [0.1 + (drift if e == "arith" else 0.0) + 0.01 * (n % 3)],
                               "3": [0.2 + 0.01 * (n % 2)]} for e in ENVS}}


def _write_run(run: Path, halt: bool = True, checkpoints: bool = True) -> Path:
    log = RunLog(run / "gradroute.jsonl")
    log.write({"type": "header", "mode": "update", "subspace_hash": "abc123",
               "policy": {"action": "stop", "rules": [{"rule": "activation_z", "max_z": 6.0, "baseline_steps": 4},
                                                      {"rule": "max_env_share", "max_share": 0.9, "min_norm": 0.0}]}})
    for n in range(1, 9):
        log.write(_step(n, drift=0.5 if (halt and n >= 7) else 0.0))
        if checkpoints and n % 2 == 0:
            (run / f"checkpoint-{n}").mkdir(parents=True, exist_ok=True)
            log.write({"type": "checkpoint", "step": n, "path": f"checkpoint-{n}"})
    if halt:
        for n in (7, 8):
            log.write({"type": "crossing", "rule": "activation_z", "value": 9.123456, "threshold": 6.0, "step": n,
                       "top_envs": [["arith", 9.12], ["copy", 0.4]], "detail": f"environment 'arith', layer {n - 5}"})
        log.write({"type": "halt", "rule": "activation_z", "value": 9.123456, "threshold": 6.0, "step": 8,
                   "top_envs": [["arith", 9.12]], "detail": "environment 'arith', layer 2", "checkpoint": "checkpoint-8"})
        log.write({"type": "resume", "from_step": 6})
        for n in range(7, 13):
            log.write(_step(n, drift=0.3))
            if n in (9, 10, 11):
                log.write({"type": "crossing", "rule": "activation_z", "value": 7.0, "threshold": 6.0, "step": n,
                           "top_envs": [["arith", 7.0]], "detail": f"environment 'arith', layer {2 + n % 2}"})
    log.close()
    return run


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_report_reads_the_run_and_writes_elsewhere(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "runs" / "halted")
    before = _tree(run)
    monkeypatch.chdir(tmp_path)
    text = rp.report(run)
    assert _tree(run) == before  # analysing a run never writes into it unless asked
    out = tmp_path / "halted-report"
    assert (out / "report.md").read_text() == text
    figs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figs and sorted(links) == figs  # every figure is linked, relative to the report
    # numbers: one rule, no raw Python lists or None
    assert "9.12 > 6" in text and "9.123" not in text
    assert "[[" not in text and "None" not in text
    assert "**halted** at step 8 (the attempt that was restarted)" in text and "`checkpoint-8`" in text
    assert "last clean checkpoint (newest saved before the first crossing): `checkpoint-6`" in text
    # why the rule keeps firing after the restart is said
    assert "threshold crossings after the restart: 3" in text and "first 4 steps" in text
    # asked: into the run
    rp.report(run, out=run)
    assert (run / "report.md").is_file() and (run / "figures" / "adapter_norm.png").is_file()


def test_a_run_without_halt_or_checkpoints_says_so(tmp_path):
    calm = _write_run(tmp_path / "calm", halt=False, checkpoints=False)
    text = rp.report(calm, out=tmp_path / "r")
    assert "no halt: no threshold was crossed" in text
    assert "last clean checkpoint: none (this run saved no checkpoints)" in text and "None" not in text


def test_figures_have_labels_legends_and_the_layer_that_fired(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "halted")
    seen = []
    real = rp.save_figure
    monkeypatch.setattr(rp, "save_figure", lambda fig, path: (seen.append((fig, path.name)), real(fig, path))[1])
    rp.figures(run, tmp_path / "figs")
    assert {n for _, n in seen} == {"adapter_norm.png", "layer_heatmap.png", "env_share.png", "activation.png"}
    for fig, name in seen:
        main = fig.axes[0]
        assert main.get_xlabel() and main.get_ylabel() and main.get_title(), name
        if name == "layer_heatmap.png":
            assert fig.axes[1].get_ylabel(), "the colour bar is labelled"
            continue
        labels = [t.get_text() for t in main.get_legend().get_texts()]
        assert {"halt (attempt that was restarted)", "restart from checkpoint"} <= set(labels), name
        if name == "activation.png":
            assert any("layer 2" in lab for lab in labels)  # the halt fired on layer 2
            assert all("layer 3" not in lab for lab in labels)
    # superseded crossings are not drawn: one crossing marker (the current trajectory's first), one halt
    events = rp.load_log(run).attrs["events"]
    drawn = rp.figure_events(events)
    assert [s for s, _ in drawn if s != "checkpoint"] == ["crossing", "halt_superseded", "resume"]
    assert dict(drawn)["crossing"] == 9
    assert rp.fired_layer(events) == ("arith", "2")


@pytest.mark.parametrize("x, text", [(0.2401, "0.240"), (123.4, "123"), (1.5, "1.50"), (6.0, "6"), (9.123456, "9.12"), (3, "3"),
                                     (0.000123456, "0.000123"), (12345.6, "12,346"), (None, "–")])
def test_one_number_format(x, text):
    assert rp.num(x) == text


def test_a_copied_run_reports_its_own_checkpoints(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "orig")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    monkeypatch.chdir("/")
    s = rp.summary(copy)
    assert s["last_clean_checkpoint"] == "checkpoint-6" and s["halt"]["checkpoint"] == "checkpoint-8"


def test_a_crossing_on_the_halt_step_is_drawn_beside_it_and_named():
    plt = rp.pyplot()
    events = [{"type": "checkpoint", "step": 4}, {"type": "crossing", "step": 8, "rule": "max_env_share"},
              {"type": "halt", "step": 8, "rule": "max_env_share"}, {"type": "checkpoint", "step": 8}]
    fig, ax = plt.subplots()
    ax.plot([0, 10], [0, 1])
    labels = [h.get_label() for h in rp.mark_events(ax, events)]
    assert labels == ["first threshold crossing = halt (step 8)", "halt", "checkpoint"]
    fig.canvas.draw()
    at = {ln.get_color(): ln.get_transform().transform((8, 0.5))[0] for ln in ax.lines[1:]
          if ln.get_xdata()[0] == 8}
    crossing, halt, checkpoint = (at[rp.EVENT_STYLE[k]["color"]] for k in ("crossing", "halt", "checkpoint"))
    gap = rp.SAME_STEP_SPREAD * fig.dpi / 72  # points -> pixels
    assert halt - crossing == pytest.approx(gap, rel=0.01)  # side by side, neither hides the other
    assert crossing < checkpoint < halt  # centred on step 8; the checkpoint stays at the step itself
    styles = {ln.get_color(): ln.get_linestyle() for ln in ax.lines[1:]}
    assert styles[rp.EVENT_STYLE["crossing"]["color"]] != styles[rp.EVENT_STYLE["halt"]["color"]]
    plt.close(fig)
    # apart, each marker sits on its own step with its plain label
    fig, ax = plt.subplots()
    labels = [h.get_label() for h in rp.mark_events(ax, [{"type": "crossing", "step": 5}, {"type": "halt", "step": 8}])]
    assert labels == ["first threshold crossing", "halt"]
    fig.canvas.draw()
    assert [ln.get_transform().transform((ln.get_xdata()[0], 0))[0] for ln in ax.lines] == \
           [ax.transData.transform((x, 0))[0] for x in (5, 8)]
    plt.close(fig)
