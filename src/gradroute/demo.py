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
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
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
    import transformers

    from .errors import GradrouteWarning
    from .integrations.transformers import library_bars_off

    with warnings.catch_warnings(), library_bars_off():
        for category in (FutureWarning, DeprecationWarning, UserWarning, GradrouteWarning):
            warnings.filterwarnings("ignore", category=category)
        transformers.utils.logging.set_verbosity_error()
        yield


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


@contextlib.contextmanager
def one_thread():
    """Torch on one thread while the block runs (restored after).

    The demo's numbers then do not depend on the machine's core count (float reductions split
    over threads round differently, and RL trajectories follow the round-off), and a loaded
    2-core machine runs it far faster: two competing torch threads ran ~25x slower than one.
    Parallelism comes from running independent arms as separate processes (``jobs``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        _PROGRESS["on"] = progress
        with one_thread(), _library_noise_off(), worker_output(arm.name):
            return _run_arm(out, cfg, seed, arm, fingerprint, progress)
    from . import toyworld as tw
    from .monitor import last_clean_checkpoint
    from .policy import HaltPolicy
    from .subspace import Subspace

    t = time.time()
    # an interrupted or outdated attempt: its log must not be continued, nor its checkpoints resumed from
    shutil.rmtree(_arm_result_file(out, arm).parent, ignore_errors=True)
    rule = dict(max_activation_z=cfg.max_activation_z, baseline_steps=cfg.baseline_steps,
                activation_window=cfg.activation_window)
    watch, stop = HaltPolicy(**rule, action="warn"), HaltPolicy(**rule, action="stop")
    sub = Subspace.load(out / arm.subspace) if arm.subspace else None

    def ev(m, tk):
        return tw.evaluate(m, tk, ENVS, cfg.eval_prompts, cfg.eval_samples)

    if arm.halt:  # halt, fix the exploitable grader, restart from the last clean checkpoint
        halt_dir = out / "runs" / "halt"
        m, tk, h = _rl(out / "base", halt_dir, cfg, sub, stop, seed)
        halted = dict(h.halted) if h.halted else None
        if halted and halted.get("checkpoint"):  # relative to the demo directory, which can be moved
            halted["checkpoint"] = _relative(halted["checkpoint"], out)
        res: dict[str, Any] = {"halt": halted, "at_halt": ev(m, tk)}
        h.detach()
        clean = last_clean_checkpoint(halt_dir)
        res["restart_from"] = _relative(clean, out) if clean else None
        if halted and clean is not None:
            # keep watching (the drift the clean checkpoint already carries would re-trigger a stop at once)
            m, tk, h = _rl(out / "base", halt_dir, cfg, sub, watch, seed, exploitable=(), fixed=EXPLOITABLE,
                           resume=str(clean))
            res["after_fix"] = ev(m, tk)
            res["steps_after_restart"] = cfg.rl_steps - int(str(clean).rsplit("-", 1)[1])
            h.detach()
    else:
        m, tk, h = _rl(out / "base", out / "runs" / arm.name, cfg, sub, watch if sub is not None else None, seed,
                       save=arm.save, mode=arm.mode, **dict(arm.kw))
        res = {"after": ev(m, tk)}
        if h is not None:
            res["env_adapter_share"] = h.router.env_adapter_shares()
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


@_quietly
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
    from . import toyworld as tw
    from ._version import __version__
    from .report import report
    from .subspace import Subspace

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
    arms += [_Arm("none", None), _Arm("halt_and_fix", "persona.subspace", halt=True)]
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


# ------------------------------------------------------------------ worker processes (``jobs``)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_WORKER = {"on": False}  # set in worker processes


def cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_init() -> None:
    """A worker process: one torch thread (set before torch is imported; see :func:`one_thread`);
    Ctrl-C is the parent's to handle (it terminates the workers)."""
    import signal

    os.environ.update({v: "1" for v in THREAD_VARS})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["on"] = True
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def worker_pool(jobs: int) -> Iterator[Any]:
    """A ``multiprocessing`` pool of ``jobs`` spawned worker processes with one torch thread each;
    an error or Ctrl-C in the parent terminates them (no queued task runs on)."""
    import multiprocessing

    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update({v: "1" for v in THREAD_VARS})  # inherited: set before a worker imports anything
    try:
        pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init)
    finally:
        for v, x in saved.items():
            if x is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = x
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def drain(pending: dict[Any, Any], done: Callable[[Any, Any], None], poll_s: float = 0.2) -> None:
    """Wait for the async results in ``pending`` (key -> result), calling ``done(key, value)`` as each
    finishes (it may add more); a task's error is raised here."""
    while pending:
        ready = [k for k, r in pending.items() if r.ready()]
        for k in ready:
            done(k, pending.pop(k).get())
        if not ready:
            time.sleep(poll_s)


class _Prefixed:
    """A text stream writing every line to ``stream`` with ``prefix`` before it; not a terminal,
    so progress comes as lines, never as tqdm bars."""

    def __init__(self, stream: Any, prefix: str):
        self.stream, self.prefix, self.partial = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text.replace("\r", "\n")).split("\n")
        for line in lines:
            if line.strip():
                self.stream.write(f"{self.prefix}{line.strip()}\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def worker_output(label: str) -> Iterator[None]:
    """In a worker process: output lines prefixed with ``[label]`` (parallel workers stay readable),
    and a GradrouteError raised inside reaches the parent as the same error. Elsewhere: nothing."""
    if not _WORKER["on"]:
        yield
        return
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_Prefixed(st, f"   [{label}] ") for st in streams)
    try:
        yield  # a GradrouteError pickles as itself (GradrouteError.__reduce__)
    finally:
        sys.stdout, sys.stderr = streams


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
    from .report import num

    runs = s["runs"]
    mode = s.get("mode", "update")
    cols = [(label, lambda e, r=r: None if r is None else r.get(e)) for label, r in _stages(s)]
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
    """Hack and solve rates per environment at every stage of the table (same columns, same order)."""
    from .report import _plt, save_figure

    plt = _plt()
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
