"""Dopesheet schedules: parsing, relative steps, interpolation, LR driving, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from gradroute.anchoring import Dopesheet, min_jerk
from gradroute.errors import ScheduleError

ISOLATED = """STEP,PHASE,ACTION,lr:log,separate,anchor,anti-anchor,anti-subspace
0,warm-up,,1e-8,,0,0,0.25
+10,,ramp,0.01,,,,
248,shape,,,0.01,0.1,0.05,
750,anchor,,0.1,0.001,0.1,,0.003
1425,settle,,0.1,0,0,0,0
1500,,,0.05,,,,
"""


def test_parses_the_isolated_configuration():
    sheet = Dopesheet.from_csv(ISOLATED)
    assert sheet.properties == ["lr", "separate", "anchor", "anti-anchor", "anti-subspace"]
    assert sheet.value("lr", 0) == pytest.approx(1e-8)
    assert sheet.value("lr", 10) == pytest.approx(0.01)            # +10 after step 0
    assert sheet.value("lr", 750) == pytest.approx(0.1)
    assert sheet.value("lr", 1500) == pytest.approx(0.05) == sheet.value("lr", 5000)
    assert sheet.value("separate", 0) == pytest.approx(0.01)       # no key at 0: holds its first value
    assert sheet.value("anchor", 248) == pytest.approx(0.1) and sheet.value("anchor", 1425) == 0
    assert sheet.value("anti-subspace", 750) == pytest.approx(0.003)
    assert sheet.phase_at(300) == "shape" and sheet.phase_at(0) == "warm-up"
    # log-space min-jerk halfway between 0.01 (step 10) and 0.1 (step 750): the geometric mean
    mid = (10 + 750) / 2
    assert sheet.value("lr", mid) == pytest.approx(math.sqrt(0.01 * 0.1), rel=1e-9)


def test_interpolations_and_fractional_steps():
    sheet = Dopesheet.from_csv("""STEP,PHASE,ACTION,a:lin:minjerk,b:lin:linear,c:lin:step
0,,,0,0,0
+0.25,,,,,5
100,,,1,1,10
""")
    assert sheet.value("c", 24.9) == 0 and sheet.value("c", 25) == 5   # +0.25 of the way to 100
    assert sheet.value("b", 30) == pytest.approx(0.3)
    assert sheet.value("a", 30) == pytest.approx(min_jerk(0.3))
    assert min_jerk(0) == 0 and min_jerk(1) == 1 and min_jerk(0.5) == pytest.approx(0.5)
    # minimum jerk starts and ends at rest
    eps = 1e-4
    assert (min_jerk(eps) - min_jerk(0)) / eps < 1e-6 and (min_jerk(1) - min_jerk(1 - eps)) / eps < 1e-6


def test_python_form_and_lr_scheduler():
    sheet = Dopesheet.from_rows([{"STEP": 0, "lr": 1e-3}, {"STEP": 10, "lr": 1e-2}], spaces={"lr": "log"},
                                interps={"lr": "linear"})
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = sheet.scheduler(opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3) and seen[10] == pytest.approx(1e-2) and seen[5] == pytest.approx(10 ** -2.5)
    assert sheet.lr_lambda(base_lr=0.5)(10) == pytest.approx(0.02)


def test_plot_timeline(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    ax = Dopesheet.from_csv(ISOLATED).plot()
    ax.figure.savefig(tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 1000


def test_plot_shows_coinciding_curves():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # anchor and subspace share one shape (the colour study's anchored sheet): both must stay visible
    sheet = Dopesheet.from_csv("STEP,PHASE,ACTION,lr,anchor,subspace\n0,,,1e-3,0.01,0.02\n750,,,0.1,0.1,0.2\n"
                               "1500,,,0.05,0,0\n")
    ax = sheet.plot()
    lines = {ln.get_label().split(" ")[0]: ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[2] == "subspace (max 0.2), same curve as anchor" and labels[1] == "anchor (max 0.1)"
    assert labels[0] == "lr (max 0.1)"  # a different curve keeps its plain label and style
    under, over = lines["anchor"], lines["subspace"]
    assert (under.get_ydata() == over.get_ydata()).all()  # the same curve...
    assert over.get_linestyle() == "--" and over.get_marker() == "o"  # ...drawn dashed with markers
    assert under.get_linestyle() == "-" and under.get_linewidth() > over.get_linewidth()  # over a wider line
    assert over.get_zorder() > under.get_zorder()
    assert lines["lr"].get_linestyle() == "-" and lines["lr"].get_marker() in ("None", "", None)
    plt.close(ax.figure)


@pytest.mark.parametrize("text,match", [
    ("STEP,PHASE,ACTION,a\n10,,,1\n5,,,2\n", "unsorted"),
    ("STEP,PHASE,ACTION,a\n10,,,1\n10,,,2\n", "duplicate"),
    ("STEP,PHASE,ACTION,a:lin:cubic\n0,,,1\n", "unknown interpolation"),
    ("STEP,PHASE,ACTION,a:exp\n0,,,1\n", "unknown space"),
    ("STEP,PHASE,ACTION,a\n0,,,high\n", "not a number"),
    ("STEP,PHASE,ACTION,a\nnext,,,1\n", "not a number"),
    ("STEP,PHASE,ACTION,a:log\n0,,,0\n", "positive"),
    ("STEP,PHASE,ACTION,a\n+0.5,,,1\n", "absolute rows"),
    ("STEPS,PHASE,ACTION,a\n0,,,1\n", "header"),
    ("STEP,PHASE,ACTION,a,b\n0,,,1,\n", "no keyframes"),
])
def test_bad_dopesheets(text, match):
    with pytest.raises(ScheduleError, match=match):
        Dopesheet.from_csv(text)


def test_unknown_property():
    with pytest.raises(ScheduleError, match="no property 'lr2'"):
        Dopesheet.from_csv(ISOLATED).value("lr2", 3)
