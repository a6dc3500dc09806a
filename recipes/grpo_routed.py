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
``summary.json`` is typed JSON: paths inside ``--output_dir`` relative to it (others absolute),
null for what did not happen. When the policy halts the run, the console says which rule fired
(environment, layer, value, threshold, step) and the last clean checkpoint to resume from.
A mistake in the flags, the config or a path is one ``error: ... Fix: ...`` line, exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
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


def parse_policy(spec: Any) -> Any:
    """``'max_env_share=0.95,action=warn'`` (or a mapping) -> ``gradroute.HaltPolicy`` (None: no policy)."""
    import gradroute as gr

    return gr.HaltPolicy.from_dict(spec, what="--gradroute_policy")


def load_env_rewards(path: str, env_column: str) -> Any:
    """A reward function dispatching each row to its environment's function (``REWARDS`` in ``path``)."""
    from gradroute.errors import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"--gradroute_rewards {path}: no such file.",
                          "pass a python file defining REWARDS = {env: reward_fn}, e.g. recipes/rewards.py.")
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

    from gradroute.errors import ConfigError

    p = Path(name)
    if p.suffix in (".jsonl", ".json", ".csv") and not p.is_file():
        raise ConfigError(f"--dataset_name {name}: no such file.",
                          "pass an existing jsonl/csv file, a saved dataset directory or a hub dataset name.")
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


LIBRARIES = r"(transformers|trl|peft|accelerate|datasets|huggingface_hub)(\.|$)"


@contextlib.contextmanager
def library_noise_off():
    """The libraries' noise off while the recipe runs (as ``gradroute demo`` does): their
    FutureWarnings and DeprecationWarnings, weight-loading, shard-writing and dataset progress
    bars; ``train`` also quiets transformers' info and warning logs (``loss_type=None`` ...) once
    the arguments are parsed. The training progress bar, the logged metrics, errors and
    gradroute's own warnings stay. Restored on exit."""
    from gradroute.integrations.transformers import library_bars_off

    with warnings.catch_warnings(), library_bars_off():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
        yield


def check_config(argv: list[str]) -> None:
    """``--config PATH`` names a YAML mapping (TRL's parser would fail with a traceback)."""
    import yaml

    from gradroute.errors import ConfigError

    if "--config" not in argv:
        return
    i = argv.index("--config")
    path = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
    example = "e.g. recipes/configs/grpo_tiny.yaml (relative to the current directory)"
    if path is None:
        raise ConfigError("--config needs a YAML file.", f"pass --config PATH, {example}.")
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file.", f"pass --config with an existing YAML file, {example}.")
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML ({' '.join(str(e).split())}).",
                          "fix the line named above.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag: value, got {type(config).__name__}.",
                          f"write one `flag: value` per line, {example}.")


def resume_checkpoint(output_dir: str, resume: Any) -> Path | None:
    """The checkpoint that ``--resume_from_checkpoint`` (a path, or True for the newest) names."""
    from transformers.trainer_utils import get_last_checkpoint

    from gradroute.errors import ConfigError

    if not resume:
        return None
    if resume is True:
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint last: {output_dir} holds no checkpoint-N directory.",
                              "pass a checkpoint directory, or leave --resume_from_checkpoint out for a fresh run.")
        return Path(last)
    if not Path(resume).is_dir():
        raise ConfigError(f"--resume_from_checkpoint {resume}: no such checkpoint directory.",
                          f"pass one of {output_dir}/checkpoint-N, or 'last' for the newest.")
    return Path(resume)


def typed(value: Any, run_dir: str | Path) -> Any:
    """``value`` as JSON: paths as strings (relative to ``run_dir`` when inside it, else absolute),
    non-finite numbers as null, booleans as booleans."""
    from gradroute.monitor import relative_path

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return relative_path(run_dir, value)
    if isinstance(value, dict):
        return {str(k): typed(v, run_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [typed(v, run_dir) for v in value]
    return str(value)


def halt_message(halt: dict[str, Any], clean: Path | None) -> str:
    """What the console says when the policy stopped the run (the record is in summary.json and the log)."""
    detail = f" ({halt['detail']})" if halt.get("detail") else ""
    lines = [f"gradroute: halted at step {halt['step']}: rule {halt['rule']}{detail}, "
             f"value {halt['value']:.4g} > threshold {halt['threshold']:.4g}."]
    if halt.get("top_envs"):
        lines.append("gradroute: top environments: " + ", ".join(f"{e} {v:.3g}" for e, v in halt["top_envs"]) + ".")
    if clean is not None:
        lines.append(f"gradroute: last clean checkpoint: {clean} (fix the environment named above, then resume with "
                     f"--resume_from_checkpoint {clean}).")
    else:
        lines.append(f"gradroute: no clean checkpoint (none was saved before step {halt['step']}): fix the environment "
                     "named above, then start a fresh run (--gradroute_existing_output rotate keeps this one).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags (and ``--config``), train, write the run directory; returns the summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_config(argv)
    with library_noise_off():
        return train(argv)


def train(argv: list[str]) -> dict[str, Any]:
    import transformers
    from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config

    import gradroute as gr
    from gradroute.errors import ConfigError

    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig, GradrouteArguments))
    script_args, training_args, model_args, ga = parser.parse_args_and_config(argv)
    # only now: TrainingArguments turns the progress bar off when transformers logs nothing below errors
    transformers.utils.logging.set_verbosity_error()

    resume: Any = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    name = model_args.model_name_or_path or "tiny:llama"
    if not name.startswith("tiny:"):  # a name that cannot load fails now, not after minutes of hub retries
        from gradroute.integrations.transformers import check_model_source

        if check_model_source(name, model_args.model_revision):  # only in the cache: TRL would retry the hub
            raise ConfigError(f"the hub cannot be reached; {name} is in the local Hugging Face cache.",
                              "set HF_HUB_OFFLINE=1 to train from the cached copy.")
    moved = prepare_output_dir(training_args.output_dir, bool(resume), ga.gradroute_existing_output)
    resumed_from = resume_checkpoint(training_args.output_dir, resume)

    # the model, as TRL's grpo.py passes it (a name and model_init_kwargs), or a tiny local one
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
                               "control": ga.gradroute_control, "peft": bool(model_args.use_peft),
                               "resumed_from": resumed_from, "rotated_to": moved}
    halt, clean = None, None
    if handle is not None:
        halt, clean = handle.halted, handle.last_clean_checkpoint()
        if halt is not None and halt.get("checkpoint"):
            halt = {**halt, "checkpoint": Path(halt["checkpoint"])}
        summary.update(
            adapter_norm=handle.router.adapter_norm().total,
            env_adapter_share=handle.router.env_adapter_shares(),
            halt=halt,
            last_clean_checkpoint=clean,
        )
        target = ga.gradroute_save_adapter or str(Path(training_args.output_dir) / "persona_adapter")
        if target.lower() != "none":
            handle.save_adapter(target, base=ga.gradroute_adapter_base, lora_bias=ga.gradroute_lora_bias)
            summary["adapter"] = Path(target)
    summary = typed(summary, training_args.output_dir)
    if trainer.is_world_process_zero():
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        if halt is not None:
            print(halt_message(halt, clean), file=sys.stderr)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers (TRL's grpo.py does it too)
        trainer.end()
    return summary


if __name__ == "__main__":
    from gradroute.errors import GradrouteError

    try:
        main(sys.argv[1:])
    except GradrouteError as e:  # a mistake in the flags, the config or a path: one line, as the gradroute CLI says it
        print(f"{Path(__file__).name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
