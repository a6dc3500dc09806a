"""Run reports: figures and a markdown summary from a run directory's log.

``gradroute report RUN_DIR`` works on any directory holding a ``gradroute.jsonl`` (a demo run,
a recipe's output_dir, a notebook's run), or on a directory of such runs (``RUN_DIR/runs/*``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .monitor import LOG_NAME, last_clean_checkpoint, load_log, read_records


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def _columns(df, prefix: str) -> dict[str, str]:
    return {c[len(prefix):]: c for c in df.columns if c.startswith(prefix)}


def _mark_events(ax, events: list[dict[str, Any]]) -> None:
    first = True
    for e in events:
        if e["type"] == "crossing" and first:
            ax.axvline(e["step"], color="tab:orange", ls="--", lw=0.8)
            first = False
        elif e["type"] == "halt":
            ax.axvline(e["step"], color="tab:red", lw=1.5)
        elif e["type"] == "checkpoint":
            ax.axvline(e["step"], color="0.85", lw=0.6, zorder=0)
        elif e["type"] == "resume":
            ax.axvline(e["from_step"], color="tab:green", ls=":", lw=1.2)


def figures(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> list[Path]:
    """Write the run's figures (PNG) and return their paths."""
    plt = _plt()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    df = load_log(run_dir)
    if df.empty:
        return []
    events = df.attrs["events"]
    name = title or run_dir.name
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(df["step"], df["adapter_norm"], color="k", lw=2, label="adapter (total)")
    for env, col in _columns(df, "env_adapter_norm.").items():
        ax.plot(df["step"], df[col], label=env)
    _mark_events(ax, events)
    ax.set(xlabel="step", ylabel="‖adapter‖", title=f"{name}: adapter norm per environment")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "adapter_norm.png"))

    layers = _columns(df, "adapter_norm_per_layer.")
    if layers:
        import numpy as np

        keys = sorted(layers, key=lambda k: (not k.lstrip("-").isdigit(), int(k) if k.lstrip("-").isdigit() else 0, k))
        mat = np.array([df[layers[k]].to_numpy(dtype=float) for k in keys])
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(keys)))
        im = ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis",
                       extent=(df["step"].min() - 0.5, df["step"].max() + 0.5, -0.5, len(keys) - 0.5))
        ax.set_yticks(range(len(keys)), [f"layer {k}" for k in keys])
        ax.set(xlabel="step", title=f"{name}: adapter norm per layer")
        fig.colorbar(im, ax=ax)
        paths.append(save_figure(fig, out / "layer_heatmap.png"))

    shares = _columns(df, "env_adapter_share.")
    if shares:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for env, col in shares.items():
            ax.plot(df["step"], df[col], label=env)
        _mark_events(ax, events)
        ax.axhline(0, color="0.7", lw=0.5)
        ax.set(xlabel="step", ylabel="⟨A_e, A⟩ / ‖A‖²", title=f"{name}: who built the adapter")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / "env_share.png"))

    acts = [c for c in df.columns if c.startswith("activation.") and not c.startswith("activation_norm")]
    if acts:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        best: dict[str, tuple[float, str]] = {}  # per environment, the layer whose projection moved most
        for col in acts:
            series = df[col].dropna()
            if series.empty or not isinstance(series.iloc[0], list | tuple):
                continue
            vals = [v[0] for v in series]
            k = max(3, len(vals) // 10)
            move = abs(sum(vals[-k:]) / k - sum(vals[:k]) / k)
            env = col.split(".")[1]
            if env not in best or move > best[env][0]:
                best[env] = (move, col)
        for env, (_, col) in sorted(best.items()):
            series = df[col].dropna()
            ax.plot(df.loc[series.index, "step"], [v[0] for v in series], label=f"{env} (layer {col.split('.')[2]})")
        _mark_events(ax, events)
        ax.set(xlabel="step", ylabel="mean uᵀh", title=f"{name}: activation projection (layer that moved most)")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / "activation.png"))
    return paths


