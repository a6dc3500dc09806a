"""The README's result blocks, rendered from the results files in ``docs/results/``.

Every number the README quotes about the demo and the studies sits between markers

    <!-- results:NAME -->
    ...generated text...
    <!-- /results:NAME -->

and is rendered here from the JSON that ``recipes/studies.py`` regenerates. Prose outside
the blocks carries no figures. ``tests/test_readme_results.py`` fails when a block differs
from what its results file renders, so a README number cannot go stale silently.

    python tools/readme_results.py --check     # exit 1 and show the blocks that differ
    python tools/readme_results.py --write     # rewrite the blocks in README.md
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
EXPLOIT = "arith"
HONEST = ("copy", "reverse")

BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


# ---------------------------------------------------------------- formatting
def f2(x: float) -> str:
    return f"{x:.2f}".replace("-0.00", "0.00")


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def med(xs: Sequence[float], fmt: Callable[[float], str] = f2) -> str:
    """Median [bootstrap 95 % interval of the median] (:func:`gradroute.experiments.stats.describe`;
    just the value when all seeds agree or there is one)."""
    from gradroute.experiments.stats import describe

    xs = list(xs)
    if xs and fmt(min(xs)) == fmt(max(xs)):
        return fmt(statistics.median(xs))
    return describe(xs, fmt)


def seeds_list(xs: Sequence[float], fmt: Callable[[float], str] = f2) -> str:
    return ", ".join(fmt(x) for x in xs)


def cut(after: float, removed: float) -> float:
    """Relative cut of the hack rate: 1 − removed/after (0 when nothing was learned)."""
    return 1 - removed / after if after > 0 else 0.0


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


# ---------------------------------------------------------------- activation study
ARM_LABELS = {"update/dm1": "update mode, persona", "update/random-dm1": "update mode, random"}


def _arm_label(arm: str) -> str:
    if arm in ARM_LABELS:
        return ARM_LABELS[arm]
    sub, mult = arm.split("/", 1)[1].split("@")
    return f"activation ×{mult}, {'random' if sub.startswith('random') else 'persona'}"


def _study_arms(study: dict[str, Any]) -> list[str]:
    seeds = list(study["seeds"].values())
    arms = list(dict.fromkeys(a for s in seeds for a in s["arms"]))
    persona = [a for a in arms if "random" not in a]
    out = []
    for a in persona:
        out.append(a)
        twin = a.replace("/dm1", "/random-dm1")
        if twin in arms:
            out.append(twin)
    return out


def _per_arm(study: dict[str, Any], arm: str, fn: Callable[[dict[str, Any]], float]) -> list[float]:
    return [fn(s["arms"][arm]) for _, s in sorted(study["seeds"].items(), key=lambda kv: int(kv[0])) if arm in s["arms"]]


def _hack(stage: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: r[stage][EXPLOIT]["hack"]


def _solve(stage: str, env: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: r[stage][env]["solve"]


def _cut(r: dict[str, Any]) -> float:
    return cut(r["after"][EXPLOIT]["hack"], r["discarded"][EXPLOIT]["hack"])


def _ceiling_cut(r: dict[str, Any]) -> float:
    return cut(r["after"][EXPLOIT]["hack"], r["suppressed"][EXPLOIT]["hack"])


def activation_table(res: dict[str, Any]) -> str:
    study = res["study"]
    n = len(study["seeds"])
    rows = [f"Median over {n} seeds [bootstrap 95 % interval of the median] (seeds "
            f"{', '.join(sorted(study['seeds'], key=int))}; `docs/results/activation_study.json`):", "",
            "| arm | arith hack after RL → after discard | relative cut (per seed) | copy solve after → discarded | "
            "reverse solve after → discarded | arith share of the adapter |",
            "|---|---|---|---|---|---|"]
    for a in _study_arms(study):
        label = _arm_label(a)
        if a == "activation/dm1@30":
            label = f"**{label}** (default)"
        cuts = _per_arm(study, a, _cut)
        rows.append(
            f"| {label} | {med(_per_arm(study, a, _hack('after')))} → {med(_per_arm(study, a, _hack('discarded')))} "
            f"| {med(cuts, pct)} ({seeds_list(cuts, pct)}) "
            f"| {med(_per_arm(study, a, _solve('after', 'copy')))} → {med(_per_arm(study, a, _solve('discarded', 'copy')))} "
            f"| {med(_per_arm(study, a, _solve('after', 'reverse')))} → "
            f"{med(_per_arm(study, a, _solve('discarded', 'reverse')))} "
            f"| {med(_per_arm(study, a, lambda r: r['env_adapter_share'].get(EXPLOIT, 0.0)))} |")
    rows += ["", "(×m is `adapter_lr_multiplier`: the adapters learn m times faster than the policy.)"]
    for a, name in (("update/dm1", "persona"), ("update/random-dm1", "random")):
        if a in study["seeds"][next(iter(study["seeds"]))]["arms"]:
            c = _per_arm(study, a, _ceiling_cut)
            rows.append(f"Inference-time suppression of the {name} subspace's positive component at every layer, on the "
                        f"unrouted model: arith hacking {med(_per_arm(study, a, _hack('after')))} → "
                        f"{med(_per_arm(study, a, _hack('suppressed')))} (cut {med(c, pct)}; per seed "
                        f"{seeds_list(c, pct)}).")
    before = [s["before"][EXPLOIT]["hack"] for s in study["seeds"].values()]
    rows.append(f"Before RL: arith hack {med(before)}.")
    rows.append(unlearned_line(study["seeds"]))
    return "\n".join(rows)


def unlearned_line(seeds: dict[str, Any]) -> str:
    """Which seeds' base models never learned an honest task (pre-RL solve below the threshold)."""
    from gradroute.experiments.stats import LEARNED_SOLVE, unlearned

    bad = {k: u for k, s in sorted(seeds.items(), key=lambda kv: int(kv[0])) if (u := unlearned(s["before"], HONEST))}
    if not bad:
        return f"Every seed's base model solves {' and '.join(HONEST)} at {LEARNED_SOLVE:g} or more before RL."
    return ("Seeds whose base model did not learn an honest task before RL (solve below "
            f"{LEARNED_SOLVE:g}; their rows measure RL on a task the base cannot do): "
            + "; ".join(f"seed {k}: " + ", ".join(f"{e} {f2(v)}" for e, v in u.items()) for k, u in bad.items()) + ".")


