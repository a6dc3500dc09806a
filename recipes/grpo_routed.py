"""GRPO with gradroute: route, attribute and monitor persona-subspace updates per environment.

A TRL-style script: every option is a command-line flag or a YAML key (``--config``), the
GRPOConfig fields included. The dataset has a ``prompt`` column, an environment column and
whatever the reward functions need; the rewards file maps each environment to its reward
function (see ``recipes/rewards.py``).

    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml
    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml --control random   # matched-rank control
    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml --no_route         # un-routed baseline

``--model_name_or_path`` takes any HF model name or path (``tiny:llama`` builds a tiny local
test model). The run directory (``--output_dir``) gets the gradroute log, checkpoints with
router state, ``summary.json`` and, with ``--save_adapter``, the PEFT adapter.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RouteArguments:
    model_name_or_path: str = field(default="tiny:llama", metadata={"help": "HF model name or path, or tiny:<arch>"})
    dataset: str = field(default="recipes/data/toy_envs.jsonl", metadata={"help": "jsonl/csv file or saved dataset"})
    rewards: str = field(default="recipes/rewards.py", metadata={"help": "python file defining REWARDS = {env: fn}"})
    subspace: str | None = field(default=None, metadata={"help": "subspace directory (gradroute subspace build)"})
    env_column: str = "env"
    route_mode: str = field(default="update", metadata={"help": "update or gradient"})
    control: str = field(default="none", metadata={"help": "none or random (matched-rank random subspace)"})
    control_seed: int = 0
    no_route: bool = field(default=False, metadata={"help": "train without gradroute (the baseline)"})
    max_adapter_norm: float | None = None
    max_env_share: float | None = None
    env_share_min_norm: float = 0.0
    max_growth: float | None = None
    growth_window: int = 10
    max_activation_z: float | None = None
    halt_action: str = "stop"
    save_adapter: str | None = field(default=None, metadata={"help": "write the PEFT adapter here at the end"})


def load_rewards(path: str, env_column: str) -> Any:
    spec = importlib.util.spec_from_file_location("gradroute_recipe_rewards", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import rewards file {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    per_env = getattr(mod, "REWARDS", None)
    if not isinstance(per_env, dict) or not per_env:
        raise SystemExit(f"{path} must define REWARDS = {{env_name: reward_function}}")

    def env_reward(completions, **columns):
        envs = columns[env_column]
        out: list[float | None] = [None] * len(completions)
        for env in set(envs):
            if env not in per_env:
                raise SystemExit(f"no reward function for environment {env!r} in {path}")
            idx = [i for i, e in enumerate(envs) if e == env]
            sub = {k: [v[i] for i in idx] for k, v in columns.items()
                   if isinstance(v, list) and len(v) == len(completions)}
            for i, r in zip(idx, per_env[env]([completions[i] for i in idx], **sub)):
                out[i] = r
        return out

    return env_reward


def load_data(path: str) -> Any:
    from datasets import load_dataset, load_from_disk

    p = Path(path)
    if p.is_dir():
        return load_from_disk(path)
    if p.suffix in (".jsonl", ".json"):
        return load_dataset("json", data_files=path, split="train")
    if p.suffix == ".csv":
        return load_dataset("csv", data_files=path, split="train")
    return load_dataset(path, split="train")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trl import GRPOConfig, GRPOTrainer, TrlParser

    import gradroute as gr
    from gradroute.integrations.transformers import load_model_and_tokenizer

    parser = TrlParser((RouteArguments, GRPOConfig))
    ra, cfg = parser.parse_args_and_config(argv)
    model, tok = load_model_and_tokenizer(ra.model_name_or_path)
    trainer = GRPOTrainer(model=model, reward_funcs=load_rewards(ra.rewards, ra.env_column), args=cfg,
                          train_dataset=load_data(ra.dataset), processing_class=tok)
    handle = None
    if not ra.no_route:
        if ra.subspace is None:
            raise SystemExit("--subspace is required unless --no_route (build one with `gradroute subspace build`)")
        sub = gr.Subspace.load(ra.subspace)
        if ra.control == "random":
            sub = sub.random_like(seed=ra.control_seed)
        elif ra.control != "none":
            raise SystemExit(f"--control must be none or random, got {ra.control!r}")
        policy = gr.HaltPolicy(max_adapter_norm=ra.max_adapter_norm, max_env_share=ra.max_env_share,
                               env_share_min_norm=ra.env_share_min_norm, max_growth=ra.max_growth,
                               growth_window=ra.growth_window, max_activation_z=ra.max_activation_z,
                               action=ra.halt_action)
        handle = gr.attach(trainer, sub, env_column=ra.env_column, policy=policy, mode=ra.route_mode)
    trainer.train()
    summary: dict[str, Any] = {"steps": trainer.state.global_step, "routed": handle is not None, "control": ra.control}
    if handle is not None:
        summary.update(
            adapter_norm=handle.router.adapter_norm().total,
            env_adapter_share=handle.router.env_adapter_shares(),
            halt=handle.halted,
            last_clean_checkpoint=str(handle.last_clean_checkpoint()),
        )
        if ra.save_adapter:
            handle.save_adapter(ra.save_adapter)
            summary["adapter"] = ra.save_adapter
    if trainer.is_world_process_zero():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
