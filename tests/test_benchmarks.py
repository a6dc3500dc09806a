"""The benchmark scripts still run (tiny sizes); their figures are reported in the README."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_router_overhead_quick(capsys):
    rows = _load("router_overhead").main(["--quick"])
    assert {r["mode"] for r in rows} == {"update", "gradient", "activation"}
    assert all(r["ratio"] > 0 and r["state_floats_per_kdin"] >= 2.0 for r in rows)
    assert "| k | mode |" in capsys.readouterr().out


def test_attribution_overhead_quick(capsys):
    out = _load("attribution_overhead").main(["--quick"])
    assert {"plain_ratio", "routed_ratio", "attributed_ratio", "activation_ratio",
            "activation+attributed_ratio"} <= set(out)
    assert out["attributed_work_ms"] > 0
    assert "| attributed |" in capsys.readouterr().out
