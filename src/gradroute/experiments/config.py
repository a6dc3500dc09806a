"""The toy world's settings: pre-training, probe, GRPO, evaluation and the demo's halt rule."""

from __future__ import annotations

from dataclasses import dataclass


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
    save_steps: int = 5
    eval_prompts: int = 96
    eval_samples: int = 2
    max_push_z: float = 6.0  # the halt rule: an environment's locating score (the locate study's choice)
    push_min_steps: int = 3


QUICK = DemoConfig(pretrain_steps=600, rl_steps=60, eval_prompts=48, save_steps=2)