def summary(run_dir: str | Path) -> dict[str, Any]:
    """The facts of a run: steps, adapter, environments, crossings, halt, clean checkpoint."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    df = load_log(run_dir)
    last = df.iloc[-1].to_dict() if not df.empty else {}
    events = df.attrs["events"]
    crossings = [r for r in records if r.get("type") == "crossing"]
    current = [r for r in crossings if not r.get("superseded")]
    halts = [r for r in records if r.get("type") == "halt"]
    clean = last_clean_checkpoint(run_dir)
    return {
        "run_dir": str(run_dir),
        "steps": int(df["step"].max()) if not df.empty else 0,
        "adapter_norm": float(last.get("adapter_norm", 0.0)) if last else 0.0,
        "env_adapter_share": {k[len("env_adapter_share."):]: float(v) for k, v in last.items()
                              if k.startswith("env_adapter_share.") and not _nan(v)},
        "env_adapter_norm": {k[len("env_adapter_norm."):]: float(v) for k, v in last.items()
                             if k.startswith("env_adapter_norm.") and not _nan(v)},
        "first_crossing": crossings[0] if crossings else None,
        "crossings_after_restart": len(current) if any(r.get("superseded") for r in crossings) else None,
        "halt": halts[-1] if halts else None,
        "resumes": [e for e in events if e["type"] == "resume"],
        "checkpoints": [e["step"] for e in events if e["type"] == "checkpoint"],
        "last_clean_checkpoint": str(clean) if clean else None,
        "subspace_hash": df.attrs["header"].get("subspace_hash"),
        "mode": df.attrs["header"].get("mode"),
    }


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def markdown(s: dict[str, Any], figs: list[Path] | None = None, base: Path | None = None) -> str:
    lines = [f"## Run `{Path(s['run_dir']).name}`", "",
             f"- steps: {s['steps']}, mode: {s['mode']}, subspace: `{str(s['subspace_hash'])[:12]}`",
             f"- adapter norm: {s['adapter_norm']:.4g}"]
    if s["env_adapter_share"]:
        shares = ", ".join(f"{e} {v:.2f}" for e, v in sorted(s["env_adapter_share"].items(), key=lambda x: -x[1]))
        lines.append(f"- who built the adapter (⟨A_e, A⟩/‖A‖²): {shares}")
    c = s["first_crossing"]
    if c:
        lines.append(f"- first threshold crossing: step {c['step']}, rule `{c['rule']}` = {c['value']:.4g} > "
                     f"{c['threshold']:.4g} ({c.get('detail', '')}; top environments {c.get('top_envs')})")
    h = s["halt"]
    if h:
        when = " (an earlier attempt, superseded by the restart)" if h.get("superseded") else ""
        lines.append(f"- **halted** at step {h['step']}{when} by `{h['rule']}` ({h.get('detail', '')}); checkpoint "
                     f"`{h.get('checkpoint')}`")
    elif c:
        lines.append("- the policy only warned; the run went on")
    else:
        lines.append("- no threshold was crossed")
    for r in s["resumes"]:
        lines.append(f"- resumed from step {r['from_step']}")
    if s.get("crossings_after_restart") is not None:
        lines.append(f"- threshold crossings after the restart: {s['crossings_after_restart']}")
    lines.append(f"- last clean checkpoint (before the first crossing): `{s['last_clean_checkpoint']}`")
    for f in figs or []:
        rel = f.relative_to(base) if base and f.is_relative_to(base) else f
        lines.append(f"\n![{f.stem}]({rel})")
    return "\n".join(lines) + "\n"


def report(run_dir: str | Path, out: str | Path | None = None) -> str:
    """Figures + ``report.md`` for a run directory (or each run under ``RUN_DIR/runs``)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    runs = [run_dir] if (run_dir / LOG_NAME).is_file() else sorted(p.parent for p in run_dir.glob(f"runs/*/{LOG_NAME}"))
    if not runs:
        from .errors import FileFormatError

        raise FileFormatError(f"{run_dir} holds no gradroute run ({LOG_NAME}).",
                              "pass a trainer output_dir that gradroute.attach logged to, or a demo directory.")
    parts = [f"# gradroute report: `{run_dir}`", ""]
    demo = run_dir / "report.json"
    if demo.is_file():
        parts += [json.loads(demo.read_text()).get("table_md", ""), ""]
    for r in runs:
        figs = figures(r, out / "figures" / r.name if len(runs) > 1 or out != run_dir else r / "figures", title=r.name)
        parts.append(markdown(summary(r), figs, base=out))
    text = "\n".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    return text
