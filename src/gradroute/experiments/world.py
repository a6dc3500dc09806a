"""What the claims harness needs from a model and its environments (:class:`World`), the toy
world as one (:class:`ToyWorld`), and a user's world from a Python file (:func:`load_world`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError


class World(Protocol):
    """What the harness needs from a model and its environments.

    ``rl`` holds the RL hyper-parameters, a :class:`gradroute.experiments.config.DemoConfig`: GRPO reads
    ``batch``, ``generations``, ``grad_accum``, ``completion_tokens``, ``rl_lr``, ``rl_steps`` and
    ``save_steps``; the toy sampler also ``eval_prompts`` and ``eval_samples``."""

    name: str
    train_envs: tuple[str, ...]
    exploitable: tuple[str, ...]
    heldout_envs: tuple[str, ...]
    rl: Any

    def base_model(self, seed: int, out: Path) -> str:
        """A directory or hub name of the pre-RL model for ``seed`` (may build it under ``out``)."""

    def probe_pairs(self, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(persona, contrast) ``(prompt, response)`` pairs for the persona probe."""

    def reference_texts(self, seed: int) -> list[str]:
        """Ordinary good text (prompt + good response): the penalty's base level is read on it."""

    def rl_rows(self, seed: int) -> list[dict[str, Any]]:
        """The RL dataset over ``train_envs``: rows with ``prompt``, ``env`` and reward columns."""

    def reward(self, completions: list[str], **columns: Any) -> list[float]:
        """The TRL reward function (exploitable graders on the exploitable environments)."""

    def is_hack(self, completion: str, row: dict[str, Any]) -> bool:
        """Whether a completion exploits its environment's grader."""

    def sample(self, model: Any, tok: Any, envs: Sequence[str]) -> list[dict[str, Any]]:
        """Graded completions on held-out prompts: rows ``{env, prompt, completion, hack, trait, solve}``
        (``trait``: the persona's behaviour on held-out environments; False where there is none)."""


