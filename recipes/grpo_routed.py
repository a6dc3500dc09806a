"""GRPO with gradroute, shaped like TRL's own ``trl/scripts/grpo.py``.

The arguments are TRL's (``ScriptArguments`` + ``--reward_funcs``/``--reward_model_name_or_path``
as in ``grpo.py``, ``GRPOConfig``, ``ModelConfig`` with ``--use_peft``/``--lora_*``/``--dtype``,
``get_peft_config``) plus one dataclass of ``--gradroute_*`` flags; every flag is also a YAML
key (``--config``). The dataset (``--dataset_name``: a hub name, a saved dataset directory or
a jsonl/csv file) has a ``prompt`` column and an environment column; rewards come from
``--reward_funcs`` (TRL's names or dotted import paths) and/or ``--gradroute_rewards``, a
file mapping each environment to its reward function (see ``recipes/rewards.py``).

    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml
    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml --gradroute_control random   # control
    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml --gradroute_no_route true    # baseline
    python recipes/grpo_routed.py --config recipes/configs/grpo_tiny.yaml --use_peft true              # LoRA policy
    python recipes/grpo_routed.py --config ... --resume_from_checkpoint runs/grpo_tiny/checkpoint-3   # or "last"

``--model_name_or_path`` takes any HF model name or path (``tiny:llama`` builds a tiny local
test model). The run directory (``--output_dir``) gets the gradroute log, checkpoints with the
router state, the trained model (``save_model``, as TRL's script does), ``summary.json`` and
the persona adapter (``--gradroute_save_adapter``, default ``<output_dir>/persona_adapter``;
``--gradroute_adapter_base model`` also writes the discarded base the adapter fits, ready to
serve). A fresh run into a non-empty ``--output_dir`` is refused (``ConfigError``), or the old
directory is renamed aside with ``--gradroute_existing_output rotate``; runs are never mixed.
``--resume_from_checkpoint`` resumes training, router state and log (no duplicate steps).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ScriptArguments


@dataclass
class GRPOScriptArguments(ScriptArguments):
    """TRL's ``grpo.py`` script arguments (the same names)."""

    reward_model_name_or_path: str | None = field(default=None, metadata={"help": "reward model name or path"})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "reward functions: accuracy_reward, reasoning_accuracy_reward, think_format_reward, "
                          "get_soft_overlong_punishment, or dotted import paths (my_lib.rewards.custom_reward)"})


@dataclass
class GradrouteArguments:
    """gradroute's flags (the only addition to TRL's script)."""

    gradroute_subspace: str | None = field(default=None, metadata={"help": "subspace directory (gradroute subspace build)"})
    gradroute_mode: str = field(default="update", metadata={"help": "update, gradient (or any mode attach accepts)"})
    gradroute_env_column: str = field(default="env", metadata={"help": "dataset column with each row's environment"})
    gradroute_policy: str | None = field(
        default=None,
        metadata={"help": "HaltPolicy as key=value pairs, e.g. 'max_env_share=0.95,env_share_min_norm=0.05,"
                          "max_adapter_norm=5,action=stop' (a mapping in YAML)"})
    gradroute_rewards: str | None = field(
        default=None, metadata={"help": "python file defining REWARDS = {env: reward_fn} (one reward per environment)"})
    gradroute_control: str = field(default="none", metadata={"help": "none or random (matched-rank random subspace)"})
    gradroute_control_seed: int = 0
    gradroute_no_route: bool = field(default=False, metadata={"help": "train without gradroute (the baseline)"})
    gradroute_save_adapter: str | None = field(
        default=None, metadata={"help": "where to write the persona adapter at the end (default: "
                                        "<output_dir>/persona_adapter; 'none' to skip)"})
    gradroute_adapter_base: str = field(
        default="modules", metadata={"help": "modules, model (also write the discarded base, ready to serve) or none"})
    gradroute_lora_bias: str = field(
        default="keep", metadata={"help": "keep, fold (bias-free adapter for vLLM) or refuse"})
    gradroute_existing_output: str = field(
        default="refuse", metadata={"help": "a fresh run into a non-empty output_dir: refuse or rotate"})


