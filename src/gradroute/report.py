"""Run reports: figures and a markdown summary from a run directory's log.

``gradroute report RUN_DIR`` works on any directory holding a ``gradroute.jsonl`` (a demo run,
a recipe's output_dir, a notebook's run), or on a directory of such runs (``RUN_DIR/runs/*``).
It reads the run and writes nothing into it unless asked (``out=RUN_DIR``): by default the
report goes to ``./<run name>-report``.

Numbers follow one rule: three significant digits (:func:`num`), except fractions of a whole
(shares of the adapter, hack/solve rates), which get two decimals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .monitor import (
    LOG_NAME,
    RunLogView,
    crossing_from_json,
    last_clean_checkpoint,
    load_log,
    read_log,
    read_records,
    resolve_path,
)

# one style per event type, shared by every figure and its legend
EVENT_STYLE = {
    "crossing": dict(color="tab:orange", ls="--", lw=1.0, label="first threshold crossing"),
    "halt": dict(color="tab:red", ls="-", lw=1.6, label="halt"),
    "halt_superseded": dict(color="tab:red", ls="-.", lw=1.2, label="halt (attempt that was restarted)"),
    "resume": dict(color="tab:green", ls=":", lw=1.6, label="restart from checkpoint"),
    "checkpoint": dict(color="0.8", ls="-", lw=0.6, label="checkpoint"),
}


def num(x: Any) -> str:
    """A number as the report writes it: three significant digits, no exponent below 1e6."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:#.3g}".rstrip(".")  # keeps significant trailing zeros: 0.240, 1.50


def frac(x: float) -> str:
    """A fraction of a whole (a share, a rate): two decimals."""
    return f"{x:.2f}"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (reports draw files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, cropped to what is drawn) and close a figure (x axes labelled "...step" get
    integer ticks)."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel().endswith("step"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.05)  # outside legends stay whole
    pyplot().close(fig)
    return path


def _columns(df, prefix: str) -> dict[str, str]:
    return {c[len(prefix):]: c for c in df.columns if c.startswith(prefix)}


