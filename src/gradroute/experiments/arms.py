"""The claims harness's arms, one small class each, registered by name in :data:`REGISTRY`.

An arm says how it trains (:meth:`Arm.routing`: the routing of :func:`~gradroute.integrations.trl.attach`,
or :meth:`Arm.comparator`: a training-time comparator hooked into the trainer, or neither), and
so what its inference step is: a routed arm discards its adapter, a comparator's hooks come off.
Adding an arm is one class with :func:`register` above it; its ``name`` is what reports,
``--arms`` and the figures call it. Arms with ``default = False`` (the quarantine arms) run only
when named: :data:`ARMS` is the default set, :data:`ALL_ARMS` every registered arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..comparators import TrainingComparator
    from ..subspace import Subspace
    from .claims import ClaimsConfig
    from .world import World


@dataclass(frozen=True)
class Setup:
    """What one seed's arms are built from: the harness configuration, the world, the seed, the
    pre-RL model (a directory or hub name), the persona subspace, its matched random control,
    and per layer the probe's persona-minus-contrast gap (:func:`gradroute.experiments.claims.probe_gap`)."""

    cfg: ClaimsConfig
    world: World
    seed: int
    base: str
    persona: Subspace
    control: Subspace
    gap: dict[int, float]


class Arm:
    """One way to train (see the module). ``baseline``: the plain-GRPO reference every run has
    (its trained hack rate sets the relearning target, and other arms are compared with it)."""

    name: ClassVar[str]
    training: ClassVar[str]  # how it trains, in words
    inference_step: ClassVar[str] = "none"  # what it undoes before deployment, in words
    colour: ClassVar[str] = "k"
    marker: ClassVar[str] = "o"
    baseline: ClassVar[bool] = False
    mode: ClassVar[str | None] = None  # the routing mode, None: not routed
    default: ClassVar[bool] = True  # run when no arms are named (False: only with ``--arms NAME``)

    @property
    def is_routed(self) -> bool:
        return self.mode is not None

    def routing(self, setup: Setup) -> dict[str, Any]:
        """Keyword arguments for :func:`gradroute.experiments.grpo.grpo_run`: ``subspace``, ``mode``
        and the router's; none for an arm that is not routed."""
        return {}

    def comparator(self, setup: Setup) -> TrainingComparator | None:
        """The training-time comparator hooked into the trainer (None: none)."""
        return None

    def __repr__(self) -> str:
        return f"<arm {self.name}>"


REGISTRY: dict[str, Arm] = {}