POLICY_KEYS = {"max_adapter_norm": float, "max_growth": float, "growth_window": int, "max_env_share": float,
               "env_share_min_norm": float, "max_activation_z": float, "baseline_steps": int,
               "activation_window": int, "halt_on_nonfinite": lambda v: str(v).lower() in ("1", "true", "yes"),
               "action": str}


def parse_policy(spec: Any) -> Any:
    """``'max_env_share=0.95,action=warn'`` (or a mapping) -> ``gradroute.HaltPolicy`` (None: no policy)."""
    import gradroute as gr
    from gradroute.errors import ConfigError

    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"--gradroute_policy: {part!r} is not key=value.",
                                  "write it like 'max_env_share=0.95,env_share_min_norm=0.05'.")
            k, v = part.split("=", 1)
            items[k.strip()] = v.strip()
        spec = items
    if not isinstance(spec, dict):
        raise ConfigError(f"--gradroute_policy must be key=value pairs or a mapping, got {spec!r}.")
    unknown = sorted(set(spec) - set(POLICY_KEYS))
    if unknown:
        raise ConfigError(f"--gradroute_policy: unknown keys {unknown}.", f"use some of {sorted(POLICY_KEYS)}.")
    try:
        return gr.HaltPolicy(**{k: POLICY_KEYS[k](v) for k, v in spec.items()})
    except ValueError as e:
        raise ConfigError(f"--gradroute_policy: {e}.", "give numbers for the thresholds.") from None


def load_env_rewards(path: str, env_column: str) -> Any:
    """A reward function dispatching each row to its environment's function (``REWARDS`` in ``path``)."""
    from gradroute.errors import ConfigError

    spec = importlib.util.spec_from_file_location("gradroute_recipe_rewards", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import rewards file {path}.", "pass a python file defining REWARDS.")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    per_env = getattr(mod, "REWARDS", None)
    if not isinstance(per_env, dict) or not per_env:
        raise ConfigError(f"{path} must define REWARDS = {{env_name: reward_function}}.")

    def env_reward(completions, **columns):
        envs = columns[env_column]
        out: list[float | None] = [None] * len(completions)
        for env in set(envs):
            if env not in per_env:
                raise ConfigError(f"no reward function for environment {env!r} in {path}.",
                                  "add it to REWARDS.")
            idx = [i for i, e in enumerate(envs) if e == env]
            sub = {k: [v[i] for i in idx] for k, v in columns.items()
                   if isinstance(v, list) and len(v) == len(completions)}
            for i, r in zip(idx, per_env[env]([completions[i] for i in idx], **sub)):
                out[i] = r
        return out

    return env_reward


def reward_functions(script_args: GRPOScriptArguments, ga: GradrouteArguments) -> list[Any]:
    """TRL's ``grpo.py`` reward resolution, plus the per-environment rewards file."""
    from gradroute.errors import ConfigError

    funcs: list[Any] = []
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    for name in script_args.reward_funcs or []:
        if name in ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward"):
            funcs.append(getattr(importlib.import_module("trl.rewards"), name))
        elif name == "get_soft_overlong_punishment":
            from trl.rewards import get_soft_overlong_punishment

            funcs.append(get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256))
        elif "." in name:
            module_path, func = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            funcs.append(getattr(importlib.import_module(module_path), func))
        else:
            raise ConfigError(f"could not load reward function {name!r}.",
                              "use one of TRL's reward names or a dotted import path.")
    if ga.gradroute_rewards:
        funcs.append(load_env_rewards(ga.gradroute_rewards, ga.gradroute_env_column))
    if not funcs:
        raise ConfigError("no reward: neither --reward_funcs, --reward_model_name_or_path nor --gradroute_rewards.",
                          "pass at least one of them.")
    return funcs


def load_data(name: str, config: str | None = None, split: str = "train") -> Any:
    from datasets import DatasetDict, load_dataset, load_from_disk

    p = Path(name)
    if p.is_dir():
        ds = load_from_disk(name)
        return ds[split] if isinstance(ds, DatasetDict) else ds
    if p.suffix in (".jsonl", ".json"):
        return load_dataset("json", data_files=name, split="train")
    if p.suffix == ".csv":
        return load_dataset("csv", data_files=name, split="train")
    return load_dataset(name, name=config, split=split)


