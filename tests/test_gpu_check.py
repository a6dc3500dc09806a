"""benchmarks/gpu_check.py: the CPU smoke run passes every mode's invariants, and the scale
estimates behind docs/scale.md keep their hand-checked figures."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cpu_smoke_run_passes_every_invariant():
    """The smallest settings: real widths (hidden 896, MLP 4864), 2 blocks, a 2048-token vocabulary,
    one timed step per variant (~10 s of CPU; ~20 s wall on a loaded machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--layers", "2", "--vocab", "2048", "--batch", "1", "--seq", "16",
         "--warmup", "0", "--steps", "1"],
        check=False, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for mode in ("plain", "update", "gradient", "activation"):
        assert any(line.startswith(f"| {mode} |") for line in rows), (mode, out[-2000:])
    for mode in ("update", "gradient", "activation"):
        row = next(line for line in rows if line.startswith(f"| {mode} |"))
        assert row.rstrip().endswith("| ok |"), row
        assert f"[ok] {mode}: " in out
    assert "[FAIL]" not in out and "0 invariant(s) failed" in out


def test_scale_estimates_match_the_hand_checked_figures():
    """Parameter counts of the Llama-2 shapes, the cumulative span rank of activation mode, and
    the per-step figures quoted in docs/scale.md."""
    g = _load()
    r7 = g.scale_row("7B", 64, "all")
    assert r7["N"] == 6_738_415_616                  # Llama-2-7B
    assert g.scale_row("70B", 8, "one")["N"] == 68_976_648_192   # Llama-2-70B
    assert r7["max_rank"] == 2048 and g.scale_row("70B", 64, "all")["max_rank"] == 5120
    assert g.scale_row("7B", 8, "one")["max_rank"] == 8 and g.scale_row("7B", 8, "one")["blocks"] == 17
    # update mode: one float64 read Uᵀ W per routed writer = 2·k·d·(d + f) FLOPs per block
    assert r7["modes"]["update"]["flop"] == 2 * 32 * 64 * 4096 * (4096 + 11008)
    # gradient mode: five passes (split 2, set_coords 2, re-read 1)
    assert r7["modes"]["gradient"]["flop"] == 5 * r7["modes"]["update"]["flop"]
    # FSDP2: an all-reduce of k·d_in float64 per writer, 2(R-1)/R of it sent per rank
    assert r7["modes"]["update"]["comm"] == pytest.approx(2 * 7 / 8 * 8 * 32 * 64 * (4096 + 11008))
    assert r7["plain_comm"] == pytest.approx(7 / 8 * 8 * 6_738_415_616)
    # what docs/scale.md quotes (rounded there)
    assert r7["modes"]["activation"]["ratio"] == pytest.approx(0.61, abs=0.01)
    assert g.scale_row("70B", 64, "all")["modes"]["activation"]["state"] / 1e9 == pytest.approx(354, abs=1)
    assert g.main(["--scale"]) == 0
