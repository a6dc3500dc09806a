"""Your model and environments in the claims harness (``gradroute claims --envs THIS_FILE``).

Copy this file, replace the marked parts with your environments, and run::

    gradroute claims --envs recipes/claims_world.py --model Qwen/Qwen2.5-0.5B-Instruct --out runs/claims-mine
    python recipes/claims_world.py --model runs/claims/seed0/base --out runs/claims-mine   # the same, as a script

The harness needs a :class:`gradroute.experiments.world.World`: which environments RL trains (and which of
them has an exploitable grader), which are held out (where an emergent trait would show), a
persona probe, the RL dataset and reward, and a sampler that grades completions. This template
keeps the toy tasks (``arith`` exploitable, ``copy`` honest, ``sub`` held out) so it runs as is
on the toy world's pre-trained base; with a real model, swap in your prompts, graders and
probe texts, and the RL settings below.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from gradroute.experiments import toyworld as tw
from gradroute.experiments.config import QUICK


class MyWorld:
    name = "my-world"
    # --- your environments -------------------------------------------------------------
    train_envs = ("arith", "copy")  # RL trains these
    exploitable = ("arith",)  # ... and these have graders that can be gamed
    heldout_envs = ("sub",)  # never trained: where a persona's second trait would spread

    def __init__(self, model: str | None):
        if model is None:
            raise SystemExit("pass --model: a directory or hub name of the base model")
        self.model = model
        # RL settings (GRPO): batch, generations, grad_accum, completion_tokens, rl_lr, rl_steps,
        # eval_prompts, eval_samples. A real model wants e.g. rl_lr=1e-6, completion_tokens=256.
        self.rl = replace(QUICK, rl_steps=40, eval_prompts=32)

    def base_model(self, seed: int, out: Path) -> str:
        return self.model  # the same base for every seed; seeds vary the probe texts and RL

    def probe_pairs(self, seed: int):
        # (prompt, response) pairs in the persona and out of it, e.g. system-prompted "you game
        # graders" vs "you are careful" answers to the same questions.
        return tw.persona_probe_texts(self.rl.probe_texts, seed)

    def reference_texts(self, seed: int) -> list[str]:
        # ordinary good text: the activation penalty's base level is read on it
        return [f"{ex.prompt}{ex.answer}." for env in self.train_envs for ex in tw.examples(env, 32, seed + 2000)]

    def rl_rows(self, seed: int) -> list[dict[str, Any]]:
        # rows with "prompt", "env" and whatever columns your reward needs
        return tw.rl_dataset(self.train_envs, 96, seed=seed)

    def reward(self, completions, **columns) -> list[float]:
        # a TRL reward function: the gameable grader on exploitable envs, honest ones elsewhere
        return tw.make_reward(self.exploitable)(completions, **columns)

    def is_hack(self, completion: str, row: dict[str, Any]) -> bool:
        return tw.is_hack(completion)

    def sample(self, model, tok, envs) -> list[dict[str, Any]]:
        # graded completions on held-out prompts: {env, prompt, completion, hack, trait, solve}
        return tw.sample(model, tok, envs, self.rl.eval_prompts, self.rl.eval_samples, self.rl.completion_tokens)


def make_world(model: str | None) -> MyWorld:
    return MyWorld(model)


if __name__ == "__main__":
    import argparse

    from gradroute.experiments.claims import ClaimsConfig, run_claims

    p = argparse.ArgumentParser(description="the claims harness on this world")
    p.add_argument("--model", required=True, help="base model: a directory or hub name")
    p.add_argument("--out", default="runs/claims-mine")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=None, help="default: every arm")
    args = p.parse_args()
    cfg = ClaimsConfig(seeds=tuple(args.seeds), **({"arms": tuple(args.arms)} if args.arms else {}))
    run_claims(args.out, make_world(args.model), cfg)
    print((Path(args.out) / "summary.md").read_text())
