"""Environment ids and rewards of TRL's online RL trainers (``GRPOTrainer``, ``RLOOTrainer``).

``_generate_and_score_completions(inputs)`` gets the dataset rows (one per completion); a
tensor of their environment indices is added to its output, and TRL's buffering
(``shuffle_sequence_dict``, ``split_tensor_dict``) permutes and chunks it together with the
rest of the batch. ``_calculate_rewards`` gives the rewards per function; their weighted sum
per completion (as TRL weights them) goes to :meth:`gradroute.GradientRouter.record_rewards`,
with NaN where no function scored a completion or one gave Inf/NaN. Both hooks are private:
they are looked up through :mod:`gradroute.integrations._compat`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import GradrouteWarning
from . import _compat
from ._patches import patch
from .columns import ENV_KEY, FLAG_KEY, env_name


def route_rl_envs(trainer: Any, router: Any, env_column: str,
                  ids_of: Callable[[Sequence[dict[str, Any]], Any], torch.Tensor]) -> None:
    """Patch the trainer's generation and reward hooks: environment ids into every batch (as
    ``inputs[ENV_KEY]``), rewards per environment into ``router.record_rewards``."""
    gen, calc = _compat.rl_hooks(trainer)
    warned_nonfinite: set[str] = set()

    def generate_and_score(inputs, *a, **kw):
        out = gen(inputs, *a, **kw)
        if trainer.model.training:
            out[ENV_KEY] = ids_of(inputs, _compat.batch_device(out))
        return out

    def calculate_rewards(inputs, *a, **kw):
        rpf = calc(inputs, *a, **kw)
        if trainer.model.training:
            w = _compat.reward_function_weights(trainer).to(rpf.device)
            weighted = rpf * w.unsqueeze(0)
            total = weighted.nansum(dim=1)
            # a reward function returns None (NaN here) for rows it does not apply to; a row
            # is non-finite when no function scored it, or when one gave Inf/NaN arithmetic
            bad = torch.isnan(weighted).all(dim=1) | torch.isinf(weighted).any(dim=1)
            # TRL gathers the rewards of every process; this rank's rows are its slice
            from ..distributed import rank

            if total.shape[0] != len(inputs):
                start = rank() * len(inputs)
                total = total[start : start + len(inputs)]
                bad = bad[start : start + len(inputs)]
            names = [env_name(r[env_column], "a training row") for r in inputs]
            values = [float("nan") if b else t for t, b in zip(total.tolist(), bad.tolist())]
            # NaN rewards are left out of the means and counted per environment in the log
            router.record_rewards(names, values)
            if bool(bad.any()):
                counts: dict[str, int] = {}
                for name, b in zip(names, bad.tolist()):
                    if b:
                        counts[name] = counts.get(name, 0) + 1
                new = sorted(set(counts) - warned_nonfinite)
                if new:
                    warned_nonfinite.update(new)
                    warnings.warn(
                        f"NaN/None rewards in environment(s) {new} ({counts}): they are left out of the "
                        "mean reward (TRL counts them as 0) and counted in the log as nonfinite_rewards; "
                        "HaltPolicy(max_nonfinite_rewards=N) halts on them.", GradrouteWarning, stacklevel=2)
        return rpf

    patch(trainer, _compat.generate_and_score_hook_name(), generate_and_score)
    patch(trainer, _compat.calculate_rewards_hook_name(), calculate_rewards)


def route_rl_flags(trainer: Any, detector: Callable[[Sequence[Any], Sequence[dict[str, Any]]], Sequence[Any]],
                   advantages: str = "keep") -> None:
    """``mode="quarantine"`` with a detector: ``detector(completions, rows)`` (the completions the
    reward functions score, and their dataset rows) gives one bool per completion, and every batch
    carries them as ``inputs[FLAG_KEY]`` (permuted and chunked by TRL with the rest).
    ``advantages="exclude"`` recomputes the unflagged rows' GRPO advantages without the flagged
    rows in their groups (:func:`gradroute.router.modes.quarantine.unflagged_advantages`)."""
    from ..errors import ConfigError
    from ..router.modes.quarantine import ADVANTAGES, unflagged_advantages

    if advantages not in ADVANTAGES:
        raise ConfigError(f"quarantine_advantages must be one of {ADVANTAGES}, got {advantages!r}.",
                          "pass 'exclude' (unflagged rows' baselines leave flagged rows out) or 'keep' (TRL's).")
    if advantages == "exclude":
        _check_exclude(trainer)
    gen, calc = _compat.rl_hooks(trainer)
    pending: list[torch.Tensor] = []
    rewards: list[torch.Tensor] = []

    def calculate_rewards(inputs, *a, **kw):
        if trainer.model.training:
            completions = kw.get("completions", a[1] if len(a) > 1 else None)
            flags = list(detector(completions, inputs))
            if len(flags) != len(inputs):
                raise ConfigError(f"the quarantine detector gave {len(flags)} flags for {len(inputs)} completions.",
                                  "return one bool per completion, in order.")
            pending[:] = [torch.tensor([bool(f) for f in flags], dtype=torch.bool)]
        rpf = calc(inputs, *a, **kw)
        if trainer.model.training and advantages == "exclude":
            if rpf.shape[0] != len(inputs):  # gathered from other processes: their flags are not here
                raise ConfigError("quarantine_advantages='exclude' runs on one process only.",
                                  "pass quarantine_advantages='keep' for multi-process training.")
            w = _compat.reward_function_weights(trainer).to(rpf.device)
            total = (rpf * w.unsqueeze(0)).nansum(dim=1)
            total[torch.isnan(rpf).all(dim=1)] = float("nan")  # unscorable: out of the baseline, as in TRL
            rewards[:] = [total]
        return rpf

    def generate_and_score(inputs, *a, **kw):
        pending.clear()
        rewards.clear()
        out = gen(inputs, *a, **kw)
        if trainer.model.training:
            if not pending:
                raise ConfigError("TRL scored no completions for this batch, so the quarantine detector did not run.",
                                  "report this with your TRL version; use quarantine={env, ...} meanwhile.")
            flags = pending.pop().to(_compat.batch_device(out))
            if advantages == "exclude":
                adv = out["advantages"]
                out["advantages"] = unflagged_advantages(rewards.pop().to(adv.device), flags.to(adv.device), adv,
                                                         trainer.num_generations, trainer.scale_rewards)
            out[FLAG_KEY] = flags
        return out

    patch(trainer, _compat.calculate_rewards_hook_name(), calculate_rewards)
    patch(trainer, _compat.generate_and_score_hook_name(), generate_and_score)


def _check_exclude(trainer: Any) -> None:
    """``advantages="exclude"`` mirrors GRPOTrainer's group-relative advantages (sum, then
    normalize): refused for anything else, where it would compute a different baseline."""
    from ..errors import ConfigError

    fix = "pass quarantine_advantages='keep' (TRL's advantages, flagged rows in the baselines)"
    if not all(hasattr(trainer, k) for k in ("num_generations", "scale_rewards")) or any(
            c.__name__ == "RLOOTrainer" for c in type(trainer).__mro__):
        raise ConfigError(f"quarantine_advantages='exclude' recomputes GRPO's group advantages; "
                          f"{type(trainer).__name__} computes its own.", fix + ".")
    if getattr(trainer, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
        raise ConfigError("quarantine_advantages='exclude' follows multi_objective_aggregation='sum_then_normalize'; "
                          f"this trainer uses {trainer.multi_objective_aggregation!r}.", fix + ".")
