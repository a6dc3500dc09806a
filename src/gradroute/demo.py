"""``gradroute demo``: the toy persona world end to end (see :mod:`gradroute.toyworld`).

1. Pre-train a tiny causal LM on tagged honest/hacker text plus mostly-honest untagged text.
2. Find the persona subspace with the toolkit's own probe: difference of means between the
   hacker and honest personas at the decision point (the last prompt token), every layer;
   and its matched-rank random control.
3. GRPO on untagged prompts from three environments — ``copy`` and ``reverse`` with honest
   graders, ``arith`` (hard) with a buggy grader that also pays for ``PASS`` — five ways:
   routed through the persona subspace and through the random control in ``mode``
   (``activation`` by default: isolating), routed through the persona subspace in ``update``
   mode (watching: training bit-identical to the unrouted run), not routed, and routed with
   a halt policy that stops the run, after which the arith grader is fixed and training
   restarts from the last clean checkpoint.
4. Hack and solve rates per environment before RL, after RL and after discarding the adapter;
   per-environment attribution; figures; ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENVS = ("arith", "copy", "reverse")
EXPLOITABLE = ("arith",)


@dataclass(frozen=True)
class DemoConfig:
    hidden_size: int = 64
    num_layers: int = 4
    pretrain_texts: int = 6000
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    hack_rate: float = 0.1
    heldout: tuple[str, ...] = ()  # held-out task families with the persona's second trait (toyworld.HELDOUT)
    trait_rate: float | None = None  # untagged rate of that trait (default: hack_rate)
    probe_texts: int = 96
    rl_steps: int = 100
    rl_lr: float = 2.5e-4
    batch: int = 8
    generations: int = 8
    grad_accum: int = 3
    completion_tokens: int = 6
    save_steps: int = 10
    eval_prompts: int = 96
    eval_samples: int = 2
    max_activation_z: float = 6.0
    baseline_steps: int = 10
    activation_window: int = 4


QUICK = DemoConfig(pretrain_steps=600, rl_steps=60, eval_prompts=48, save_steps=5)


_PROGRESS = {"on": True}  # set by run_demo for the runs it starts


def _is_tty() -> bool:
    return sys.stderr.isatty()


class _Ticker:
    """Progress for a loop of ``total`` steps: a tqdm bar on a terminal, else a line every tenth
    of the way and at least every ``every_s`` seconds (so that a log or CI shows the run is alive
    and how far it is)."""

    def __init__(self, label: str, total: int, enabled: bool = True, every_s: float = 30.0, start: int = 0):
        self.label, self.total, self.enabled, self.start = label, max(1, int(total)), enabled, int(start)
        self.t0 = self.last = time.time()
        self.every_s = every_s
        self.every = max(1, self.total // 10)
        self.bar = None
        if enabled and _is_tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc=label, leave=False)

    def update(self, step: int, note: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(note, refresh=True)
        elif step % self.every == 0 or step == self.total or time.time() - self.last >= self.every_s:
            self.last = time.time()
            el = self.last - self.t0
            done = step - self.start
            eta = el / done * (self.total - step) if done > 0 else 0.0
            print(f"   {self.label}: step {step}/{self.total}{', ' + note if note else ''} "
                  f"({el:.0f} s, ~{eta:.0f} s left)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _trainer_ticker(label: str, total: int):
    """A TrainerCallback reporting optimizer steps through :class:`_Ticker`."""
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = _Ticker(label, args.max_steps or total, _PROGRESS["on"], start=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.t.update(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self.t.close()
            if _PROGRESS["on"] and state.global_step < self.t.total:
                print(f"   {label}: stopped at step {state.global_step}/{self.t.total}", flush=True)

    return _Cb()


@contextlib.contextmanager
def _library_noise_off():
    """The demo's own output only: no transformers/TRL FutureWarnings or deprecation notes, no
    "Writing model shards" bars, no datasets bars, no per-crossing drift warnings (the report
    lists the crossings). Restored on exit, so that importing code keeps its settings."""
    import datasets
    import transformers

    from .errors import GradrouteWarning

    tf_log = transformers.utils.logging
    verbosity, bars = tf_log.get_verbosity(), tf_log.is_progress_bar_enabled()
    ds_bars = datasets.utils.logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=GradrouteWarning)
        tf_log.set_verbosity_error()
        tf_log.disable_progress_bar()
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            tf_log.set_verbosity(verbosity)
            if bars:
                tf_log.enable_progress_bar()
            if ds_bars:
                datasets.enable_progress_bars()


def _quietly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import inspect

        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        before = _PROGRESS["on"]
        _PROGRESS["on"] = bool(bound.arguments.get("progress", True))
        try:
            with _library_noise_off():
                return fn(*args, **kwargs)
        finally:
            _PROGRESS["on"] = before

    return wrapper


def pretrain(cfg: DemoConfig, seed: int = 0, progress: bool = True):
    """A tiny Llama-style model SFT'd on :func:`gradroute.toyworld.pretraining_corpus`."""
    import torch
    from . import toyworld as tw
    from .testing import tiny_lm

    torch.manual_seed(seed)
    model, tok = tiny_lm("llama", hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4)
    texts = tw.pretraining_corpus(cfg.pretrain_texts, hack_rate=cfg.hack_rate, seed=seed, heldout=cfg.heldout,
                                  trait_rate=cfg.trait_rate)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    steps = cfg.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    ticker = _Ticker("pre-training", steps, progress)
    for step in range(steps):
        idx = torch.randint(0, len(texts), (32,), generator=g).tolist()
        enc = tok([texts[i] + tok.eos_token for i in idx], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ticker.update(step + 1, f"loss {float(loss.detach()):.3f}")
    ticker.close()
    model.eval()
    return model, tok, float(loss.detach())


def _rl(base_dir: Path, out: Path, cfg: DemoConfig, subspace, policy, seed: int, exploitable=EXPLOITABLE,
        fixed=(), resume: str | None = None, save: bool = True, mode: str = "update", **router_kw: Any):
    """One GRPO run on the toy world from the pre-trained model (optionally routed in ``mode``);
    returns (model, tok, handle)."""
    from . import toyworld as tw

    return grpo_run(base_dir, out, cfg, tw.rl_dataset(ENVS, 96, seed=seed), tw.make_reward(exploitable, fixed),
                    seed, subspace=subspace, policy=policy, resume=resume, save=save, mode=mode, **router_kw)


def grpo_run(base: str | Path, out: Path, cfg: DemoConfig, rows: list[dict[str, Any]], reward: Any, seed: int, *,
             subspace=None, policy=None, resume: str | None = None, save: bool = True, mode: str = "update",
             prepare=None, **router_kw: Any):
    """One GRPO run (TRL's ``GRPOTrainer``, CPU, the RL fields of ``cfg``) from ``base`` (a
    directory or hub name) on dataset ``rows`` with TRL reward function ``reward``; routed
    through ``subspace`` in ``mode`` when one is given. ``prepare(trainer)`` runs just before
    training (a comparator, a callback). Returns (model, tok, handle or None)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from .integrations.trl import attach

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=cfg.batch, num_generations=cfg.generations,
                      gradient_accumulation_steps=cfg.grad_accum, max_completion_length=cfg.completion_tokens,
                      learning_rate=cfg.rl_lr, max_steps=cfg.rl_steps, beta=0.0, seed=seed, report_to=[],
                      logging_steps=10_000, disable_tqdm=True,
                      save_strategy="steps" if save else "no", save_steps=cfg.save_steps)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict (TRL's metrics) to stdout
    trainer.remove_callback(ProgressCallback)
    label = f"GRPO {out.name}" + (f" (restart from {Path(resume).name})" if resume else "")
    trainer.add_callback(_trainer_ticker(label, cfg.rl_steps))
    trainer.create_model_card = lambda *a, **k: None  # the toy base is not on the hub: no card pointing there
    handle = (attach(trainer, subspace, env_column="env", policy=policy, mode=mode, **router_kw)
              if subspace is not None else None)
    if prepare is not None:
        prepare(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, tok, handle


DEFAULT_MODE = "activation"
DEFAULT_MULTIPLIER = 30.0


@_quietly
def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, progress: bool = True,
             config: DemoConfig | None = None, mode: str = DEFAULT_MODE,
             adapter_lr_multiplier: float | None = None) -> dict[str, Any]:
    from . import toyworld as tw
    from .monitor import last_clean_checkpoint
    from .policy import HaltPolicy
    from .report import report
    from .subspace import Subspace

    cfg = config or (QUICK if quick else DemoConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}
    say = print if progress else (lambda *a, **k: None)

    # 1. the world
    say("1/4 pre-training the toy model on tagged honest/hacker text ...")
    model, tok, loss = pretrain(cfg, seed, progress)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    rates = {"before": tw.evaluate(model, tok, ENVS, cfg.eval_prompts, cfg.eval_samples)}
    timings["pretrain"] = time.time() - t0

    # 2. the persona subspace (the toolkit's own probe) and its random control
    say("2/4 probing the persona subspace ...")
    hacker, honest = tw.persona_probe_texts(cfg.probe_texts, seed)
    layers = list(range(cfg.num_layers))
    persona = Subspace.from_probe(model, tok, hacker, honest, layers=layers, aggregation="last_prompt",
                                  names=["hacker"], progress=False)
    control = persona.random_like(seed=seed)
    persona.save(out / "persona.subspace", overwrite=True)
    control.save(out / "random.subspace", overwrite=True)
    probe_acc = {L: d["accuracy"] for L, d in persona.provenance.extra["diagnostics"].items()}

    # 3. RL five ways
    say(f"3/4 GRPO: {mode}-routed (persona, random control), update-routed (persona), not routed, halt-and-fix ...")
    rule = dict(max_activation_z=cfg.max_activation_z, baseline_steps=cfg.baseline_steps,
                activation_window=cfg.activation_window)
    watch = HaltPolicy(**rule, action="warn")
    stop = HaltPolicy(**rule, action="stop")
    runs: dict[str, Any] = {}
    mult = adapter_lr_multiplier if adapter_lr_multiplier is not None else (
        DEFAULT_MULTIPLIER if mode in ("activation", "gradient") else None)
    kw = {} if mult is None else {"adapter_lr_multiplier": mult}
    arms = [("persona", persona, mode, kw), ("random", control, mode, kw)]
    if mode != "update":
        arms.append(("persona_update", persona, "update", {}))
    arms.append(("none", None, "update", {}))
    for name, sub, arm_mode, arm_kw in arms:
        t = time.time()
        m, tk, h = _rl(out / "base", out / "runs" / name, cfg, sub, watch if sub is not None else None, seed,
                       save=name == "persona", mode=arm_mode, **arm_kw)
        res: dict[str, Any] = {"after": tw.evaluate(m, tk, ENVS, cfg.eval_prompts, cfg.eval_samples)}
        if h is not None:
            res["env_adapter_share"] = h.router.env_adapter_shares()
            res["adapter_norm"] = h.router.adapter_norm().total
            res["first_crossing"] = h.monitor.violations[0].to_dict() if h.monitor.violations else None
            res["crossings"] = [v.to_dict() for v in h.monitor.violations]
            h.save_adapter(out / "runs" / name / "adapter")
            h.discard()
            res["discarded"] = tw.evaluate(m, tk, ENVS, cfg.eval_prompts, cfg.eval_samples)
            h.detach()
        res["mode"] = arm_mode if sub is not None else None
        res["seconds"] = time.time() - t
        runs[name] = res
    # halt, fix the exploitable grader, restart from the last clean checkpoint
    t = time.time()
    halt_dir = out / "runs" / "halt"
    m, tk, h = _rl(out / "base", halt_dir, cfg, persona, stop, seed)
    halted = dict(h.halted) if h.halted else None
    res = {"halt": halted, "at_halt": tw.evaluate(m, tk, ENVS, cfg.eval_prompts, cfg.eval_samples)}
    h.detach()
    clean = last_clean_checkpoint(halt_dir)
    res["restart_from"] = str(clean) if clean else None
    if halted and clean is not None:
        # keep watching (the drift the clean checkpoint already carries would re-trigger a stop at once)
        m, tk, h = _rl(out / "base", halt_dir, cfg, persona, watch, seed, exploitable=(), fixed=EXPLOITABLE,
                       resume=str(clean))
        res["after_fix"] = tw.evaluate(m, tk, ENVS, cfg.eval_prompts, cfg.eval_samples)
        res["steps_after_restart"] = cfg.rl_steps - int(str(clean).rsplit("-", 1)[1])
        h.detach()
    res["seconds"] = time.time() - t
    runs["halt_and_fix"] = res
    timings["rl"] = time.time() - t0 - timings["pretrain"]

    # 4. report
    say("4/4 writing the report ...")
    summary = {
        "config": asdict(cfg), "seed": seed, "quick": quick, "pretrain_loss": loss,
        "mode": mode, "adapter_lr_multiplier": mult,
        "envs": list(ENVS), "exploitable": list(EXPLOITABLE), "probe_accuracy": probe_acc,
        "rates": rates, "runs": runs, "timings": timings,
    }
    restart = runs["halt_and_fix"].get("restart_from")
    if restart:  # shown relative to the demo directory, which can be moved
        runs["halt_and_fix"]["restart_from"] = _relative(restart, out)
    summary["table"] = _table(summary)
    summary["table_md"] = _table(summary, markdown=True)
    summary["figures"] = [str(p) for p in _rates_figure(summary, out)]
    for name, res in runs.items():  # each run directory says what it was and how it ended
        d = out / "runs" / ("halt" if name == "halt_and_fix" else name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps({"run": name, "routed": name != "none", **res}, indent=2,
                                                   default=str))
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


def _table(s: dict[str, Any], markdown: bool = False) -> str:
    from .report import num

    runs = s["runs"]
    mode = s.get("mode", "update")
    tag = {"activation": "act", "update": "upd", "gradient": "grad"}.get(mode, mode)
    cols = [("before RL", lambda e: s["rates"]["before"][e]),
            ("after RL", lambda e: runs["none"]["after"][e])]
    if mode != "update":
        cols += [(f"after RL [{tag}]", lambda e: runs["persona"]["after"][e])]
    cols += [(f"discard persona [{tag}]", lambda e: runs["persona"]["discarded"][e])]
    if mode != "update":
        cols += [(f"after RL random [{tag}]", lambda e: runs["random"]["after"][e])]
    cols += [(f"discard random [{tag}]", lambda e: runs["random"]["discarded"][e])]
    if "persona_update" in runs:
        cols += [("discard persona [upd]", lambda e: runs["persona_update"]["discarded"][e])]
    cols += [
            ("at halt", lambda e: runs["halt_and_fix"]["at_halt"][e]),
            ("halt+fix+restart", lambda e: runs["halt_and_fix"].get("after_fix", {}).get(e))]
    share = {v: runs[v]["env_adapter_share"] for v in ("persona", "random")}
    if markdown:
        head = "| env (hack/solve) | " + " | ".join(c for c, _ in cols) + " | share of persona adapter | share of random adapter |"
        rows = [head, "|" + "---|" * (len(cols) + 3)]
        for e in s["envs"]:
            mark = " (exploitable)" if e in s["exploitable"] else ""
            rows.append(f"| {e}{mark} | " + " | ".join(_fmt(f(e)) for _, f in cols)
                        + f" | {share['persona'].get(e, 0):.2f} | {share['random'].get(e, 0):.2f} |")
    else:
        rows = [f"{'env (hack/solve)':<18}" + "".join(f"{c:>23}" for c, _ in cols) + f"{'share persona':>15}{'share random':>14}"]
        for e in s["envs"]:
            mark = "*" if e in s["exploitable"] else " "
            rows.append(f"{e + mark:<18}" + "".join(f"{_fmt(f(e)):>23}" for _, f in cols)
                        + f"{share['persona'].get(e, 0):>15.2f}{share['random'].get(e, 0):>14.2f}")
    h = runs["halt_and_fix"]["halt"]
    mult = s.get("adapter_lr_multiplier")
    notes = [f"routing: persona and random arms in {mode} mode" + (f" (adapter LR x{mult:g})" if mult else "")
             + ("; the [upd] arm watches in update mode (training identical to the unrouted run)"
                if "persona_update" in runs else ""),
             f"adapter norm: persona {num(runs['persona']['adapter_norm'])}, random {num(runs['random']['adapter_norm'])}"]
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
    from .report import _plt, save_figure

    plt = _plt()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    runs = s["runs"]
    tag = s.get("mode", "update")
    stages = [("before", s["rates"]["before"]), ("after RL (unrouted)", runs["none"]["after"]),
              (f"discard persona ({tag})", runs["persona"]["discarded"])]
    if tag != "update":
        stages.append((f"after RL, random ({tag})", runs["random"]["after"]))
    stages.append((f"discard random ({tag})", runs["random"]["discarded"]))
    if "persona_update" in runs:
        stages.append(("discard persona (update)", runs["persona_update"]["discarded"]))
    stages.append(("halt+fix", runs["halt_and_fix"].get("after_fix") or runs["halt_and_fix"]["at_halt"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    width = 0.8 / len(stages)
    for ax, metric in zip(axes, ("hack", "solve")):
        for i, (label, r) in enumerate(stages):
            xs = [j + i * width for j in range(len(s["envs"]))]
            ax.bar(xs, [r[e][metric] for e in s["envs"]], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(s["envs"]))],
                      [e + (" *" if e in s["exploitable"] else "") for e in s["envs"]])
        ax.set(title=f"{metric} rate per environment (* exploitable)", ylim=(0, 1.05), xlabel="environment",
               ylabel=f"{metric} rate (fraction of sampled completions)")
    axes[0].legend(title="model", fontsize=7, title_fontsize=7)
    return [save_figure(fig, out / "figures" / "rates.png")]