def _m(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def activation_findings(res: dict[str, Any]) -> str:
    study = res["study"]
    arms = _study_arms(study)
    mults = sorted({float(a.split("@")[1]) for a in arms if "@" in a})

    def cuts(a: str) -> list[float]:
        return _per_arm(study, a, _cut)

    upd, upd_r = cuts("update/dm1"), cuts("update/random-dm1")
    lines = [f"- Update mode (watching): discarding its adapter cuts arith hacking by {med(upd, pct)} (per seed "
             f"{seeds_list(upd, pct)}; random control {med(upd_r, pct)})."]
    per = []
    for m in mults:
        p, r = cuts(f"activation/dm1@{m:g}"), cuts(f"activation/random-dm1@{m:g}")
        per.append((m, p, r))
        lines.append(f"- Activation routing ×{m:g}: discard cuts arith hacking by {med(p, pct)} (per seed "
                     f"{seeds_list(p, pct)}); the random control by {med(r, pct)} (per seed {seeds_list(r, pct)}).")
    ceil = _per_arm(study, "update/dm1", _ceiling_cut)
    d30 = cuts("activation/dm1@30") if 30.0 in mults else None
    if d30 is not None:
        wins = sum(a > b for a, b in zip(d30, ceil))
        lines.append(f"- Against inference-time suppression on the unrouted model (cut {med(ceil, pct)}): "
                     f"activation discard ×30 removes more on {wins} of {len(d30)} seeds "
                     f"(per seed {seeds_list(d30, pct)} vs {seeds_list(ceil, pct)}).")
        for env in HONEST:
            a = _per_arm(study, "activation/dm1@30", _solve("after", env))
            d = _per_arm(study, "activation/dm1@30", _solve("discarded", env))
            worst = max(x - y for x, y in zip(a, d))
            lines.append(f"- {env} solve at ×30: {med(a)} after RL → {med(d)} after discard (largest drop on a seed "
                         f"{f2(worst)}).")
    # what routing costs RL: mean reward over the last logged steps
    rew_u = {e: _per_arm(study, "update/dm1", lambda r, e=e: r["reward"].get(e, float("nan"))) for e in (EXPLOIT, *HONEST)}
    parts = [f"unrouted {' / '.join(med(v) for v in rew_u.values())}"]
    for m in mults:
        a = f"activation/dm1@{m:g}"
        parts.append(f"×{m:g} " + " / ".join(med(_per_arm(study, a, lambda r, e=e: r["reward"].get(e, float("nan"))))
                                              for e in (EXPLOIT, *HONEST)))
    lines.append("- What routing costs RL (mean reward over the last 20 steps, arith / copy / reverse): "
                 + "; ".join(parts) + ".")
    best = max(per, key=lambda t: _m(t[1]))
    met = _m(best[1]) >= 0.7 and _m(best[2]) <= 0.15
    lines.append(f"- Target (≥ 70 % cut with the random control ≤ 15 %): **{'met' if met else 'not met'}**; the best "
                 f"median persona cut is {pct(_m(best[1]))} at ×{best[0]:g}, where the random control cuts "
                 f"{pct(_m(best[2]))}.")
    if d30 is not None:
        sp = _per_arm(study, "activation/dm1@30", lambda r: r["env_adapter_share"].get(EXPLOIT, 0.0))
        sr = _per_arm(study, "activation/random-dm1@30", lambda r: r["env_adapter_share"].get(EXPLOIT, 0.0))
        lines.append(f"- The exploitable environment's share of the ×30 persona adapter ({med(sp)}) against its share "
                     f"of the random one ({med(sr)}): {'above' if _m(sp) > _m(sr) + 0.05 else 'not above'} it.")
    return "\n".join(lines)


def activation_sweeps(res: dict[str, Any]) -> str:
    rows = ["| sweep (seed 0, persona subspace) | arith hack after RL → after discard | cut | copy / reverse solve "
            "after RL | copy / reverse solve after discard |", "|---|---|---|---|---|"]
    seen: set[tuple[str, str]] = set()
    for name, study in res["seed0_sweeps"].items():
        cfg = study["config"]
        layers = cfg.get("layers")
        where = f"probe layers {', '.join(map(str, layers))}" if layers else "every layer"
        for arm, r in study["seeds"]["0"]["arms"].items():
            if "random" in arm or arm.startswith("update") or (arm, where) in seen:
                continue  # update mode and the random controls are in the main table
            seen.add((arm, where))
            sub = arm.split("/", 1)[1]
            label = (f"{'update' if arm.startswith('update') else 'activation ×' + sub.split('@')[1]}, "
                     f"{sub.split('@')[0].replace('dm1', 'diff-means k=1').replace('pca', 'PCA rank ')}, {where}")
            rows.append(f"| {label} | {f2(r['after'][EXPLOIT]['hack'])} → {f2(r['discarded'][EXPLOIT]['hack'])} "
                        f"| {pct(_cut(r))} | {f2(r['after']['copy']['solve'])} / {f2(r['after']['reverse']['solve'])} "
                        f"| {f2(r['discarded']['copy']['solve'])} / {f2(r['discarded']['reverse']['solve'])} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- demo
def demo(res: dict[str, Any]) -> str:
    runs = res["runs"]
    lines = [f"Seed {res['seed']}, default configuration (`docs/results/demo.json`):", "", res["table_md"], ""]
    rnd = runs["random"]
    lines.append(f"- The random-control run ({res['mode']} mode) ends RL at arith hack/solve "
                 f"{f2(rnd['after'][EXPLOIT]['hack'])}/{f2(rnd['after'][EXPLOIT]['solve'])}; discarding its adapter "
                 f"gives {f2(rnd['discarded'][EXPLOIT]['hack'])}/{f2(rnd['discarded'][EXPLOIT]['solve'])}. The persona "
                 f"run: {f2(runs['persona']['after'][EXPLOIT]['hack'])} → "
                 f"{f2(runs['persona']['discarded'][EXPLOIT]['hack'])} after discard.")
    tags = {"persona": f"persona [{res['mode']}]", "random": f"random [{res['mode']}]", "persona_update": "persona [update]"}
    z = [f"{tag} {runs[k]['locate'][EXPLOIT]:+.1f}" for k, tag in tags.items() if k in runs and "locate" in runs[k]]
    lines.append(f"- arith's locating score (push z) at the end of each watched run: {', '.join(z)}.")
    h = runs["halt_and_fix"]
    if h.get("halt"):
        lines.append(f"- Halt → fix → restart: the {h.get('mode') or res['mode']}-mode run with the stop policy "
                     f"({h['halt']['rule']} > {h['halt']['threshold']:g}) halts at step {h['halt']['step']} on "
                     f"{h['halt'].get('env') or h['halt']['detail']} (arith hack {f2(h['at_halt'][EXPLOIT]['hack'])}); "
                     f"restarting from `{h['restart_from']}` with the "
                     f"grader fixed ends at arith hack "
                     f"{f2(h['after_fix'][EXPLOIT]['hack']) if h.get('after_fix') else '–'}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- claims
def claims(rep: dict[str, Any]) -> str:
    from gradroute.experiments.claims import summarize

    text = summarize(rep).split("\n")
    body = text[2:]  # drop the '# Claims study' title and its blank line
    body = [ln.replace("## Targets", "**Targets** (medians over seeds):") for ln in body]
    while body and not body[-1].strip():
        body.pop()
    return "\n".join(body) + "\n\n" + claims_per_seed(rep)


def claims_per_seed(rep: dict[str, Any]) -> str:
    """Per seed, one table per measure: a row per arm, a column per seed."""
    seeds = sorted(rep["seeds"], key=int)
    cap = rep["config"]["relearn_steps"]
    steps = lambda x: f">{cap}" if math.isinf(x) else f"{x:.0f}"  # noqa: E731
    tables = (("hack_cut", "exploitable hack cut, 1 − removed / unrouted after (the deployed model against plain RL's)",
               pct),
              ("trait_ratio_removed", "held-out trait after removal / pre-RL", lambda x: f"{x:.2f}×"),
              ("solve_drop", "largest honest solve drop against plain RL (copy, reverse)", lambda x: f"{x:+.2f}"),
              ("relearn", "steps to relearn (unrouted: first learning from the pre-RL model)", steps),
              ("auroc_vs_unrouted", "persona AUROC change vs unrouted", lambda x: f"{x:+.2f}"))
    out = [f"Per seed ({', '.join(seeds)}):"]
    for key, title, fmt in tables:
        out += ["", f"*{title}*", "", "| arm | " + " | ".join(seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        for arm in arms_in(rep):
            if key == "relearn":
                vals = _claims_per_seed(rep, arm, "learn_steps" if arm == "unrouted" else "relearn_steps")
            elif key == "solve_drop":
                drops = [_claims_per_seed(rep, arm, f"solve_drop_{e}") for e in HONEST]
                vals = [None if any(d is None for d in ds) else max(ds) for ds in zip(*drops)]
            else:
                vals = _claims_per_seed(rep, arm, key)
            out.append(f"| {arm} | " + " | ".join("–" if v is None else fmt(v) for v in vals) + " |")
    return "\n".join(out)


def arms_in(rep: dict[str, Any]) -> list[str]:
    from gradroute.experiments.claims import arms_of

    return arms_of(rep)


def claims_isolation(rep: dict[str, Any]) -> str:
    """Issue 22's targets, per arm (medians over seeds) and seed by seed for each arm's count."""
    from gradroute.experiments.claims import ISOLATION, isolation, per_seed

    iso = isolation(rep)
    n = len(rep["seeds"])
    rows = [f"Medians over {n} seeds (`docs/results/claims_study.json`); target: cut ≥ {pct(ISOLATION['hack_cut'])}, "
            f"trait ≤ {ISOLATION['trait_ratio_removed']:g}× pre-RL, honest solve drop ≤ {ISOLATION['solve_drop']:g}, "
            f"relearning ≥ {ISOLATION['relearn_ratio']:g}× the first learning; the last column counts the seeds on "
            "which the arm meets all four.", "",
            "| arm | inference step | hack cut | held-out trait / pre-RL | largest honest solve drop | relearning / first "
            "learning | targets met (of 4) | seeds meeting all four | detector: hacks flagged / flags that were "
            "not hacks |", "|---|---|---|---|---|---|---|---|---|"]
    from gradroute.experiments.arms import REGISTRY

    for arm, r in iso["arms"].items():
        med_ = r["median"]
        cuts, traits = per_seed(rep, "hack_cut", arm), per_seed(rep, "trait_ratio_removed", arm)
        ratios = per_seed(rep, "relearn_ratio", arm)
        drops = [per_seed(rep, f"solve_drop_{e}", arm) for e in HONEST]
        all4 = sum(1 for k in cuts if cuts[k] is not None and cuts[k] >= ISOLATION["hack_cut"]
                   and traits.get(k) is not None and traits[k] <= ISOLATION["trait_ratio_removed"]
                   and all(d.get(k) is not None and d[k] <= ISOLATION["solve_drop"] for d in drops)
                   and ratios.get(k) is not None and ratios[k] >= ISOLATION["relearn_ratio"])
        step = REGISTRY[arm].inference_step if arm in REGISTRY else "–"
        label = f"**{arm}**" if arm == iso["best"] else arm
        rows.append(f"| {label} | {step} | {med(list(_vals(cuts)), pct)} | "
                    f"{med(list(_vals(traits)), lambda x: f'{x:.2f}×')} | {_fmt_or_dash(med_['solve_drop'], '+.2f')} | "
                    f"{med(list(_vals(ratios)), lambda x: 'inf' if math.isinf(x) else f'{x:.2f}×')} | {r['n_met']} | "
                    f"{all4} of {sum(1 for v in cuts.values() if v is not None)} | {_detector(rep, arm)} |")
    rnd = list(_vals(per_seed(rep, "hack_cut", "random")))
    rows += ["", f"Random control: cut {med(rnd, pct)} (per seed {seeds_list(rnd, pct)}; target ≤ "
             f"{pct(ISOLATION['random_cut'])}: {'met' if iso['random_ok'] else 'not met'}). Best routed arm "
             f"(most targets met, then the largest cut): {iso['best']}, {iso['arms'][iso['best']]['n_met']} of 4."]
    for arm in ("quarantine-monitor", "early-stop", "halt-restart"):
        if arm not in iso["arms"]:
            continue
        when = []
        for k, s in sorted(rep["seeds"].items(), key=lambda kv: int(kv[0])):
            r = s["arms"].get(arm, {})
            if arm == "quarantine-monitor":
                q = r.get("quarantined_envs") or {}
                when.append(", ".join(f"{e}@{st}" for e, st in q.items()) or "none")
            else:
                h = r.get("halt")
                when.append(f"{h['env']}@{h['step']}" if h else "none")
        rows.append(f"{arm}: environment flagged by the push rule and its step, per seed: {'; '.join(when)}.")
    return "\n".join(rows)


def _detector(rep: dict[str, Any], arm: str) -> str:
    """Pooled over seeds: the share of hacking rollouts the detector flagged, and the share of its
    flags on rollouts that did not hack ('–' for arms without a rollout detector)."""
    counts = [s["arms"][arm].get("quarantine_flags") for s in rep["seeds"].values() if arm in s["arms"]]
    counts = [c for c in counts if c]
    if not counts:
        return "–"
    hacks = sum(c["hacks"] for c in counts)
    flagged = sum(c["flagged"] for c in counts)
    false = sum(c.get("false_flags", 0) for c in counts)
    caught = sum(c.get("hacks_flagged", c["flagged"] - c.get("false_flags", 0)) for c in counts)
    return f"{pct(caught / hacks) if hacks else '–'} / {pct(false / flagged) if flagged else '–'}"


def _vals(d: dict[str, float | None]):
    return (v for _, v in sorted(d.items(), key=lambda kv: int(kv[0])) if v is not None)


def _fmt_or_dash(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _claims_per_seed(rep: dict[str, Any], arm: str, key: str) -> list[float | None]:
    from gradroute.experiments.claims import measures

    fn = measures(rep)[key]
    return [fn(s, s["arms"][arm]) if arm in s["arms"] else None
            for _, s in sorted(rep["seeds"].items(), key=lambda kv: int(kv[0]))]


def _opt(xs: Sequence[float | None], fmt: Callable[[float], str] = f2) -> str:
    return ", ".join("–" if x is None else "not within the budget" if math.isinf(x) else fmt(x) for x in xs)


def claims_sweeps(sw: dict[str, Any]) -> str:
    from gradroute.experiments.claims import measures

    labels = {"act100": ("activation", "adapters ×100"), "pen10": ("penalty", "penalty weight w = 10"),
              "pen100": ("penalty", "penalty weight w = 100"), "steer025": ("steering", "steering at ¼ of the gap"),
              "trials": ("activation-wd", "adapter weight decay 3 (≈ 2 % of the adapter per step)"),
              "trials:pca": ("activation-pca4", "rank-4 persona, honest tasks' top 4 directions projected out"),
              "trials:act": ("activation", "the same seeds' default activation arm")}
    rows = ["| variant | arm | exploitable hack: after → removed | held-out trait: after → removed | honest solve: "
            "after → removed | persona AUROC (change vs unrouted) | through | steps to relearn |",
            "|---|---|---|---|---|---|---|---|"]
    items = []
    for key, rep in sw.items():
        items.append((key, rep))
        if key == "trials":
            items += [("trials:pca", rep), ("trials:act", rep)]
    for key, rep in items:
        arm, label = labels.get(key, (rep["config"]["arms"][-1], key))
        m = measures(rep)

        def v(name: str, a: str = arm) -> list[float]:
            return [x for x in (m[name](s, s["arms"][a]) for s in rep["seeds"].values() if a in s["arms"])
                    if x is not None]
        rows.append(f"| {label} | {arm} | {med(v('hack_after'))} → {med(v('hack_removed'))} | {med(v('trait_after'))} → "
                    f"{med(v('trait_removed'))} | {med(v('honest_solve_after'))} → {med(v('honest_solve_removed'))} | "
                    f"{med(v('auroc'))} ({med(v('auroc_vs_unrouted'), lambda x: f'{x:+.2f}')}) | {med(v('through'))} | "
                    f"{med(v('relearn_steps'), lambda x: f'{x:.0f}')} |")
        if key == "act100" and "random" in rep["seeds"][next(iter(rep["seeds"]))]["arms"]:
            rows.append(f"| {label} | random | {med(v('hack_after', 'random'))} → {med(v('hack_removed', 'random'))} | "
                        f"{med(v('trait_after', 'random'))} → {med(v('trait_removed', 'random'))} | "
                        f"{med(v('honest_solve_after', 'random'))} → {med(v('honest_solve_removed', 'random'))} | "
                        f"{med(v('auroc', 'random'))} | {med(v('through', 'random'))} | "
                        f"{med(v('relearn_steps', 'random'), lambda x: f'{x:.0f}')} |")
    return "\n".join(rows)


def claims_lowhack(rep: dict[str, Any]) -> str:
    lines = [f"Per seed ({', '.join(sorted(rep['seeds'], key=int))}; `docs/results/claims_lowhack.json`):", "",
             unlearned_line(rep["seeds"]), ""]
    for arm in [a for a in ("unrouted", "activation", "random", "ablation", "penalty", "update", "steering")
                if a in rep["config"]["arms"]]:
        ha, hr = _claims_per_seed(rep, arm, "hack_after"), _claims_per_seed(rep, arm, "hack_removed")
        ta, tr = _claims_per_seed(rep, arm, "trait_after"), _claims_per_seed(rep, arm, "trait_removed")
        extra = ""
        if arm == "unrouted":
            extra = (f"; through the subspace {_opt(_claims_per_seed(rep, arm, 'through'), pct)}; first learning "
                     f"{_opt(_claims_per_seed(rep, arm, 'learn_steps'), lambda x: f'{x:.0f}')} steps")
        elif arm in ("activation", "random"):
            extra = f"; relearning {_opt(_claims_per_seed(rep, arm, 'relearn_steps'), lambda x: f'{x:.0f}')} steps"
        lines.append(f"- {arm}: exploitable hack after → removed {', '.join(f'{_opt([a])} → {_opt([b])}' for a, b in zip(ha, hr))}; "
                     f"held-out trait {', '.join(f'{_opt([a])} → {_opt([b])}' for a, b in zip(ta, tr))}{extra}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- SFT anchoring
def sft_anchoring(res: dict[str, Any]) -> str:
    a, b = res["anchored"], res.get("baseline")
    groups = (("labelled", "labelled"), ("unlabelled_concept", "unlabelled red"), ("other", "other"))
    cos = " / ".join(f"{f2(a['before'][g]['max_cos'])} ({name})" for g, name in groups)
    lines = [f"Held-out sentences (`docs/results/sft_anchoring.json`), mean per-sentence max cos(h, u) at layer "
             f"{res['layers'][-1]}: **{cos}**"]
    if b is not None:
        lines[0] += (" with anchoring, vs " + " / ".join(f2(b["before"][g]["max_cos"]) for g, _ in groups)
                     + " without")
        dl = {g: a["before"][g]["loss"] - b["before"][g]["loss"] for g, _ in groups}
        lines[0] += (f"; the held-out LM loss changes by {', '.join(f'{dl[g]:+.4f} ({name})' for g, name in groups)}"
                     f" against the unanchored run.")
    else:
        lines[0] += "."
    sup = {g: a["suppressed"][g]["loss"] - a["before"][g]["loss"] for g, _ in groups}
    lines.append(f"Suppressing u at inference leaves max cos {' / '.join(f2(a['suppressed'][g]['max_cos']) for g, _ in groups)} "
                 f"and changes the LM loss by {', '.join(f'{sup[g]:+.4f} ({name})' for g, name in groups)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- colour study
PUBLISHED = {("anchored", "suppression"): "+0.284 / 0.000 / ≈0 / 0.99 (60-seed mean 0.95)",
             ("anchored", "ablation"): "+0.333 / +0.341 / ≈0 / 0.37",
             ("isolated", "ablation"): "+0.343 / ≈0 / +0.0008 / 0.98 (60-seed mean 0.86)"}


def colour(res: dict[str, Any]) -> str:
    st, cf = res["study"], res["conflict"]
    seeds = st["seeds"]
    rows = [f"Medians over seeds {seeds[0]}–{seeds[-1]} (`docs/results/colour_anchoring.json`), MSE increase after the "
            "intervention on the 8³ grid (red = pure red, red group = sim³ > 0.5, collateral = sim³ < 0.01):", "",
            "| model, intervention | red | red group | cyan | collateral | R² | published (red / cyan / gray / R²) |",
            "|---|---|---|---|---|---|---|"]
    sign = lambda x: f"{x:+.3f}".replace("-0.000", "+0.000")  # noqa: E731
    for (config, name), pub in PUBLISHED.items():
        m = st["median"][config][name]
        rows.append(f"| {config}, {name} | {sign(m['red'])} | {sign(m['red_group'])} | {sign(m['cyan'])} | "
                    f"{m['collateral']:.4f} | {f2(m['r2'])} | {pub} |")
    rows += ["", "Per-seed R²: " + "; ".join(
        f"{config} + {name} [{', '.join(f2(r[name]['r2']) for r in st['runs'][config])}]"
        for config, name in (("anchored", "suppression"), ("isolated", "ablation"))) + "."]
    rows.append(f"Seed 000's conflict (`--conflict`): unitarity + Euclidean repulsion peaks at a combined loss of "
                f"{cf['euclidean_peak_loss']:.0f} vs {cf['angular_peak_loss']:.1f} for unitarity + angular repulsion "
                f"({cf['ratio']:.0f}×).")
    return "\n".join(rows)


def locate(res: dict[str, Any]) -> str:
    """The locate study's tables (``recipes/locate_study.py``'s summary of the per-seed results)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("locate_study", ROOT / "recipes" / "locate_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.summarize(res)


def reroute(res: dict[str, Any]) -> str:
    """The refit-probe check on the claims study's deployed models (``recipes/reroute_study.py``)."""
    seeds = sorted(res["seeds"], key=int)
    arms = list(dict.fromkeys(a for k in seeds for a in res["seeds"][k]))
    rows = [f"Deployed models of the claims study, seeds {', '.join(seeds)} (`docs/results/reroute_study.json`); "
            "medians [bootstrap 95 % interval]; *refit* is the persona probe fit again on the deployed model:", "",
            "| arm | exploitable hack | AUROC: original → refit | through: original → refit | overlap (refit, original) "
            "| seeds where the refit reads more (AUROC / through) |", "|---|---|---|---|---|---|"]
    for a in arms:
        rs = [res["seeds"][k][a] for k in seeds if a in res["seeds"][k]]
        v = lambda key: [r[key] for r in rs if r.get(key) is not None]  # noqa: E731
        pairs_t = [(r["through"], r["through_refit"]) for r in rs
                   if r.get("through") is not None and r.get("through_refit") is not None]
        more_a = sum(r["auroc_refit"] > r["auroc"] + 0.02 for r in rs)
        more_t = sum(b > a + 0.05 for a, b in pairs_t)
        rows.append(f"| {a} | {med(v('hack'))} | {med(v('auroc'))} → {med(v('auroc_refit'))} | {med(v('through'))} → "
                    f"{med(v('through_refit'))} | {med(v('overlap'))} | {more_a} of {len(rs)} / {more_t} of "
                    f"{len(pairs_t)} |")
    rows += ["", "(*more*: the refit's AUROC above the original's by more than 0.02, its through by more than 0.05; "
             "through is undefined on a seed whose deployed model does not hack.)"]
    return "\n".join(rows)


RENDERERS: dict[str, Callable[[], str]] = {
    "locate": lambda: locate(load("locate_study.json")),
    "activation-table": lambda: activation_table(load("activation_study.json")),
    "activation-findings": lambda: activation_findings(load("activation_study.json")),
    "activation-sweeps": lambda: activation_sweeps(load("activation_study.json")),
    "demo": lambda: demo(load("demo.json")),
    "claims": lambda: claims(load("claims_study.json")),
    "claims-isolation": lambda: claims_isolation(load("claims_study.json")),
    "reroute": lambda: reroute(load("reroute_study.json")),
    "claims-sweeps": lambda: claims_sweeps(load("claims_sweeps.json")),
    "claims-lowhack": lambda: claims_lowhack(load("claims_lowhack.json")),
    "sft-anchoring": lambda: sft_anchoring(load("sft_anchoring.json")),
    "colour": lambda: colour(load("colour_anchoring.json")),
}


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with every results block re-rendered; and the names of blocks it has."""
    names: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        names.append(name)
        if name not in RENDERERS:
            raise KeyError(f"README block {name!r} has no renderer in tools/readme_results.py")
        return m.group(1) + RENDERERS[name]().rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(sub, text), names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="exit 1 if a block differs from its results file")
    g.add_argument("--write", action="store_true", help="rewrite the blocks in README.md")
    args = p.parse_args(argv)
    text = README.read_text()
    new, names = render(text)
    if args.write:
        README.write_text(new)
        print(f"rendered {len(names)} blocks: {', '.join(names)}")
        return 0
    if new != text:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md",
                                                   "README.md (rendered)"))
        return 1
    print(f"README.md: {len(names)} result blocks agree with docs/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
