"""The recipes run end to end on their tiny configs (routed, random control, un-routed baseline)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("variant", [[], ["--gradroute_control", "random"], ["--gradroute_no_route", "true"]])
def test_grpo_routed_recipe(tmp_path, monkeypatch, tiny_subspace, variant):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    summary = _recipe("grpo_routed").main(["--config", "recipes/configs/grpo_tiny.yaml", "--output_dir", str(out),
                                           "--gradroute_subspace", str(tiny_subspace),
                                           "--gradroute_save_adapter", str(out / "adapter"), *variant])
    assert summary["steps"] == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    if variant[:1] == ["--gradroute_no_route"]:
        assert summary["routed"] is False and not (out / "gradroute.jsonl").exists()
        return
    assert summary["control"] == ("random" if variant else "none")
    assert set(summary["env_adapter_share"]) <= {"arith", "copy", "hack", "_unattributed"}
    assert (out / "gradroute.jsonl").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "checkpoint-6" / "gradroute" / "router_state.safetensors").is_file()
    assert (out / "model.safetensors").is_file()  # save_model, as TRL's grpo.py does


def _args(out, sub, *extra):
    return ["--config", "recipes/configs/grpo_tiny.yaml", "--output_dir", str(out), "--gradroute_subspace", str(sub),
            *extra]


def test_recipe_resumes_without_duplicate_steps_and_refuses_to_mix_runs(tmp_path, monkeypatch, tiny_subspace):
    from gradroute.errors import ConfigError
    from gradroute.monitor import load_log

    monkeypatch.chdir(ROOT)
    recipe = _recipe("grpo_routed")
    out = tmp_path / "run"
    assert recipe.main(_args(out, tiny_subspace, "--max_steps", "3"))["steps"] == 3
    # a fresh run into the same directory would mix two runs: refused, nothing written
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="not empty") as e:
        recipe.main(_args(out, tiny_subspace))
    assert "Fix:" in str(e.value) and sorted(p.name for p in out.iterdir()) == before
    # resuming continues training, router state and log
    summary = recipe.main(_args(out, tiny_subspace, "--resume_from_checkpoint", str(out / "checkpoint-3")))
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-3")
    df = load_log(out)
    assert df["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert [e["from_step"] for e in df.attrs["events"] if e["type"] == "resume"] == [3]
    # "last" resumes from the newest checkpoint (checkpoint-6)
    summary = recipe.main(_args(out, tiny_subspace, "--resume_from_checkpoint", "last", "--max_steps", "7"))
    assert summary["steps"] == 7 and summary["resumed_from"] == "checkpoint-6"  # the path, relative to the run
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == "checkpoint-6"
    assert load_log(out)["step"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    # rotate: the old run is moved aside whole, the new one starts clean
    summary = recipe.main(_args(out, tiny_subspace, "--max_steps", "2", "--gradroute_existing_output", "rotate"))
    assert summary["rotated_to"] == str(tmp_path / "run.1")
    assert load_log(out)["step"].tolist() == [1, 2]
    assert load_log(tmp_path / "run.1")["step"].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_recipe_accepts_trl_flags(tmp_path, monkeypatch, tiny_subspace):
    """TRL's own spellings: --use_peft (a LoRA policy), --dtype, --reward_funcs (dotted path)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "peft"
    summary = _recipe("grpo_routed").main(_args(
        out, tiny_subspace, "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--dtype", "float32",
        "--lora_target_modules", "q_proj", "v_proj", "o_proj", "down_proj",  # the routed writers carry LoRA
        "--reward_funcs", "recipes.rewards.exact_answer", "--max_steps", "2",
        "--gradroute_policy", "max_adapter_norm=100,action=warn", "--gradroute_adapter_base", "none"))
    assert summary["steps"] == 2 and summary["peft"] is True and summary["routed"] is True
    assert (out / "adapter_config.json").is_file()  # TRL's save_model wrote the policy's own LoRA
    # (whether routing sees the LoRA's update is the router's business, tested there)
    assert load_log_steps(out) == [1, 2]


def test_policy_flag_errors():
    from gradroute.errors import ConfigError

    recipe = _recipe("grpo_routed")
    policy = recipe.parse_policy("max_env_share=0.9, env_share_min_norm=0.05,action=warn")
    assert policy.action == "warn" and len(policy.rules) == 2  # + the non-finite rule
    assert recipe.parse_policy({"max_adapter_norm": 3}).rules
    assert recipe.parse_policy(None) is None
    with pytest.raises(ConfigError, match="unknown keys"):
        recipe.parse_policy("max_norm=3")
    with pytest.raises(ConfigError, match="not key=value"):
        recipe.parse_policy("max_env_share")


def load_log_steps(run_dir):
    from gradroute.monitor import load_log

    return load_log(run_dir)["step"].tolist()
