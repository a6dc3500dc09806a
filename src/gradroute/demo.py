"""The embedded end-to-end example behind ``gradroute demo``.

Stage 1 (this version): a tiny local causal LM, synthetic "honest" vs "hacker" persona texts,
a persona subspace fitted with the toolkit's own probe, and its matched-rank random control,
written to a run directory. Later stages add RL with routing, monitoring and discarding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def persona_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Paired texts: an honest persona solving sums, a hacker persona gaming the grader."""
    from .testing import probe_rows

    rows = probe_rows(n, seed)
    return [r["text"] for r in rows if r["label"] == 0], [r["text"] for r in rows if r["label"] == 1]


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0) -> dict[str, Any]:
    import torch

    from .subspace import Subspace
    from .testing import tiny_lm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, tok = tiny_lm("llama", seed=seed)
    honest, hacker = persona_texts(32 if quick else 128, seed)
    layers = [1, 2]
    sub = Subspace.from_probe(model, tok, hacker, honest, layers=layers, progress=not quick)
    ctl = sub.random_like(seed=seed)
    sub.save(out / "persona.subspace")
    ctl.save(out / "random.subspace")
    diag = sub.provenance.extra["diagnostics"]
    rows = [f"{'layer':>5}  {'probe acc':>9}  {'cohen d':>8}  {'overlap w/ random':>17}"]
    overlap = sub.overlap(ctl)
    for L in layers:
        d = diag[str(L)]
        rows.append(f"{L:>5}  {d['accuracy']:>9.3f}  {d['cohens_d']:>8.2f}  {overlap[L]:>17.4f}")
    summary = {
        "subspace": str(out / "persona.subspace"),
        "control": str(out / "random.subspace"),
        "layers": {str(L): {**diag[str(L)], "overlap_with_random": overlap[L]} for L in layers},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    summary["table"] = "\n".join(rows)
    return summary
