"""``gradroute demo``: the toy persona world end to end (see :mod:`gradroute.experiments.toyworld`).

1. Pre-train a tiny causal LM on tagged honest/hacker text plus mostly-honest untagged text.
2. Find the persona subspace with the toolkit's own probe: difference of means between the
   hacker and honest personas at the decision point (the last prompt token), every layer;
   and its matched-rank random control.
3. GRPO on untagged prompts from three environments — ``copy`` and ``reverse`` with honest
   graders, ``arith`` (hard) with a buggy grader that also pays for ``PASS`` — five ways:
   routed through the persona subspace and through the random control in ``mode``
   (``activation`` by default: isolating), routed through the persona subspace in ``update``
   mode (watching: training bit-identical to the unrouted run), not routed, and routed in
   ``mode`` with a halt policy on the locating score (``max_push_z``) that stops the run, after
   which the arith grader is fixed and training restarts from the last clean checkpoint.
4. Hack and solve rates per environment before RL, after RL and after discarding the adapter;
   per-environment attribution; figures; ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import toyworld as tw
from .config import QUICK, DemoConfig
from .grpo import pretrain, toy_grpo_run
from .progress import library_noise_off, quietly, showing_progress
from .workers import cores, drain, one_thread, worker_output, worker_pool

ENVS = tw.TASKS
EXPLOITABLE = tw.EXPLOITABLE
DEFAULT_MODE = "activation"
DEFAULT_MULTIPLIER = 30.0


def _fingerprint(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Arm:
    """One GRPO run of the demo: ``name`` (its directory under ``runs/``), the subspace file it
    routes through (None: not routed), the routing mode and keyword arguments, whether it
    keeps checkpoints; ``halt``: the halt → fix → restart chain instead of a plain run."""

    name: str
    subspace: str | None
    mode: str = "update"
    kw: tuple[tuple[str, Any], ...] = ()
    save: bool = False
    halt: bool = False


def _arm_result_file(out: Path, arm: _Arm) -> Path:
    return out / "runs" / ("halt" if arm.halt else arm.name) / "summary.json"


def _run_arm(out: Path, cfg: DemoConfig, seed: int, arm: _Arm, fingerprint: str, progress: bool,
             worker: bool = False) -> dict[str, Any]:
    """Run one arm from the saved base model and subspaces; write its result file (with the
    configuration's fingerprint, so that a re-run can reuse it) and return the result."""
    if worker:  # a fresh process: one thread, no library noise, line output (no tqdm bars) prefixed with the arm
        with showing_progress(progress), one_thread(), library_noise_off(), worker_output(arm.name):
            return _run_arm(out, cfg, seed, arm, fingerprint, progress)
    from ..monitor import last_clean_checkpoint
    from ..policy import HaltPolicy
    from ..subspace import Subspace

    t = time.time()
    # an interrupted or outdated attempt: its log must not be continued, nor its checkpoints resumed from
    shutil.rmtree(_arm_result_file(out, arm).parent, ignore_errors=True)
    if arm.halt:
        shutil.rmtree(out / "runs" / "halt_restart", ignore_errors=True)
    rule = {"max_push_z": cfg.max_push_z, "push_min_steps": cfg.push_min_steps}
    watch, stop = HaltPolicy(**rule, action="warn"), HaltPolicy(**rule, action="stop")
    sub = Subspace.load(out / arm.subspace) if arm.subspace else None

    def ev(m, tk):
        return tw.evaluate(m, tk, ENVS, cfg.eval_prompts, cfg.eval_samples)

    if arm.halt:  # halt, fix the exploitable grader, restart from the last clean checkpoint
        halt_dir = out / "runs" / "halt"
        m, tk, h = toy_grpo_run(out / "base", halt_dir, cfg, sub, stop, seed, mode=arm.mode, **dict(arm.kw))
        halted = dict(h.halted) if h.halted else None
        if halted and halted.get("checkpoint"):  # relative to the demo directory, which can be moved
            halted["checkpoint"] = _relative(halted["checkpoint"], out)
        from ..monitor import read_log
        from ..monitor.locate import locate_scores

        res: dict[str, Any] = {"halt": halted, "at_halt": ev(m, tk),
                               "locate": locate_scores(read_log(halt_dir, warn=False).steps)}
        h.detach()
        clean = last_clean_checkpoint(halt_dir)
        res["restart_from"] = _relative(clean, out) if clean else None
        if halted:
            # keep watching (the drift the clean checkpoint already carries would re-trigger a stop at once);
            # flagged before the first checkpoint: a fresh run from the pre-RL model, in its own directory
            fixed_run = dict(exploitable=(), fixed=EXPLOITABLE, mode=arm.mode, **dict(arm.kw))
            if clean is not None:
                m, tk, h = toy_grpo_run(out / "base", halt_dir, cfg, sub, watch, seed, resume=str(clean), **fixed_run)
                res["steps_after_restart"] = cfg.rl_steps - int(str(clean).rsplit("-", 1)[1])
            else:
                m, tk, h = toy_grpo_run(out / "base", out / "runs" / "halt_restart", cfg, sub, watch, seed, save=False,
                                        **fixed_run)
                res["restart_from"], res["steps_after_restart"] = "the pre-RL model", cfg.rl_steps
            res["after_fix"] = ev(m, tk)
            h.detach()
    else:
        m, tk, h = toy_grpo_run(out / "base", out / "runs" / arm.name, cfg, sub, watch if sub is not None else None, seed,
                       save=arm.save, mode=arm.mode, **dict(arm.kw))
        res = {"after": ev(m, tk)}
        if h is not None:
            from ..monitor import read_log
            from ..monitor.locate import locate_scores

            res["env_adapter_share"] = h.router.env_adapter_shares()
            res["locate"] = locate_scores(read_log(out / "runs" / arm.name, warn=False).steps)
            res["adapter_norm"] = h.router.adapter_norm().total
            res["first_crossing"] = h.monitor.violations[0].to_dict() if h.monitor.violations else None
            res["crossings"] = [v.to_dict() for v in h.monitor.violations]
            h.save_adapter(out / "runs" / arm.name / "adapter")
            h.discard()
            res["discarded"] = ev(m, tk)
            h.detach()
    res["mode"] = arm.mode if sub is not None else None
    res["seconds"] = time.time() - t
    _write_stamped(_arm_result_file(out, arm), fingerprint, res, run=arm.name, routed=sub is not None)
    return res


_STAMP_KEYS = ("fingerprint", "run", "routed")


def _write_stamped(path: Path, fingerprint: str, result: dict[str, Any], **about: Any) -> None:
    """``result`` with what it is (``about``) and the configuration's fingerprint, as JSON at
    ``path``: each run directory says what it was and how it ended, and a re-run can reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**about, "fingerprint": fingerprint, **result}, indent=2, default=str))


def _reusable(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The result stored at ``path`` by :func:`_write_stamped` if it was made with the same
    configuration."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    return {k: v for k, v in data.items() if k not in _STAMP_KEYS}


@quietly
def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, progress: bool = True,
             config: DemoConfig | None = None, mode: str = DEFAULT_MODE,
             adapter_lr_multiplier: float | None = None, jobs: int | None = None,
             fresh: bool = False) -> dict[str, Any]:
    """The toy world end to end (module docstring). Torch runs on one thread (:func:`one_thread`:
    the numbers do not depend on the core count); the GRPO arms run as ``jobs`` parallel
    one-thread processes (default: the CPU count; 1: in this process, one after the other).
    A re-run into the same ``out`` with the same configuration reuses the pre-trained base and
    every arm that finished (``fresh=True`` starts over)."""
    with one_thread():
        return _run_demo(Path(out), quick, seed, progress, config, mode, adapter_lr_multiplier, jobs, fresh)


def _run_demo(out: Path, quick: bool, seed: int, progress: bool, config: DemoConfig | None, mode: str,
              adapter_lr_multiplier: float | None, jobs: int | None, fresh: bool) -> dict[str, Any]:
    from .._version import __version__
    from ..report import report
    from ..subspace import Subspace

    cfg = config or (QUICK if quick else DemoConfig())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}
    say = print if progress else (lambda *a, **k: None)
    mult = adapter_lr_multiplier if adapter_lr_multiplier is not None else (
        DEFAULT_MULTIPLIER if mode in ("activation", "gradient") else None)
    world_fp = _fingerprint({"config": asdict(cfg), "seed": seed, "gradroute": __version__})
    run_fp = _fingerprint({"world": world_fp, "mode": mode, "adapter_lr_multiplier": mult})

    # 1. the world (reused when a previous run with the same configuration saved it)
    world_file = out / "world.json"
    world = None if fresh else _reusable(world_file, world_fp)
    if world is not None and all((out / f).exists() for f in ("base", "persona.subspace", "random.subspace")):
        say("1/4 reusing the pre-trained toy model and persona subspace (--fresh to start over)")
        persona = Subspace.load(out / "persona.subspace")
        loss, rates = world["pretrain_loss"], {"before": world["before"]}
    else:
        world = None
        world_file.unlink(missing_ok=True)  # until the new base and subspaces are all written
        say("1/4 pre-training the toy model on tagged honest/hacker text ...")
        model, tok, loss = pretrain(cfg, seed, progress)
        model.save_pretrained(out / "base")
        tok.save_pretrained(out / "base")
        rates = {"before": tw.evaluate(model, tok, ENVS, cfg.eval_prompts, cfg.eval_samples)}
        # 2. the persona subspace (the toolkit's own probe) and its random control
        say("2/4 probing the persona subspace ...")
        hacker, honest = tw.persona_probe_texts(cfg.probe_texts, seed)
        persona = Subspace.from_probe(model, tok, hacker, honest, layers=list(range(cfg.num_layers)),
                                      aggregation="last_prompt", names=["hacker"], progress=False)
        persona.save(out / "persona.subspace", overwrite=True)
        persona.random_like(seed=seed).save(out / "random.subspace", overwrite=True)
        _write_stamped(world_file, world_fp, {"pretrain_loss": loss, "before": rates["before"]})
    timings["pretrain"] = time.time() - t0
    probe_acc = {L: d["accuracy"] for L, d in persona.provenance.extra["diagnostics"].items()}

    # 3. RL five ways
    kw = () if mult is None else (("adapter_lr_multiplier", mult),)
    arms = [_Arm("persona", "persona.subspace", mode, kw, save=True), _Arm("random", "random.subspace", mode, kw)]
    if mode != "update":
        arms.append(_Arm("persona_update", "persona.subspace", "update"))
    arms += [_Arm("none", None), _Arm("halt_and_fix", "persona.subspace", mode, kw, halt=True)]
    if mode == "update":  # a previous run's update-mode arm: not this run's (the report reads every run directory)
        shutil.rmtree(out / "runs" / "persona_update", ignore_errors=True)
    runs: dict[str, Any] = {}
    if world is not None:
        for arm in arms:
            if (res := _reusable(_arm_result_file(out, arm), run_fp)) is not None:
                runs[arm.name] = res
        if runs:
            say(f"   reusing {len(runs)} completed arm(s): {', '.join(runs)} (--fresh to start over)")
    todo = [a for a in arms if a.name not in runs]
    jobs = max(1, min(jobs or cores(), len(todo) or 1))
    say(f"3/4 GRPO: {mode}-routed (persona, random control), update-routed (persona), not routed, halt-and-fix"
        + (f"; {jobs} one-thread processes" if jobs > 1 and todo else "") + " ...")
    if jobs == 1:
        for arm in todo:
            runs[arm.name] = _run_arm(out, cfg, seed, arm, run_fp, progress)
    else:
        with worker_pool(jobs) as pool:
            drain({a.name: pool.apply_async(_run_arm, (out, cfg, seed, a, run_fp, progress, True))
                   for a in sorted(todo, key=lambda a: not a.halt)}, runs.__setitem__)  # the longest first
    runs = {a.name: runs[a.name] for a in arms}  # the table's order
    timings["rl"] = time.time() - t0 - timings["pretrain"]

    # 4. report
    say("4/4 writing the report ...")
    summary = {
        "config": asdict(cfg), "seed": seed, "quick": quick, "pretrain_loss": loss,
        "mode": mode, "adapter_lr_multiplier": mult,
        "envs": list(ENVS), "exploitable": list(EXPLOITABLE), "probe_accuracy": probe_acc,
        "rates": rates, "runs": runs, "timings": timings,
        # the locating score of every environment (gradroute.monitor.locate), for every routed arm
        "locate": {name: r["locate"] for name, r in runs.items() if "locate" in r},
    }
    summary["table"] = _table(summary)
    summary["table_md"] = _table(summary, markdown=True)
    summary["figures"] = [str(p) for p in _rates_figure(summary, out)]
    summary["seconds"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    report(out, out=out)  # the demo's own directory: report.md and figures/<run>/ next to report.json
    summary["figures"] += [str(p) for p in sorted((out / "figures").glob("*/*.png"))]
    summary["seconds"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _relative(path: str | Path, base: Path) -> str:
    p, b = Path(path).resolve(), base.resolve()
    return str(p.relative_to(b)) if p.is_relative_to(b) else str(path)


def _fmt(r: dict[str, float] | None) -> str:
    return "   –   " if r is None else f"{r['hack']:.2f}/{r['solve']:.2f}"


def _stages(s: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, float]] | None]]:
    """The table's and the figure's columns: (label, rates per environment or None if not run)."""
    runs = s["runs"]
    mode = s.get("mode", "update")
    tag = {"activation": "act", "update": "upd", "gradient": "grad"}.get(mode, mode)
    cols = [("before RL", s["rates"]["before"]), ("after RL", runs["none"]["after"])]
    if mode != "update":
        cols += [(f"after RL [{tag}]", runs["persona"]["after"])]
    cols += [(f"discard persona [{tag}]", runs["persona"]["discarded"])]
    if mode != "update":
        cols += [(f"after RL random [{tag}]", runs["random"]["after"])]
    cols += [(f"discard random [{tag}]", runs["random"]["discarded"])]
    if "persona_update" in runs:
        cols += [("discard persona [upd]", runs["persona_update"]["discarded"])]
    return cols + [("at halt", runs["halt_and_fix"]["at_halt"]),
                   ("halt+fix+restart", runs["halt_and_fix"].get("after_fix"))]


def _table(s: dict[str, Any], markdown: bool = False) -> str:
    from ..report import num

    runs = s["runs"]
    mode = s.get("mode", "update")
    cols = [(label, lambda e, r=r: None if r is None else r.get(e)) for label, r in _stages(s)]
    share = {v: runs[v]["env_adapter_share"] for v in ("persona", "random")}
    z = {v: runs[v].get("locate", {}) for v in ("persona", "random")}
    nan = float("nan")
    if markdown:
        head = ("| env (hack/solve) | " + " | ".join(c for c, _ in cols)
                + " | share of persona adapter | share of random adapter | push z, persona | push z, random |")
        rows = [head, "|" + "---|" * (len(cols) + 5)]
        for e in s["envs"]:
            mark = " (exploitable)" if e in s["exploitable"] else ""
            rows.append(f"| {e}{mark} | " + " | ".join(_fmt(f(e)) for _, f in cols)
                        + f" | {share['persona'].get(e, 0):.2f} | {share['random'].get(e, 0):.2f}"
                        + f" | {z['persona'].get(e, nan):+.1f} | {z['random'].get(e, nan):+.1f} |")
    else:
        rows = [f"{'env (hack/solve)':<18}" + "".join(f"{c:>23}" for c, _ in cols)
                + f"{'share persona':>15}{'share random':>14}{'z persona':>11}{'z random':>10}"]
        for e in s["envs"]:
            mark = "*" if e in s["exploitable"] else " "
            rows.append(f"{e + mark:<18}" + "".join(f"{_fmt(f(e)):>23}" for _, f in cols)
                        + f"{share['persona'].get(e, 0):>15.2f}{share['random'].get(e, 0):>14.2f}"
                        + f"{z['persona'].get(e, nan):>+11.1f}{z['random'].get(e, nan):>+10.1f}")
    h = runs["halt_and_fix"]["halt"]
    mult = s.get("adapter_lr_multiplier")
    notes = [f"routing: persona and random arms in {mode} mode" + (f" (adapter LR x{mult:g})" if mult else "")
             + ("; the [upd] arm watches in update mode (training identical to the unrouted run)"
                if "persona_update" in runs else ""),
             f"adapter norm: persona {num(runs['persona']['adapter_norm'])}, random {num(runs['random']['adapter_norm'])}",
             "push z: the locating score (each environment's cumulative persona push over a random direction's; "
             "|z| ~ 1 is no more than a random direction gets, negative pushes away from the persona)"]
    for v in ("persona", "random", "persona_update"):
        if v not in runs:
            continue
        c = runs[v].get("first_crossing")
        notes.append(f"{v} subspace, watching: " + (f"first crossing at step {c['step']} ({c['rule']} {num(c['value'])} > "
                                                    f"{num(c['threshold'])}, {c['detail']})" if c else "no crossing"))
    if h:
        notes.append(f"halt: step {h['step']}, {h['rule']} ({h['detail']}); restarted from "
                     f"{runs['halt_and_fix']['restart_from']} with the arith grader fixed")
    else:
        notes.append("halt: the policy did not fire")
    sep = "\n\n" if markdown else "\n"
    return "\n".join(rows) + sep + ("\n".join(f"- {n}" for n in notes) if markdown else "\n".join(notes))


def _rates_figure(s: dict[str, Any], out: Path) -> list[Path]:
    """Hack and solve rates per environment at every stage of the table (same columns, same order)."""
    from ..report import pyplot, save_figure

    plt = pyplot()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    stages = _stages(s)
    fixed = {"before RL": "#7f7f7f", "after RL": "#ff7f0e", "discard persona [upd]": "#bcbd22", "at halt": "#d62728",
             "halt+fix+restart": "#ff9896"}

    def colour(label: str) -> str:  # a routed arm: dark after RL, light once its adapter is discarded
        dark, light = ("#9467bd", "#c5b0d5") if "random" in label else ("#2ca02c", "#98df8a")
        return fixed.get(label) or (light if label.startswith("discard") else dark)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    envs = s["envs"]
    width = 0.84 / len(stages)
    for ax, metric in zip(axes, ("hack", "solve")):
        for i, (label, r) in enumerate(stages):
            xs = [j - 0.42 + (i + 0.5) * width for j in range(len(envs))]
            ys = [float("nan") if r is None else r[e][metric] for e in envs]
            name = label + (" (not routed)" if label == "after RL" else "") + (" (not run)" if r is None else "")
            ax.bar(xs, ys, width * 0.95, color=colour(label), label=name,
                   edgecolor="white", linewidth=0.3)
        ax.set_xticks(range(len(envs)), [e + (" *" if e in s["exploitable"] else "") for e in envs])
        ax.set(title=f"{metric} rate per environment (* exploitable)", ylim=(0, 1.05), xlabel="environment",
               ylabel=f"{metric} rate (fraction of sampled completions)")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(title="model (table column)", fontsize=8, title_fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.02, 1.0))
    return [save_figure(fig, out / "figures" / "rates.png")]