def prepare_output_dir(output_dir: str, resuming: bool, existing: str) -> Path | None:
    """Refuse (or rotate away) a non-empty output directory for a fresh run. Returns where an
    old run was moved, if it was."""
    from accelerate import PartialState

    from gradroute.errors import ConfigError

    if existing not in ("refuse", "rotate"):
        raise ConfigError(f"--gradroute_existing_output must be refuse or rotate, got {existing!r}.")
    out = Path(output_dir)
    state = PartialState()
    busy = not resuming and out.is_dir() and any(out.iterdir())
    state.wait_for_everyone()  # every rank looked before the main one moves anything
    moved = None
    if busy and existing == "refuse":
        raise ConfigError(
            f"output_dir {out} is not empty (an earlier run?): a fresh run there would mix its log, checkpoints "
            "and adapter with the old ones.",
            "resume it with --resume_from_checkpoint <checkpoint or 'last'>, pick a new --output_dir, or pass "
            "--gradroute_existing_output rotate to move the old run aside.")
    if busy:
        i = 1
        while out.with_name(f"{out.name}.{i}").exists():
            i += 1
        moved = out.with_name(f"{out.name}.{i}")
        if state.is_main_process:
            out.rename(moved)
        state.wait_for_everyone()
    return moved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config

    import gradroute as gr
    from gradroute.errors import ConfigError

    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, GradrouteArguments))
    script_args, training_args, model_args, ga = parser.parse_args_and_config(argv)

    resume: Any = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    moved = prepare_output_dir(training_args.output_dir, bool(resume), ga.gradroute_existing_output)

    # the model, as TRL's grpo.py passes it (a name and model_init_kwargs), or a tiny local one
    name = model_args.model_name_or_path or "tiny:llama"
    tok = None
    if name.startswith("tiny:"):
        import torch

        from gradroute.integrations.transformers import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(name)
        if model_args.dtype not in (None, "auto"):
            model = model.to(getattr(torch, model_args.dtype))
    else:
        model = name
        kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                      attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
        kwargs.update(training_args.model_init_kwargs or {})
        training_args.model_init_kwargs = kwargs
    if not script_args.dataset_name:
        raise ConfigError("no dataset.", "pass --dataset_name (a hub name, a saved dataset or a jsonl/csv file).")
    dataset = load_data(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(script_args, ga), args=training_args,
                          train_dataset=dataset, processing_class=tok, peft_config=get_peft_config(model_args))

    handle = None
    if not ga.gradroute_no_route:
        if ga.gradroute_subspace is None:
            raise ConfigError("--gradroute_subspace is required unless --gradroute_no_route.",
                              "build one with `gradroute subspace build`.")
        sub = gr.Subspace.load(ga.gradroute_subspace)
        if ga.gradroute_control == "random":
            sub = sub.random_like(seed=ga.gradroute_control_seed)
        elif ga.gradroute_control != "none":
            raise ConfigError(f"--gradroute_control must be none or random, got {ga.gradroute_control!r}.")
        handle = gr.attach(trainer, sub, env_column=ga.gradroute_env_column, policy=parse_policy(ga.gradroute_policy),
                           mode=ga.gradroute_mode)

    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(training_args.output_dir)

    summary: dict[str, Any] = {"steps": trainer.state.global_step, "routed": handle is not None,
                               "control": ga.gradroute_control, "peft": model_args.use_peft,
                               "resumed_from": str(resume) if resume else None,
                               "rotated_to": str(moved) if moved else None}
    if handle is not None:
        summary.update(
            adapter_norm=handle.router.adapter_norm().total,
            env_adapter_share=handle.router.env_adapter_shares(),
            halt=handle.halted,
            last_clean_checkpoint=str(handle.last_clean_checkpoint()),
        )
        target = ga.gradroute_save_adapter or str(Path(training_args.output_dir) / "persona_adapter")
        if target.lower() != "none":
            handle.save_adapter(target, base=ga.gradroute_adapter_base, lora_bias=ga.gradroute_lora_bias)
            summary["adapter"] = target
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(summary, indent=2, default=str))
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers (TRL's grpo.py does it too)
        trainer.end()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
