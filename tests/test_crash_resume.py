"""SIGKILL mid-run, resume from the last checkpoint: the log and the adapter are consistent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradroute as gr
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def _run(out, *extra, wait=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), str(out), *extra]
    if wait:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return None
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_then_resume_gives_a_consistent_log_and_adapter(tmp_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    proc = _run(crashed, "--hang-at", "5", wait=False)
    give_up = time.time() + 1800  # a guard against a hung subprocess, not a speed check
    while not (crashed / "hanging").exists():
        assert proc.poll() is None, "the run ended before reaching the hang point"
        if time.time() > give_up:
            proc.kill()
            pytest.fail("the run neither reached the hang point nor ended in 30 minutes (hung?)")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the log reached step 5; the newest checkpoint is 3
    before = gr.load_log(crashed)
    assert before["step"].max() == 5 and (crashed / "checkpoint-3").is_dir() and not (crashed / "checkpoint-6").exists()
    _run(crashed, "--resume", str(crashed / "checkpoint-3"))
    _run(clean)
    a, b = gr.load_log(crashed), gr.load_log(clean)
    assert a["step"].tolist() == list(range(1, 9))  # no gaps, no duplicates
    for col in ("adapter_norm", "update_norm", "env_adapter_share.math", "env_adapter_share.hack"):
        assert a[col].tolist() == pytest.approx(b[col].tolist(), rel=1e-5, abs=1e-8), col
    assert [e["type"] for e in a.attrs["events"]].count("resume") == 1
    # the final adapter (and its per-environment parts) equals the uninterrupted run's
    ra = gr.GradientRouter.from_state(AutoModelForCausalLM.from_pretrained(crashed / "checkpoint-8"),
                                      crashed / "checkpoint-8" / "gradroute")
    rb = gr.GradientRouter.from_state(AutoModelForCausalLM.from_pretrained(clean / "checkpoint-8"),
                                      clean / "checkpoint-8" / "gradroute")
    assert ra.steps == rb.steps == 8 and ra.envs == rb.envs
    for m in ra.plan.modules:
        assert torch.allclose(ra.adapter_coords(m), rb.adapter_coords(m), atol=1e-6)
        for e in ra.envs:
            assert torch.allclose(ra.adapter_coords(m, e), rb.adapter_coords(m, e), atol=1e-6)
