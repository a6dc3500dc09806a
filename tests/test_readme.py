"""Keep the README true: its blocks run, in order, in a scratch directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def _blocks():
    return [(lang, body) for lang, body in BLOCK.findall(README)]


def test_top_commands_are_the_makefile_targets_ci_runs():
    lang, body = _blocks()[0]
    cmds = [line.split("#")[0].strip() for line in body.splitlines() if line.strip()]
    assert cmds == ["make demo", "make test"]
    make = subprocess.run(["make", "-n", "demo", "test"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0
    assert "gradroute demo" in make.stdout and "pytest" in make.stdout
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.slow
def test_readme_blocks_run(tmp_path):
    bindir = Path(sys.executable).parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg", "HOME": str(tmp_path)}
    if os.environ.get("PYTHONPATH"):  # a checkout run without installing it
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # README commands run recipes by relative path
    for lang, body in _blocks()[1:]:
        if lang == "bash":
            for line in body.splitlines():
                cmd = line.split("  #")[0].strip()
                if not cmd or cmd.startswith(("make ", ".ci/", ". .venv/", "source .venv/")):
                    continue
                r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
                assert r.returncode == 0, f"README command failed: {cmd}\n{r.stdout}\n{r.stderr}"
        else:
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert r.returncode == 0, f"README python block failed:\n{body}\n{r.stderr}"

    # the examples show what they say, not just exit 0
    import gradroute as gr

    # "Watching an RL run": several steps, both environments' shares, 'bang' the top environment
    df = gr.load_log(tmp_path / "runs" / "grpo")
    assert df["step"].max() >= 3
    assert {"env_adapter_share.bang", "env_adapter_share.plain"} <= set(df.columns)
    assert df["env_adapter_share.plain"].notna().any() and (df["adapter_norm"] > 0).all()
    halts = [e for e in df.attrs["events"] if e["type"] == "halt"]
    if halts:
        assert halts[0]["step"] > 1 and halts[0]["top_envs"][0][0] == "bang"
        clean = gr.last_clean_checkpoint(tmp_path / "runs" / "grpo")
        assert clean is not None and clean.is_dir() and int(clean.name.rsplit("-", 1)[1]) < halts[0]["step"]
    # the report of that run went where it was told, with its figures linked
    text = (tmp_path / "grpo-report" / "report.md").read_text()
    assert "halted" in text or "no halt" in text
    assert "](figures/adapter_norm.png)" in text and (tmp_path / "grpo-report" / "figures" / "adapter_norm.png").is_file()
    assert not (tmp_path / "runs" / "grpo" / "report.md").exists()
    # the recipe block learns: a non-zero adapter built by the environments, not "_unattributed"
    summary = json.loads((tmp_path / "runs" / "grpo_tiny" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["adapter_norm"] > 0  # 6 steps, resumed to 8 by the TRL section
    assert sum(abs(v) for e, v in summary["env_adapter_share"].items() if e != "_unattributed") > 0.5
    # "The seed's three claims": the quick run has every arm; the template world ran the arms it was given
    quick = json.loads((tmp_path / "runs" / "claims-quick" / "report.json").read_text())
    assert set(quick["seeds"]["0"]["arms"]) == {"unrouted", "update", "activation", "random", "ablation", "penalty",
                                                "steering"}
    assert "## Targets" in (tmp_path / "runs" / "claims-quick" / "summary.md").read_text()
    mine = json.loads((tmp_path / "runs" / "claims-mine" / "report.json").read_text())
    assert mine["world"] == "my-world" and set(mine["seeds"]["1"]["arms"]) == {"unrouted", "activation", "ablation"}
