"""``import gradroute`` stays fast: no framework is imported until an integration is used."""

from __future__ import annotations

import subprocess
import sys


def test_import_gradroute_loads_no_framework():
    code = ("import sys, gradroute; import gradroute.projection, gradroute.errors; "
            "print(','.join(m for m in ('transformers', 'peft', 'trl', 'sae_lens', 'datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


def test_public_names_resolve():
    import gradroute as gr

    for name in ("Subspace", "GradientRouter", "HaltPolicy", "DriftMonitor", "attach", "attach_anchoring",
                 "load_log", "last_clean_checkpoint", "Anchoring", "Dopesheet", "Attribution", "DriftHalt"):
        assert getattr(gr, name) is not None