def figure_events(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The vertical markers a figure draws, as ``(style, step)``: the first crossing of the current
    trajectory (crossings superseded by a restart are left out), halts (the one that led to a
    restart marked as such), restarts and checkpoints."""
    out: list[tuple[str, float]] = []
    crossing = next((e for e in events if e["type"] == "crossing" and not e.get("superseded")), None)
    if crossing is not None:
        out.append(("crossing", crossing["step"]))
    for e in events:
        if e["type"] == "halt":
            out.append(("halt_superseded" if e.get("superseded") else "halt", e["step"]))
        elif e["type"] == "resume":
            out.append(("resume", e["from_step"]))
        elif e["type"] == "checkpoint":
            out.append(("checkpoint", e["step"]))
    return out


# markers on one step (a first crossing that halts at once) are drawn this far apart, in points,
# and the crossing's legend label says which marker shares its step
SAME_STEP_SPREAD = 4.0
SAME_STEP_LABEL = {
    "halt": "first threshold crossing = halt (step {step})",
    "halt_superseded": "first threshold crossing (step {step}, also a halt step)",
    "resume": "first threshold crossing (step {step}, also the restart step)",
}


def mark_events(ax, events: list[dict[str, Any]], checkpoints: bool = True) -> list[Any]:
    """Draw the run's event markers on ``ax``; returns one legend handle per marker type drawn.

    Markers that fall on the same step (checkpoints aside) are drawn side by side,
    ``SAME_STEP_SPREAD`` points apart, so none hides another, and a first crossing that shares
    its step gets a legend label saying so (``SAME_STEP_LABEL``: "first threshold crossing =
    halt (step N)")."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import offset_copy

    marks = [(s, x) for s, x in figure_events(events) if checkpoints or s != "checkpoint"]
    at_step: dict[float, list[str]] = {}
    for style, step in marks:
        if style != "checkpoint":
            at_step.setdefault(step, []).append(style)
    placed: dict[float, int] = {}
    drawn: dict[str, Any] = {}
    for style, step in marks:
        st = EVENT_STYLE[style]
        line = ax.axvline(step, color=st["color"], ls=st["ls"], lw=st["lw"], zorder=0 if style == "checkpoint" else 2)
        label = st["label"]
        same = at_step.get(step, []) if style != "checkpoint" else []
        if len(same) > 1:
            i = placed[step] = placed.get(step, -1) + 1
            dx = (i - (len(same) - 1) / 2) * SAME_STEP_SPREAD
            line.set_transform(offset_copy(line.get_transform(), fig=ax.figure, x=dx, units="points"))
            line.set_zorder(3)
            if style == "crossing":
                label = next((SAME_STEP_LABEL[o] for o in SAME_STEP_LABEL if o in same), label).format(step=num(step))
        drawn.setdefault(style, Line2D([], [], color=st["color"], ls=st["ls"], lw=st["lw"], label=label))
    return [drawn[k] for k in EVENT_STYLE if k in drawn]


def _label(env: str) -> str:
    """A legend label (matplotlib hides labels that start with "_", such as ``_unattributed``)."""
    return f"({env.lstrip('_')})" if env.startswith("_") else env


def _legend(ax, markers: list[Any], **kw) -> None:
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + markers, fontsize=7, title_fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              **kw)


def fired_layer(log: RunLogView | list[dict[str, Any]]) -> tuple[str, str] | None:
    """``(environment, layer)`` named by the halt (else the first current crossing) of an activation
    rule, read from the violations' typed ``env``/``layer`` fields (a :class:`RunLogView`, or the
    event records of :func:`load_log`; the log reader recovers them from the text of logs written
    before violations carried their layer)."""
    if isinstance(log, RunLogView):
        halts, crossings = log.halts, log.crossings
    else:
        halts = [crossing_from_json(e) for e in log if e["type"] == "halt"]
        crossings = [crossing_from_json(e) for e in log if e["type"] == "crossing"]
    for c in [*halts, *[c for c in crossings if not c.superseded], *crossings]:
        if c.violation.env is not None and c.violation.layer is not None:
            return c.violation.env, str(c.violation.layer)
    return None


def _default_out(run_dir: Path) -> Path:
    return Path.cwd() / f"{run_dir.resolve().name}-report"


def figures(run_dir: str | Path, out: str | Path | None = None, title: str | None = None) -> list[Path]:
    """Write the run's figures (PNG) into ``out`` (default ``./<run name>-report/figures``) and return their paths."""
    plt = pyplot()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else _default_out(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    df = load_log(run_dir)
    if df.empty:
        return []
    events = df.attrs["events"]
    view = read_log(run_dir, warn=False)  # the typed records (the fired layer, the locating score)
    name = title or run_dir.name
    paths = []

    # per-environment colours, the same in every figure of the run
    envs = sorted({k for k in _columns(df, "env_adapter_norm.")} | {k for k in _columns(df, "env_adapter_share.")}
                  | {c.split(".")[1] for c in df.columns if c.startswith("activation.")})
    cmap = plt.get_cmap("tab10" if len(envs) <= 10 else "tab20")
    colour = {e: cmap(i % cmap.N) for i, e in enumerate(envs)}

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(df["step"], df["adapter_norm"], color="k", lw=2, label="adapter (total)")
    for env, col in _columns(df, "env_adapter_norm.").items():
        ax.plot(df["step"], df[col], color=colour[env], label=_label(env))
    limit = _rule_value(df.attrs["header"], "max_adapter_norm", "max_norm")
    if limit is not None:
        ax.axhline(limit, color="tab:purple", ls="--", lw=0.8, label=f"max_adapter_norm threshold ({num(limit)})")
    marks = mark_events(ax, events)
    ax.set(xlabel="optimizer step", ylabel="‖adapter‖ (Frobenius)", title=f"{name}: adapter norm per environment")
    _legend(ax, marks)
    paths.append(save_figure(fig, out / "adapter_norm.png"))

    layers = _columns(df, "adapter_norm_per_layer.")
    if layers:
        import numpy as np

        keys = sorted(layers, key=lambda k: (not k.lstrip("-").isdigit(), int(k) if k.lstrip("-").isdigit() else 0, k))
        mat = np.array([df[layers[k]].to_numpy(dtype=float) for k in keys])
        fig, ax = plt.subplots(figsize=(8, max(2.6, 1.2 + 0.45 * len(keys))))
        im = ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis",
                       extent=(df["step"].min() - 0.5, df["step"].max() + 0.5, -0.5, len(keys) - 0.5))
        ax.set_yticks(range(len(keys)), [f"layer {k}" for k in keys])
        ax.set(xlabel="optimizer step", ylabel="residual layer", title=f"{name}: adapter norm per layer")
        fig.colorbar(im, ax=ax, label="‖adapter‖ at the layer")
        paths.append(save_figure(fig, out / "layer_heatmap.png"))

    shares = _columns(df, "env_adapter_share.")
    if shares:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for env, col in shares.items():
            ax.plot(df["step"], df[col], color=colour.get(env, "0.5"), label=_label(env))
        marks = mark_events(ax, events)
        ax.axhline(0, color="0.7", lw=0.5)
        limit = _rule_value(df.attrs["header"], "max_env_share", "max_share")
        if limit is not None:
            ax.axhline(limit, color="tab:purple", ls="--", lw=0.8, label=f"max_env_share threshold ({num(limit)})")
        ax.set(xlabel="optimizer step", ylabel="share ⟨A_e, A⟩ / ‖A‖²", title=f"{name}: who built the adapter")
        _legend(ax, marks)
        paths.append(save_figure(fig, out / "env_share.png"))

    acts = [c for c in df.columns if c.startswith("activation.") and not c.startswith("activation_norm")]
    if acts:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        fired = fired_layer(view)
        chosen: dict[str, str] = {}
        if fired is not None:  # every environment at the layer where the rule fired
            chosen = {c.split(".")[1]: c for c in acts if c.split(".")[2] == fired[1]}
            how = f"layer {fired[1]}, where the rule fired ({fired[0]})"
        if not chosen:  # per environment, the layer whose projection moved most
            best: dict[str, tuple[float, str]] = {}
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
            chosen = {e: c for e, (_, c) in best.items()}
            how = "per environment, the layer that moved most"
        for env, col in sorted(chosen.items()):
            series = df[col].dropna()
            if series.empty or not isinstance(series.iloc[0], list | tuple):
                continue
            ax.plot(df.loc[series.index, "step"], [v[0] for v in series], color=colour.get(env, "0.5"),
                    label=f"{_label(env)} (layer {col.split('.')[2]})")
        base = _baseline_steps(df.attrs["header"])
        if base:
            steps = sorted(df["step"])
            ax.axvspan(steps[0] - 0.5, steps[min(base, len(steps)) - 1] + 0.5, color="0.92", zorder=0,
                       label=f"baseline window (first {base} steps)")
        marks = mark_events(ax, events, checkpoints=False)
        ax.set(xlabel="optimizer step", ylabel="mean projection u₁ᵀh", title=f"{name}: activation projection")
        _legend(ax, marks, title=how.replace(", where", ",\nwhere").replace(", the", ",\nthe"))
        paths.append(save_figure(fig, out / "activation.png"))

    steps = view.steps
    if any(r.push for r in steps):
        from .monitor.locate import locate_trajectory

        traj = locate_trajectory(steps)
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for env in sorted({e for t in traj for e in t}):
            xs = [r.step for r, t in zip(steps, traj) if env in t]
            ax.plot(xs, [t[env] for t in traj if env in t], color=colour.get(env, "0.5"), label=_label(env))
        ax.axhspan(-1, 1, color="0.92", zorder=0, label="|z| ≤ 1: no more than a random direction")
        ax.axhline(0, color="0.7", lw=0.5)
        limit = _rule_value(df.attrs["header"], "push_z", "max_z")
        if limit is not None:
            ax.axhline(limit, color="tab:purple", ls="--", lw=0.8, label=f"push_z threshold ({num(limit)})")
        # the score at each push_z crossing (an attempt a resume superseded keeps its crossing, not its steps)
        hits = [e for e in events if e.get("type") == "crossing" and e.get("rule") == "push_z"
                and isinstance(e.get("value"), int | float) and e.get("env") is not None]
        for e in hits:
            ax.plot([e["step"]], [e["value"]], marker="x", ms=7, mew=2, color=colour.get(e["env"], "0.5"), ls="none")
        marks = mark_events(ax, events, checkpoints=False)
        if hits:
            from matplotlib.lines import Line2D

            marks.append(Line2D([], [], marker="x", ms=7, mew=2, color="0.3", ls="none",
                                label="score at a crossing (× in the environment's colour)"))
        ax.set(xlabel="optimizer step", ylabel="locating score z (cumulative)",
               title=f"{name}: who pushes the persona")
        _legend(ax, marks)
        paths.append(save_figure(fig, out / "locate.png"))
    return paths


def _rule_value(header: dict[str, Any], rule: str, key: str) -> float | None:
    for r in ((header.get("policy") or {}).get("rules") or []):
        if r.get("rule") == rule and isinstance(r.get(key), int | float):
            return float(r[key])
    return None


def _baseline_steps(header: dict[str, Any]) -> int | None:
    for r in ((header.get("policy") or {}).get("rules") or []):
        if r.get("rule") == "activation_z":
            return int(r.get("baseline_steps") or 0) or None
    return None


def summary(run_dir: str | Path) -> dict[str, Any]:
    """The facts of a run: steps, adapter, environments, crossings, halt, clean checkpoint."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    df = load_log(run_dir)
    last = df.iloc[-1].to_dict() if not df.empty else {}
    events = df.attrs["events"]
    from .monitor.locate import locate_scores
    from .monitor.runlog import step_from_json

    steps = [step_from_json(r) for r in records if r.get("type") == "step"]  # the records already read
    crossings = [r for r in records if r.get("type") == "crossing"]
    current = [r for r in crossings if not r.get("superseded")]
    halts = [r for r in records if r.get("type") == "halt"]
    resumes = [e for e in events if e["type"] == "resume"]
    clean = last_clean_checkpoint(run_dir)
    after = [r for r in current if resumes and r["step"] > resumes[-1]["from_step"]]
    halt = dict(halts[-1]) if halts else None
    if halt and halt.get("checkpoint"):
        halt["checkpoint"] = _show_path(resolve_path(run_dir, halt["checkpoint"]), run_dir)
    return {
        "run_dir": str(run_dir),
        "steps": int(df["step"].max()) if not df.empty else 0,
        "adapter_norm": float(last.get("adapter_norm", 0.0)) if last else 0.0,
        "env_adapter_share": {k[len("env_adapter_share."):]: float(v) for k, v in last.items()
                              if k.startswith("env_adapter_share.") and not _nan(v)},
        "env_adapter_norm": {k[len("env_adapter_norm."):]: float(v) for k, v in last.items()
                             if k.startswith("env_adapter_norm.") and not _nan(v)},
        "first_crossing": crossings[0] if crossings else None,
        "crossings_after_restart": len(after) if resumes else None,
        "crossings_after_restart_by": _count_by(after),
        "halt": halt,
        "resumes": resumes,
        "checkpoints": [e["step"] for e in events if e["type"] == "checkpoint"],
        "last_clean_checkpoint": _show_path(clean, run_dir) if clean else None,
        "subspace_hash": df.attrs["header"].get("subspace_hash"),
        "mode": df.attrs["header"].get("mode"),
        "baseline_steps": _baseline_steps(df.attrs["header"]),
        "locate": locate_scores(steps),
        "locate_watch": locate_scores(steps, watch=True),
    }


def _count_by(crossings: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in crossings:
        key = f"{c['rule']} ({c['detail']})" if c.get("detail") else c["rule"]
        out[key] = out.get(key, 0) + 1
    return out


def _show_path(p: Path, run_dir: Path) -> str:
    """A path inside the run as ``RUN_NAME/...`` relative to the run, else as it is."""
    try:
        return str(Path(p).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(p)


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _envs(top: list[Any] | None) -> str:
    return ", ".join(str(e[0]) if isinstance(e, list | tuple) else str(e) for e in (top or [])) or "–"


def why_refiring(s: dict[str, Any]) -> str:
    """Why rules keep firing after a halt, a fix and a restart (what the monitor compares against)."""
    rules = {k.split(" ", 1)[0] for k in s.get("crossings_after_restart_by", {})}
    why = ["Why rules keep firing after the fix: a restart continues the halted run, it does not start a new one."]
    if "activation_z" in rules:
        steps = s.get("baseline_steps")
        why.append(
            "`activation_z` still compares each environment's activation projection with the baseline of the "
            + (f"first {steps} steps " if steps else "first steps ")
            + "of the original run, and the restart begins from a checkpoint whose activations already carry part "
            "of the drift that led to the halt, so the rule stays above threshold until the fix has moved the "
            "projection back. It names only the largest z of each step, and a crossing is logged each time a "
            "(rule, environment, layer) starts firing, so a drift seen at several layers or environments is "
            "logged again whenever the largest switches between them.")
    if rules & {"max_env_share", "max_adapter_norm", "max_growth"}:
        why.append(
            "The adapter is restored from the checkpoint with everything built before it, so its norm and each "
            "environment's share of it change only as fast as the new updates outweigh the old ones.")
    why.append("With `action=\"stop\"` such a restart can halt again at once: after a fix, restart with a warning "
               "policy (as the demo does) or start a new run directory, whose rules measure from its own start.")
    return " ".join(why)


def markdown(s: dict[str, Any], figs: list[Path] | None = None, base: Path | None = None) -> str:
    lines = [f"## Run `{Path(s['run_dir']).name}`", "",
             f"- steps: {s['steps']}, mode: {s['mode']}, subspace: `{str(s['subspace_hash'])[:12]}`",
             f"- adapter norm: {num(s['adapter_norm'])}"]
    if s["env_adapter_share"]:
        shares = ", ".join(f"{e} {frac(v)}" for e, v in sorted(s["env_adapter_share"].items(), key=lambda x: -x[1]))
        lines.append(f"- who built the adapter (share ⟨A_e, A⟩/‖A‖², sums to 1): {shares}")
    if s.get("locate"):
        z = ", ".join(f"{e} {v:+.1f}" for e, v in sorted(s["locate"].items(), key=lambda x: -x[1]))
        lines.append(f"- who pushes the persona (locating score z: cumulative persona push over a random "
                     f"direction's; |z| ≲ 1 is no more than any direction gets): {z}")
    if s.get("locate_watch"):
        z = ", ".join(f"{e} {v:+.1f}" for e, v in sorted(s["locate_watch"].items(), key=lambda x: -x[1]))
        lines.append(f"- along the watched directions (monitored, not routed): {z}")
    c = s["first_crossing"]
    if c:
        before = " (before the restart)" if c.get("superseded") else ""
        lines.append(f"- first threshold crossing{before}: step {c['step']}, rule `{c['rule']}` = {num(c['value'])} > "
                     f"{num(c['threshold'])} ({c.get('detail') or 'the whole adapter'}; environments by "
                     f"{'z' if c['rule'] == 'activation_z' else 'share'}: {_envs(c.get('top_envs'))})")
    h = s["halt"]
    if h:
        when = " (the attempt that was restarted)" if h.get("superseded") else ""
        ck = f"; checkpoint `{h['checkpoint']}` written" if h.get("checkpoint") else ""
        lines.append(f"- **halted** at step {h['step']}{when} by `{h['rule']}` ({h.get('detail') or 'the whole adapter'})"
                     f"{ck}")
    elif c:
        lines.append("- no halt: the policy only warned and the run went on")
    else:
        lines.append("- no halt: no threshold was crossed")
    for r in s["resumes"]:
        lines.append(f"- resumed from step {r['from_step']}")
    n = s.get("crossings_after_restart")
    if n:
        by = "; ".join(f"{k} ×{v}" for k, v in sorted(s["crossings_after_restart_by"].items(), key=lambda x: -x[1]))
        lines.append(f"- threshold crossings after the restart: {n} ({by}). {why_refiring(s)}")
    elif n == 0:
        lines.append("- threshold crossings after the restart: none")
    ck = s["last_clean_checkpoint"]
    if ck:
        lines.append(f"- last clean checkpoint (newest saved before the first crossing): `{ck}`")
    elif not s["checkpoints"]:
        lines.append("- last clean checkpoint: none (this run saved no checkpoints)")
    else:
        lines.append("- last clean checkpoint: none (every checkpoint is from after the first crossing)")
    for f in figs or []:
        rel = f.relative_to(base) if base and f.is_relative_to(base) else f
        lines.append(f"\n![{Path(s['run_dir']).name}: {f.stem.replace('_', ' ')}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def report(run_dir: str | Path, out: str | Path | None = None) -> str:
    """Figures + ``report.md`` for a run directory (or each run under ``RUN_DIR/runs``).

    ``out``: where to write (default ``./<run name>-report``; pass ``out=run_dir`` to write into
    the run). Figure links in ``report.md`` are relative to ``out``, so the folder can be moved.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else _default_out(run_dir)
    runs = [run_dir] if (run_dir / LOG_NAME).is_file() else sorted(p.parent for p in run_dir.glob(f"runs/*/{LOG_NAME}"))
    if not runs:
        from .errors import FileFormatError

        raise FileFormatError(f"{run_dir} holds no gradroute run ({LOG_NAME}).",
                              "pass a trainer output_dir that gradroute.attach logged to, or a demo directory.")
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# gradroute report: `{run_dir.resolve().name}`", ""]
    demo = run_dir / "report.json"
    if demo.is_file():
        from . import _io

        rep = _io.read_json(demo)  # a damaged file is a typed error naming it
        parts += [rep.get("table_md", ""), ""]
        for f in _demo_figures(run_dir, out):
            parts.append(f"![{f.stem.replace('_', ' ')}]({f.relative_to(out).as_posix()})\n")
    for r in runs:
        fig_dir = out / "figures" / r.name if len(runs) > 1 else out / "figures"
        figs = figures(r, fig_dir, title=r.name)
        parts.append(markdown(summary(r), figs, base=out))
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


def _demo_figures(run_dir: Path, out: Path) -> list[Path]:
    """The demo's own top-level figures (``figures/*.png``: rates), copied next to the report when it goes elsewhere."""
    import shutil

    found = []
    for f in sorted((run_dir / "figures").glob("*.png")):
        dst = out / "figures" / f.name
        if dst.resolve() != f.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        found.append(dst)
    return found