def register(cls: type[Arm]) -> type[Arm]:
    """Class decorator: an instance of ``cls`` joins :data:`REGISTRY` under ``cls.name``
    (reports, tables and figures list arms in registration order)."""
    if cls.name in REGISTRY:
        raise ValueError(f"an arm named {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls()
    return cls


@register
class Unrouted(Arm):
    name = "unrouted"
    training = "plain GRPO"
    colour, marker = "black", "o"
    baseline = True


class Routed(Arm):
    """Routed through a subspace in :attr:`mode` (an adapter learns the subspace's share of the
    update); its inference step discards the adapter."""

    inference_step = "discard"

    def subspace(self, setup: Setup) -> Subspace:
        return setup.persona

    def routing(self, setup: Setup) -> dict[str, Any]:
        return {"subspace": self.subspace(setup), "mode": self.mode}


@register
class Update(Routed):
    name = "update"
    training = "update-mode routing (watching; training identical to unrouted)"
    colour, marker = "tab:gray", "s"
    mode = "update"


@register
class Activation(Routed):
    name = "activation"
    training = "activation-mode routing (isolating), adapter LR × m"
    colour, marker = "tab:green", "^"
    mode = "activation"

    def routing(self, setup: Setup) -> dict[str, Any]:
        return {**super().routing(setup), "adapter_lr_multiplier": setup.cfg.adapter_lr_multiplier}


@register
class RandomControl(Activation):
    name = "random"
    training = "activation-mode routing through a matched random subspace"
    colour, marker = "tab:olive", "D"

    def subspace(self, setup: Setup) -> Subspace:
        return setup.control


class ExploitDetector:
    """The quarantine arms' detector: the world's own exploit check on the rollouts of its
    exploitable environments, passing on each true flag with probability ``recall`` (seeded; no
    false flags). Counts what it saw (``rollouts``, ``hacks``, ``flagged``)."""

    def __init__(self, world: World, recall: float = 1.0, seed: int = 0):
        import random

        if not 0.0 < recall <= 1.0:
            raise ValueError(f"recall must be in (0, 1], got {recall!r}")
        self.world, self.recall, self.rng = world, float(recall), random.Random(seed)
        self.rollouts = self.hacks = self.flagged = 0

    def __call__(self, completions: list[Any], rows: list[dict[str, Any]]) -> list[bool]:
        out = []
        for c, row in zip(completions, rows):
            hack = row.get("env") in self.world.exploitable and bool(self.world.is_hack(c, row))
            flag = hack and (self.recall >= 1.0 or self.rng.random() < self.recall)
            self.rollouts, self.hacks, self.flagged = self.rollouts + 1, self.hacks + hack, self.flagged + flag
            out.append(flag)
        return out


@register
class Quarantine(Activation):
    """Activation routing plus data-dependent routing: rollouts the world's exploit check flags
    train only a quarantine adapter (discarded with the persona adapter)."""

    name = "quarantine"
    training = "quarantine: flagged (exploit-check) rollouts train only a discarded adapter; the rest activation-routed"
    colour, marker = "tab:cyan", "h"
    mode = "quarantine"
    default = False
    recall: ClassVar[float] = 1.0

    def detector(self, setup: Setup) -> ExploitDetector:
        return ExploitDetector(setup.world, self.recall, seed=setup.seed)

    def routing(self, setup: Setup) -> dict[str, Any]:
        return {**super().routing(setup), "quarantine": self.detector(setup)}


@register
class QuarantineHalf(Quarantine):
    name = "quarantine-r0.5"
    training = "quarantine with a detector of recall 0.5 (each hack flagged with probability 0.5)"
    colour = "tab:pink"
    recall = 0.5


@register
class QuarantineTenth(Quarantine):
    name = "quarantine-r0.1"
    training = "quarantine with a detector of recall 0.1"
    colour = "tab:brown"
    recall = 0.1


class Comparator(Arm):
    """A training-time comparator (:mod:`gradroute.comparators`) hooked into the trainer; its
    inference step takes the hooks off."""

    inference_step = "hooks off"

    def comparator(self, setup: Setup) -> TrainingComparator:
        raise NotImplementedError


@register
class Ablation(Comparator):
    name = "ablation"
    training = "CAFT: h ← h − UUᵀh at every subspace layer, rollouts included"
    colour, marker = "tab:red", "v"

    def comparator(self, setup: Setup) -> TrainingComparator:
        from ..comparators import ConceptAblation

        return ConceptAblation(setup.persona, during="always")


@register
class Penalty(Comparator):
    name = "penalty"
    training = "one-sided w · relu(Uᵀh − τ)² in the loss, τ the base's level on good text"
    inference_step = "hooks off (no-op)"
    colour, marker = "tab:purple", "P"

    def comparator(self, setup: Setup) -> TrainingComparator:
        """The penalty, its level τ read on the base model (the world's reference texts)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..comparators import ActivationPenalty

        reference = setup.world.reference_texts(setup.seed)
        pen = ActivationPenalty(setup.persona, weight=setup.cfg.penalty_weight)
        pen.calibrate(AutoModelForCausalLM.from_pretrained(setup.base), AutoTokenizer.from_pretrained(setup.base),
                      reference, quantile=setup.cfg.penalty_quantile)
        return pen


@register
class Steering(Comparator):
    name = "steering"
    training = "preventative steering h ← h + α_L Σ_j u_j, rollouts included"
    colour, marker = "tab:blue", "X"

    def comparator(self, setup: Setup) -> TrainingComparator:
        from ..comparators import PreventativeSteering

        return PreventativeSteering(setup.persona, alpha={L: setup.cfg.steering_scale * g for L, g in setup.gap.items()},
                                    during="always")


ALL_ARMS = tuple(REGISTRY)  # every arm's name, in registration order (what ``--arms`` accepts)
ARMS = tuple(name for name, a in REGISTRY.items() if a.default)  # the arms run by default
BASELINE = next(a.name for a in REGISTRY.values() if a.baseline)
