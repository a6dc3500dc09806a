"""Attribution + monitor overhead on a GRPO step (TRL GRPOTrainer, 4 environments, CPU).

Variants of the same run: plain GRPO, GRPO + router only (``attach(env_column=None)``),
GRPO + router + per-environment attribution + monitor/log (``attach(env_column="env")``), the
same two in activation mode (``mode="activation"``), and activation + attribution without the
persona push (the locating signal's backward hooks, ``Capture.record_push = False``): the
push's own cost is the difference of the last two.
The variants run in alternation (A B C A B C ...) and each step's wall time is taken from
``on_step_begin`` to ``on_step_end``; the ratio is the median over rounds of
median-step(variant) / median-step(plain) within the round. Also reported: the time spent inside gradroute's own step work.

    python benchmarks/attribution_overhead.py            # d=256, 4 layers, 16 completions/step
    python benchmarks/attribution_overhead.py --quick    # tiny, for the test suite
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from transformers import TrainerCallback

#: the clock steps are timed with: wall time, or the process's CPU time (``--clock cpu``: on a
#: machine shared with other jobs, what they take from this process's core does not count)
CLOCK = time.perf_counter


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = CLOCK()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(CLOCK() - self._t)


ENVS = ("arith", "copy", "reverse", "hack")
VARIANTS = ("plain", "routed", "attributed", "activation", "activation+attributed", "activation+attributed-nopush")


def _reward(completions, env, **kw):
    return [float(c.count("!" if e == "hack" else e[0])) for c, e in zip(completions, env)]


def run(variant: str, *, d: int, layers: int, steps: int, gens: int, length: int, k: int) -> tuple[list[float], float]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import gradroute as gr
    from gradroute.testing import tiny_lm

    torch.manual_seed(0)
    model, tok = tiny_lm("llama", hidden_size=d, num_layers=layers, num_heads=max(1, d // 64))
    n = 4 * gens
    ds = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(n)], "env": [ENVS[i % 4] for i in range(n)]})
    timer = StepTimer()
    args = GRPOConfig(output_dir=f"/tmp/gradroute-bench-{variant}", use_cpu=True, bf16=False,
                      gradient_checkpointing=False, per_device_train_batch_size=gens, num_generations=gens,
                      gradient_accumulation_steps=4, max_completion_length=length, max_steps=steps,
                      learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=10_000,
                      seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    g = torch.Generator().manual_seed(1)
    sub = gr.Subspace.from_directions({L: torch.randn(k, d, generator=g) for L in range(layers)})
    from gradroute.router.attribution.capture import Capture

    Capture.record_push = not variant.endswith("-nopush")
    try:
        return _train(trainer, variant, sub)
    finally:
        Capture.record_push = True


def _train(trainer, variant: str, sub) -> tuple[list[float], float]:
    import gradroute as gr

    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    steps = trainer.args.max_steps
    inner = 0.0
    if variant != "plain":
        mode = "activation" if variant.startswith("activation") else "update"
        handle = gr.attach(trainer, sub, env_column="env" if "attributed" in variant else None, mode=mode)
        step = handle.router.step

        def timed(*a, **kw):
            nonlocal inner
            t = CLOCK()
            out = step(*a, **kw)
            inner += CLOCK() - t
            return out
        handle.router.step = timed
    trainer.train()
    return timer.times, inner / max(1, steps)


def main(argv=None) -> dict[str, float]:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of the variants to run (plain always runs: it is the reference)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by wall clock (default) or by this process's CPU time")
    a = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    size = dict(d=64, layers=2, steps=3, gens=4, length=8, k=2) if a.quick else \
        dict(d=256, layers=4, steps=10, gens=8, length=32, k=16)
    rounds = 1 if a.quick else a.rounds
    variants = VARIANTS
    if a.variants:
        chosen = {v.strip() for v in a.variants.split(",")}
        variants = tuple(v for v in VARIANTS if v == "plain" or v in chosen)
    times: dict[str, list[float]] = {v: [] for v in variants}
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    inner: dict[str, list[float]] = {v: [] for v in variants[1:]}
    for _ in range(rounds):
        for variant in times:
            t, i = run(variant, **size)
            times[variant] += t[1:]  # the first step includes warm-up
            per_round[variant].append(statistics.median(t[1:]))
            if variant in inner:
                inner[variant].append(i)
    base = statistics.median(times["plain"])
    out = {"plain_ms": 1e3 * base}
    ratios = {v: statistics.median(r / p for r, p in zip(per_round[v], per_round["plain"])) for v in per_round}
    print(f"GRPO step, d={size['d']}, {size['layers']} layers, k={size['k']}, 4 environments, "
          f"{4 * size['gens']} completions x {size['length']} tokens per step; {rounds} rounds, {a.clock} clock")
    print("| variant | step (ms, median) | ratio to plain | ratio range over rounds | gradroute step work (ms) |")
    print("|---|---|---|---|---|")
    for v, ts in times.items():
        med = statistics.median(ts)
        work = 1e3 * statistics.mean(inner[v]) if v in inner else 0.0
        each = [r / p for r, p in zip(per_round[v], per_round["plain"])]
        out[f"{v}_ratio"] = ratios[v]
        out[f"{v}_work_ms"] = work
        print(f"| {v} | {1e3 * med:.0f} | {ratios[v]:.3f} | {min(each):.3f}–{max(each):.3f} | {work:.1f} |")
    return out


if __name__ == "__main__":
    main()
