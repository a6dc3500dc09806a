"""The recipes run end to end on their tiny configs (routed, random control, un-routed baseline)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gradroute.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_subspace(tmp_path_factory):
    out = tmp_path_factory.mktemp("sub") / "tiny.subspace"
    assert cli(["subspace", "build", "--model", "tiny:llama", "--texts", str(ROOT / "recipes/data/probe_hack.jsonl"),
                "--layers", "2", "3", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("variant", [[], ["--control", "random"], ["--no_route", "true"]])
def test_grpo_routed_recipe(tmp_path, monkeypatch, tiny_subspace, variant):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    summary = _recipe("grpo_routed").main(["--config", "recipes/configs/grpo_tiny.yaml", "--output_dir", str(out),
                                           "--subspace", str(tiny_subspace), "--save_adapter", str(out / "adapter"),
                                           *variant])
    assert summary["steps"] == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    if variant[:1] == ["--no_route"]:
        assert summary["routed"] is False and not (out / "gradroute.jsonl").exists()
        return
    assert summary["control"] == ("random" if variant else "none")
    assert set(summary["env_adapter_share"]) <= {"arith", "copy", "hack", "_unattributed"}
    assert (out / "gradroute.jsonl").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "checkpoint-6" / "gradroute" / "router_state.safetensors").is_file()
