"""Does discarding the persona adapter undo what RL learned? The toy persona world, measured.

Arms (per seed, same pre-trained model, same persona probe):
- ``update/<sub>``: update-mode routing (watching). Training is bit-identical to unrouted RL,
  so its "after RL" rates are the unrouted run's; its "discarded" rates are update-mode discard.
- ``activation/<sub>@<m>``: activation-mode routing (isolating), adapter LR multiplier m.
- ``<sub>`` is the persona subspace (diff-means k=1, or paired PCA k=2/4/8) or its matched
  random control (``Subspace.random_like``, same rank per layer).
Also the causal ceiling: suppressing the subspace's positive component at every layer at
inference on the unrouted model.

    python recipes/activation_study.py --seeds 0 1 2 --out runs/activation_study
    python recipes/activation_study.py --quick --seeds 0 --mults 10 --subspaces dm1   # a smoke run

Writes ``results.json`` (every arm, seed, environment) and ``summary.md`` (medians and ranges).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

ENVS = ("arith", "copy", "reverse")
EXPLOITABLE = "arith"


def probe(model, tok, cfg, seed: int, kind: str, layers):
    import gradroute as gr
    from gradroute.experiments import toyworld as tw

    hacker, honest = tw.persona_probe_texts(cfg.probe_texts, seed)
    if kind == "dm1":
        return gr.Subspace.from_probe(model, tok, hacker, honest, layers=layers, aggregation="last_prompt",
                                      names=["hacker"], progress=False)
    k = int(kind.removeprefix("pca"))
    return gr.Subspace.from_probe(model, tok, hacker, honest, layers=layers, aggregation="last_prompt",
                                  method="pca", k=k, progress=False)


def ceiling(model, tok, cfg, sub) -> dict[str, Any]:
    from gradroute.experiments import toyworld as tw
    from gradroute.interventions import suppress_all

    with suppress_all(model, sub):
        return tw.evaluate(model, tok, ENVS, cfg.eval_prompts, cfg.eval_samples)


def rewards(run_dir: Path) -> dict[str, float]:
    """Mean reward per environment over the last 20 logged steps."""
    from gradroute.monitor import load_log

    log = load_log(run_dir)
    cols = [c for c in log.columns if c.startswith("reward.")]
    tail = log.sort_values("step").tail(20)
    return {c.split(".", 1)[1]: float(tail[c].mean()) for c in cols}


def run_arm(base_dir: Path, out: Path, cfg, sub, mode: str, seed: int, mult: float | None,
            with_ceiling: bool = False) -> dict[str, Any]:
    from gradroute.experiments import toyworld as tw
    from gradroute.experiments.grpo import toy_grpo_run

    kw = {} if mult is None else {"adapter_lr_multiplier": mult}
    t = time.time()
    model, tok, h = toy_grpo_run(base_dir, out, cfg, sub, None, seed, save=False, mode=mode, **kw)
    res: dict[str, Any] = {"after": tw.evaluate(model, tok, ENVS, cfg.eval_prompts, cfg.eval_samples)}
    if with_ceiling:
        res["suppressed"] = ceiling(model, tok, cfg, sub)
    res["env_adapter_share"] = h.router.env_adapter_shares()
    res["adapter_norm"] = h.router.adapter_norm().total
    res["reward"] = rewards(out)
    h.discard()
    res["discarded"] = tw.evaluate(model, tok, ENVS, cfg.eval_prompts, cfg.eval_samples)
    h.detach()
    res["seconds"] = time.time() - t
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/activation_study", help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world seeds (pre-training, probe, RL)")
    p.add_argument("--mults", type=float, nargs="+", default=[1, 3, 10, 30],
                   help="adapter LR multipliers for activation mode")
    p.add_argument("--subspaces", nargs="+", default=["dm1"], help="dm1 (diff-means, k=1) and/or pcaK (paired PCA, rank K)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="probe layers (default: every layer)")
    p.add_argument("--no-random", action="store_true", help="skip the matched random controls")
    p.add_argument("--quick", action="store_true", help="the demo's quick configuration")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from gradroute.experiments import toyworld as tw
    from gradroute.experiments.config import QUICK, DemoConfig
    from gradroute.experiments.grpo import pretrain

    cfg = QUICK if args.quick else DemoConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": vars(args), "seeds": {}}
    path = out / "results.json"
    for seed in args.seeds:
        sd = out / f"seed{seed}"
        model, tok, _ = pretrain(cfg, seed, progress=False)
        model.save_pretrained(sd / "base")
        tok.save_pretrained(sd / "base")
        layers = args.layers if args.layers else list(range(cfg.num_layers))
        seed_res: dict[str, Any] = {"before": tw.evaluate(model, tok, ENVS, cfg.eval_prompts, cfg.eval_samples), "arms": {}}
        for kind in args.subspaces:
            persona = probe(model, tok, cfg, seed, kind, layers)
            subs = {kind: persona} if args.no_random else {kind: persona, f"random-{kind}": persona.random_like(seed=seed)}
            for sname, sub in subs.items():
                name = f"update/{sname}"
                print(f"seed {seed}: {name} ...", flush=True)
                seed_res["arms"][name] = run_arm(sd / "base", sd / name.replace("/", "_"), cfg, sub, "update", seed,
                                                 None, with_ceiling=True)
                for m in args.mults:
                    name = f"activation/{sname}@{m:g}"
                    print(f"seed {seed}: {name} ...", flush=True)
                    seed_res["arms"][name] = run_arm(sd / "base", sd / name.replace("/", "_").replace("@", "_"), cfg,
                                                     sub, "activation", seed, m)
                results["seeds"][str(seed)] = seed_res
                path.write_text(json.dumps(results, indent=1))
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    figure(results, out / "activation_study.png")
    print(summary)
    return results


def _med(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}–{max(xs):.2f}]"


def summarize(results: dict[str, Any]) -> str:
    """Medians [min–max] over seeds, per arm."""
    seeds = list(results["seeds"].values())
    arms = list(dict.fromkeys(a for s in seeds for a in s["arms"]))
    head = ("| arm | arith hack after → discarded | relative cut | copy solve after → discarded | "
            "reverse solve after → discarded | arith share of adapter | adapter norm |")
    rows = [head, "|" + "---|" * 7]
    for a in arms:
        rs = [s["arms"][a] for s in seeds if a in s["arms"]]
        ha = [r["after"][EXPLOITABLE]["hack"] for r in rs]
        hd = [r["discarded"][EXPLOITABLE]["hack"] for r in rs]
        cut = [1 - d / x if x > 0 else 0.0 for x, d in zip(ha, hd)]
        cs = [(r["after"]["copy"]["solve"], r["discarded"]["copy"]["solve"]) for r in rs]
        rv = [(r["after"]["reverse"]["solve"], r["discarded"]["reverse"]["solve"]) for r in rs]
        share = [r["env_adapter_share"].get(EXPLOITABLE, 0.0) for r in rs]
        norm = [r["adapter_norm"] for r in rs]
        rows.append(f"| {a} | {_med(ha)} → {_med(hd)} | {_med(cut)} | {_med([c[0] for c in cs])} → {_med([c[1] for c in cs])} "
                    f"| {_med([c[0] for c in rv])} → {_med([c[1] for c in rv])} | {_med(share)} | {_med(norm)} |")
    ceil = [(s["arms"][a]["suppressed"][EXPLOITABLE]["hack"], a) for s in seeds for a in s["arms"] if "suppressed" in s["arms"][a]]
    lines = ["\n".join(rows), "", "Causal ceiling (unrouted model, subspace suppressed at every layer at inference):"]
    for a in arms:
        vals = [s["arms"][a]["suppressed"][EXPLOITABLE]["hack"] for s in seeds if a in s["arms"] and "suppressed" in s["arms"][a]]
        if vals:
            lines.append(f"- {a.split('/', 1)[1]}: arith hack {_med([s['arms'][a]['after'][EXPLOITABLE]['hack'] for s in seeds if a in s['arms']])} → {_med(vals)}")
    del ceil
    before = [s["before"][EXPLOITABLE]["hack"] for s in seeds]
    lines.append(f"\nBefore RL: arith hack {_med(before)}; {len(seeds)} seed(s).")
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any], path: Path) -> Path:
    """Arith hack rate after RL and after discard, per arm: median over seeds, bars = range."""
    from gradroute.report import pyplot, save_figure

    plt = pyplot()
    seeds = list(results["seeds"].values())
    arms = list(dict.fromkeys(a for s in seeds for a in s["arms"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(arms) + 2), 3.8))
    for j, (key, label, colour) in enumerate((("after", "after RL", "tab:orange"),
                                               ("discarded", "after discarding the adapter", "tab:green"))):
        vals = [[s["arms"][a][key][EXPLOITABLE]["hack"] for s in seeds if a in s["arms"]] for a in arms]
        med = [statistics.median(v) for v in vals]
        lo = [m - min(v) for m, v in zip(med, vals)]
        hi = [max(v) - m for m, v in zip(med, vals)]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(arms))]
        ax.bar(xs, med, 0.38, yerr=[lo, hi], capsize=3, label=label, color=colour)
    ax.set_xticks(range(len(arms)), [a.replace("activation/", "act/").replace("random-", "rand-") for a in arms],
                  rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=f"{EXPLOITABLE} hack rate", ylim=(0, 1.05),
           title=f"{EXPLOITABLE} (exploitable): hack rate, median over {len(seeds)} seeds (bars: range)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
