"""Every module imports on its own (no import loops), and the core does not import frameworks."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gradroute

MODULES = sorted(m.name for m in pkgutil.walk_packages(gradroute.__path__, "gradroute.")
                 if not m.name.endswith("__main__"))
FRAMEWORKS = ("transformers", "peft", "trl", "sae_lens", "datasets", "accelerate")
CORE = ("gradroute.projection", "gradroute.subspace", "gradroute.model", "gradroute.orientation",
        "gradroute.plan", "gradroute.router", "gradroute.attribution", "gradroute.monitor", "gradroute.policy",
        "gradroute.interventions", "gradroute.anchoring")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_each_module_imports_alone():
    # one interpreter per module would take minutes; a fresh interpreter that imports each module
    # after clearing gradroute from sys.modules catches loops just the same
    code = (
        "import importlib, sys\n"
        f"mods = {MODULES!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'gradroute' or k.startswith('gradroute.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", res.stdout
    assert len(MODULES) > 20


def test_core_modules_do_not_import_frameworks():
    code = (
        "import sys\n"
        f"import {', '.join(CORE)}\n"
        f"print(sorted(k for k in {FRAMEWORKS!r} if k in sys.modules))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
