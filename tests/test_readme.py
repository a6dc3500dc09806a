"""Keep the README true: its blocks run, in order, in a scratch directory."""

from __future__ import annotations

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
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # README commands run recipes by relative path
    for lang, body in _blocks()[1:]:
        if lang == "bash":
            for line in body.splitlines():
                cmd = line.split("  #")[0].strip()
                if not cmd or cmd.startswith("make ") or cmd.startswith(".ci/"):
                    continue
                r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
                assert r.returncode == 0, f"README command failed: {cmd}\n{r.stdout}\n{r.stderr}"
        else:
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert r.returncode == 0, f"README python block failed:\n{body}\n{r.stderr}"
