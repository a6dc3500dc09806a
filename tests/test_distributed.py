"""Two-process gloo DDP (accelerate's debug launcher): attributions are all-reduced, adapters and
base weights stay identical on every rank, and only rank 0 writes the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "scripts" / "ddp_worker.py"


@pytest.mark.distributed
def test_two_process_ddp(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["max_diff"] == 0.0 and r1["max_diff"] == 0.0  # identical adapters, env adapters, weights
    # attributions were all-reduced: both ranks report the same global figures
    assert r0["samples"] == r1["samples"] and sum(r0["samples"].values()) == 8.0  # 2 ranks x 4 rows
    assert set(r0["samples"]) == {"math", "hack"}
    assert r0["env_share"] == pytest.approx(r1["env_share"])
    # one log, written once per step by rank 0
    records = [json.loads(x) for x in (tmp_path / "gradroute.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4]