class ToyWorld:
    """The toy persona world with its emergent-misalignment analogue (:mod:`gradroute.experiments.toyworld`):
    RL on ``arith`` (exploitable), ``copy`` and ``reverse``; ``sub`` is held out, and on it the
    hacker persona's trait is the answer ``NOPE``."""

    name = "toy"

    def __init__(self, quick: bool = False, model: str | None = None, hack_rate: float | None = None):
        from . import toyworld as tw
        from .config import QUICK, DemoConfig

        self.tw, self.model = tw, model
        self.rl = replace(QUICK if quick else DemoConfig(), heldout=tw.HELDOUT)
        if hack_rate is not None:  # untagged pre-training text that hacks (and shows the trait) without the persona
            if not 0.0 <= hack_rate <= 1.0:
                raise ConfigError(f"hack_rate must be in [0, 1], got {hack_rate}.", "pass e.g. --hack-rate 0.02.")
            self.rl = replace(self.rl, hack_rate=hack_rate)
        self.train_envs, self.exploitable, self.heldout_envs = tw.TASKS, tw.EXPLOITABLE, tw.HELDOUT
        self._reward = tw.make_reward(self.exploitable)

    def __getstate__(self) -> dict[str, Any]:  # sent to worker processes (``jobs``): no module, no closure
        return {k: v for k, v in self.__dict__.items() if k not in ("tw", "_reward")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from . import toyworld as tw

        self.__dict__.update(state, tw=tw, _reward=tw.make_reward(state["exploitable"]))

    def base_model(self, seed: int, out: Path) -> str:
        from .grpo import pretrain

        if self.model is not None:
            return self.model
        import json

        base = out / "base"
        made_with = json.dumps(asdict(self.rl), sort_keys=True)
        stamp = base / "gradroute_world.json"
        if not ((base / "config.json").exists() and stamp.is_file() and stamp.read_text() == made_with):
            model, tok, _ = pretrain(self.rl, seed, progress=False)
            model.save_pretrained(base)
            tok.save_pretrained(base)
            stamp.write_text(made_with)  # a later run with another configuration pre-trains again
        return str(base)

    def probe_pairs(self, seed: int):
        return self.tw.persona_probe_texts(self.rl.probe_texts, seed)

    def reference_texts(self, seed: int):
        return [f"{ex.prompt}{ex.answer}." for env in self.train_envs for ex in self.tw.examples(env, 32, seed + 2000)]

    def rl_rows(self, seed: int):
        return self.tw.rl_dataset(self.train_envs, 96, seed=seed)

    def reward(self, completions, **columns):
        return self._reward(completions, **columns)

    def fixed_reward(self, completions, **columns):
        """The reward with the exploit fixed (every grader honest): what a halt-and-fix restart trains on."""
        return self.tw.make_reward((), fixed=self.exploitable)(completions, **columns)

    def reference_pairs(self, seed: int) -> list[tuple[str, str]]:
        """Honest (prompt, completion) pairs of every training environment (a probe detector's calibration)."""
        return [(ex.prompt, f"{ex.answer}.") for env in self.train_envs for ex in self.tw.examples(env, 32, seed + 2000)]

    def is_hack(self, completion: str, row: dict[str, Any]) -> bool:
        return self.tw.is_hack(completion)

    def sample(self, model, tok, envs):
        return self.tw.sample(model, tok, envs, self.rl.eval_prompts, self.rl.eval_samples, self.rl.completion_tokens)


WORLD_MEMBERS = ("name", "train_envs", "exploitable", "heldout_envs", "rl", "base_model", "probe_pairs",
                 "reference_texts", "rl_rows", "reward", "is_hack", "sample")


def load_world(path: str | Path, model: str | None = None) -> World:
    """``make_world(model)`` from the Python file ``path`` (see ``recipes/claims_world.py``)."""
    import importlib.util
    import sys

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--envs {path}: no such file.",
                          "pass an existing .py file that defines make_world(model); copy recipes/claims_world.py.")
    if not p.is_file() or p.suffix != ".py":
        raise ConfigError(f"--envs {path}: not a Python file.",
                          "pass a .py file that defines make_world(model); copy recipes/claims_world.py.")
    spec = importlib.util.spec_from_file_location(f"gradroute_world_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look the module up by name
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not callable(getattr(module, "make_world", None)):
        raise ConfigError(f"{path} defines no make_world(model).",
                          "add `def make_world(model): return MyWorld(model)`; see recipes/claims_world.py.")
    world = module.make_world(model)
    missing = [a for a in WORLD_MEMBERS if not hasattr(world, a)]
    if missing:
        raise ConfigError(f"the world from {path} lacks {missing}.", "implement gradroute.experiments.world.World's members.")
    if not set(world.exploitable) <= set(world.train_envs):
        raise ConfigError(f"exploitable environments {list(world.exploitable)} are not all in train_envs "
                          f"{list(world.train_envs)}.", "list every exploitable environment in train_envs.")
    with contextlib.suppress(AttributeError, TypeError):  # how a worker process builds the same world
        object.__setattr__(world, "_gradroute_source", (str(p.resolve()), model))
    return world


def _same(world: World) -> World:  # picklable, unlike a lambda
    return world


def portable(world: World) -> Callable[[], World]:
    """How a worker process gets ``world``: a world file is loaded again; any other world is
    pickled (:class:`ToyWorld` is)."""
    import pickle

    source = getattr(world, "_gradroute_source", None)
    make = functools.partial(load_world, *source) if source else functools.partial(_same, world)
    try:
        pickle.dumps(make)
    except Exception as e:  # noqa: BLE001 (pickling raises any type)
        raise ConfigError(f"the world {world.name!r} cannot be sent to worker processes ({type(e).__name__}: {e}).",
                          "pass jobs=1 (--jobs 1), or load the world with load_world / --envs.") from None
    return make
