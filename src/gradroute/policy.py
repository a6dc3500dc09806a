"""``HaltPolicy``: composable drift rules and what to do when one fires.

Each rule looks at the newest step record (a typed
:class:`~gradroute.router.records.StepRecord`, and the records before it) and returns a
:class:`Violation` when its threshold is crossed:

- ``AdapterNormRule(max_norm)``: ``‖A‖ > max_norm`` (Frobenius norm of the adapter's weight delta).
- ``GrowthRule(max_growth, window)``: ``‖A_t‖ − ‖A_{t−window}‖ > max_growth``.
- ``EnvShareRule(max_share, min_norm)``: one environment built more than ``max_share`` of the
  current adapter (``⟨A_e, A⟩/‖A‖²``), once ``‖A‖ >= min_norm``.
- ``ActivationDriftRule(max_z, baseline_steps)``: an environment's mean activation projection
  ``mean Uᵀh`` at some layer has moved more than ``max_z`` baseline standard deviations from
  its mean over the first ``baseline_steps`` records (the Persona-Vectors monitoring signal).
- ``PushRule(max_z, min_steps)``: an environment's locating score — its cumulative persona push
  over random directions' (:mod:`gradroute.monitor.locate`) — exceeds ``max_z`` (after
  ``min_steps`` records): its loss keeps asking for more of the persona than any direction gets.
  ``PushRule(max_z, watch=True)`` (``max_watch_push_z``) reads the directions watched but not
  routed (``GradientRouter(watch=...)``): a behaviour rerouted around the routed subspace.
- ``NonFiniteRule()``: the step's in-subspace update is NaN/Inf.
- ``NonFiniteRewardRule(max_count)``: more than ``max_count`` NaN/None rewards in one
  environment since the start of the run (``record.nonfinite_rewards_total``).

Actions: ``"stop"`` (default: checkpoint, halt record, stop), ``"warn"`` (log and go on), or
a callable ``f(violation, record)`` returning True to stop — e.g. :class:`QuarantineOnFlag`,
which instead of stopping sends the flagged environment's further updates to the quarantine
adapter (``mode="quarantine"``).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, GradrouteWarning
from .layers import LayerKey

if TYPE_CHECKING:
    from .router.records import StepRecord

ViolationKey = tuple[str, "str | None", "LayerKey | None"]


@dataclass
class Violation:
    """A crossed threshold."""

    rule: str
    value: float
    threshold: float
    step: int
    top_envs: list[tuple[str, float]] = field(default_factory=list)
    detail: str = ""
    env: str | None = None  # the environment the rule is about, when there is one
    layer: LayerKey | None = None  # the layer the rule is about (activation rules), when there is one

    @property
    def key(self) -> ViolationKey:
        """What makes two violations the same crossing: the rule, the environment, the layer."""
        return (self.rule, self.env, self.layer)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_envs"] = [[e, s] for e, s in self.top_envs]
        return d


def top_envs(record: StepRecord, n: int = 3) -> list[tuple[str, float]]:
    """Environments ranked by their share of the current adapter (of the step, before any split)."""
    shares = record.env_adapter_share or record.env_share or {}
    ranked = sorted(((e, s) for e, s in shares.items() if e != "_unattributed"), key=lambda x: -x[1])
    return [(e, round(float(s), 6)) for e, s in ranked[:n]]


class Rule:
    """Base class: ``check(record, history) -> Violation | None``; ``action`` overrides the policy's."""

    name = "rule"
    action: str | Callable[..., Any] | None = None

    def check(self, record: StepRecord, history: Sequence[StepRecord]) -> Violation | None:  # pragma: no cover
        raise NotImplementedError

    def _v(self, record: StepRecord, value: float, threshold: float, detail: str = "") -> Violation:
        return Violation(self.name, float(value), float(threshold), int(record.step), top_envs(record), detail)

    def _worst_env(self, record: StepRecord, values: dict[str, float], threshold: float, what: str = "") -> Violation | None:
        """A violation for the environment with the largest value, if it exceeds ``threshold``.
        Environments already handled by a :class:`QuarantineOnFlag` action for this rule are
        passed over, so that the next environment to cross is named too."""
        handled = getattr(self, "_handled", ())
        values = {e: v for e, v in values.items() if e not in handled}
        if not values:
            return None
        env, value = max(values.items(), key=lambda x: x[1])
        if value <= threshold:
            return None
        v = self._v(record, value, threshold, f"environment {env!r}{what}")
        v.env = env
        return v

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, **{k: v for k, v in vars(self).items()
                                      if not k.startswith("_") and k not in ("action", "name")}}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(name: str, value: float) -> float:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        why = " (a rule with an infinite threshold can never fire)" if _is_number(value) and value == math.inf else ""
        raise ConfigError(f"{name} must be a finite positive number, got {value!r}{why}.",
                          f"pass {name}=<number > 0>, or leave it unset (None) to turn the rule off.")
    return float(value)


def _count(name: str, value: Any, minimum: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.",
                          f"pass {name}=<integer >= {minimum}>.")
    return value


class AdapterNormRule(Rule):
    name = "max_adapter_norm"

    def __init__(self, max_norm: float, action: Any = None):
        self.max_norm = _positive("max_adapter_norm", max_norm)
        self.action = action

    def check(self, record, history):
        v = record.adapter_norm
        return self._v(record, v, self.max_norm) if v > self.max_norm else None


class GrowthRule(Rule):
    name = "max_growth"

    def __init__(self, max_growth: float, window: int = 10, action: Any = None):
        self.max_growth = _positive("max_growth", max_growth)
        self.window = _count("growth_window", window, 1)
        self.action = action

    def check(self, record, history):
        past = [h for h in history if h.step <= record.step - self.window]
        base = past[-1].adapter_norm if past else 0.0  # within the first window: since the start
        growth = record.adapter_norm - base
        return self._v(record, growth, self.max_growth, f"over {self.window} steps") if growth > self.max_growth else None


class EnvShareRule(Rule):
    name = "max_env_share"

    def __init__(self, max_share: float, min_norm: float = 0.0, action: Any = None):
        if not (_is_number(max_share) and 0 < max_share <= 1):
            raise ConfigError(f"max_env_share must be a number in (0, 1], got {max_share!r}.",
                              "pass the largest share of the adapter one environment may build, e.g. 0.8.")
        if not (_is_number(min_norm) and math.isfinite(min_norm) and min_norm >= 0):
            why = " (the rule could never fire)" if _is_number(min_norm) and min_norm == math.inf else ""
            raise ConfigError(f"env_share_min_norm must be a finite number >= 0, got {min_norm!r}{why}.",
                              "pass the adapter norm from which shares are checked, e.g. 0.05 (0: always).")
        self.max_share = float(max_share)
        self.min_norm = float(min_norm)
        self.action = action

    def check(self, record, history):
        if record.adapter_norm < self.min_norm:
            return None
        shares = {e: s for e, s in record.env_adapter_share.items() if e != "_unattributed"}
        return self._worst_env(record, shares, self.max_share)


class ActivationDriftRule(Rule):
    """An environment's mean activation projection ``x = mean Uᵀh`` (a k-vector per layer) has moved
    ``z = ‖x̄ − μ‖ / (σ/√w)`` away from its baseline, where μ is the mean of x over the first
    ``baseline_steps`` records, σ² the baseline's mean squared distance from μ, and x̄ the mean
    of the environment's last ``window`` values (w of them; window = 1: the current one)."""

    name = "activation_z"

    def __init__(self, max_z: float, baseline_steps: int = 20, window: int = 1, min_std: float = 1e-6,
                 action: Any = None):
        self.max_z = _positive("max_activation_z", max_z)
        self.baseline_steps = _count("baseline_steps", baseline_steps, 2)
        self.window = _count("activation_window", window, 1)
        if not (_is_number(min_std) and math.isfinite(min_std) and min_std >= 0):
            raise ConfigError(f"min_std must be a finite number >= 0, got {min_std!r}.",
                              "pass a small relative floor for the baseline spread, e.g. 1e-6.")
        self.min_std = float(min_std)
        self.action = action

    def check(self, record, history):
        base = history[: self.baseline_steps]
        if len(base) < self.baseline_steps:
            return None
        worst: tuple[float, str, LayerKey] | None = None
        for env, layers in record.activation.items():
            for layer, value in layers.items():
                series = [h.activation[env][layer] for h in base if layer in h.activation.get(env, {})]
                if len(series) < 2:
                    continue
                k = len(value)
                recent = [h.activation[env][layer] for h in history[self.baseline_steps:]
                          if layer in h.activation.get(env, {})][-(self.window - 1):] \
                    if self.window > 1 else []
                recent.append(value)
                cur = [statistics.fmean(v[i] for v in recent) for i in range(k)]
                mu = [statistics.fmean(v[i] for v in series) for i in range(k)]
                var = statistics.fmean(sum((v[i] - mu[i]) ** 2 for i in range(k)) for v in series)
                scale = math.sqrt(sum(m * m for m in mu))
                sd = max(math.sqrt(var), self.min_std * max(1.0, scale)) / math.sqrt(len(recent))
                z = math.sqrt(sum((cur[i] - mu[i]) ** 2 for i in range(k))) / sd
                if worst is None or z > worst[0]:
                    worst = (z, env, layer)
        if worst and worst[0] > self.max_z:
            z, env, layer = worst
            v = self._v(record, z, self.max_z, f"environment {env!r}, layer {layer}")
            v.env, v.layer = env, layer
            v.top_envs = [(env, round(z, 3)), *[e for e in v.top_envs if e[0] != env]][:3]
            return v
        return None


class PushRule(Rule):
    """An environment's locating score ``Z_e = S_e(u) / sqrt(mean_j S_e(r_j)²)`` (its cumulative
    persona push over the cumulative pushes of random directions,
    :func:`gradroute.monitor.locate.locate_scores`, along the subspace's first direction at every
    probe layer) exceeds ``max_z``, once ``min_steps`` records are in.

    The sums are folded in one record at a time (the monitor keeps only a window of history);
    they restart with the records given when the step number goes back (a new run, a resume)."""

    name = "push_z"

    def __init__(self, max_z: float, min_steps: int = 5, action: Any = None, watch: bool = False):
        self.max_z = _positive("max_push_z", max_z)
        self.min_steps = _count("push_min_steps", min_steps, 1)
        self.action = action
        self.watch = bool(watch)  # read the watched (not routed) directions instead
        if self.watch:
            self.name = "watch_push_z"
        self._sums: dict[str, tuple[float, list[float]]] = {}
        self._last: int | None = None
        self._count = 0

    def _fold(self, rec: StepRecord) -> None:
        from .monitor.locate import push_terms

        for env, (p, r) in push_terms(rec, watch=self.watch).items():
            if env in self._sums:
                p0, r0 = self._sums[env]
                self._sums[env] = (p0 + p, [a + b for a, b in zip(r0, r)])
            else:
                self._sums[env] = (p, list(r))
        self._last = int(rec.step)
        self._count += 1

    def check(self, record, history):
        from .monitor.locate import z_score

        if self._last is None or record.step <= self._last:
            self._sums, self._count = {}, 0
            for h in history:
                if h is not record and h.step < record.step:
                    self._fold(h)
        self._fold(record)
        if self._count < self.min_steps:
            return None
        scores = {e: z for e, (p, r) in self._sums.items() if (z := z_score(p, r)) is not None}
        v = self._worst_env(record, scores, self.max_z, ": persona push")
        if v is not None:
            v.top_envs = [(e, round(z, 3)) for e, z in sorted(scores.items(), key=lambda x: -x[1])[:3]]
        return v


class NonFiniteRule(Rule):
    name = "nonfinite_update"

    def check(self, record, history):
        bad = record.nonfinite or not math.isfinite(record.update_norm)
        return self._v(record, float("nan"), 0.0, "NaN/Inf in the in-subspace update") if bad else None


class NonFiniteRewardRule(Rule):
    """More than ``max_count`` NaN/None rewards in one environment since the run started."""

    name = "max_nonfinite_rewards"

    def __init__(self, max_count: int = 0, action: Any = None):
        self.max_count = _count("max_nonfinite_rewards", max_count, 0)
        self.action = action

    def check(self, record, history):
        totals = record.nonfinite_rewards_total
        v = self._worst_env(record, totals, self.max_count, ": NaN/None rewards")
        if v is not None:
            v.top_envs = [(e, float(c)) for e, c in sorted(totals.items(), key=lambda x: -x[1])[:3]]
        return v


class QuarantineOnFlag:
    """A policy action for ``mode="quarantine"``: when a rule names an environment, add it to the
    quarantine set instead of stopping, so that from the next micro-batch on that environment's
    rows train only the discardable quarantine adapter.

        flagged = set()
        gradroute.attach(trainer, subspace, mode="quarantine", quarantine=flagged,
                         policy=gradroute.HaltPolicy(max_push_z=6, push_min_steps=3,
                                                     action=QuarantineOnFlag(flagged)))

    ``envs`` must be the very set passed as ``quarantine=`` (attach reads it at every
    micro-batch, or with ``quarantine_advantages="exclude"`` when each batch is generated). A
    crossing that names no environment (a non-finite update, an adapter-norm rule) cannot be
    quarantined: the run stops, as with ``action="stop"``; one that names an environment (its
    push, its share, NaN rewards in it) quarantines it, and the rule goes on to watch the other
    environments. One process only: with several, the ranks' sets could differ (refused). :attr:`flagged` maps
    each quarantined environment to the step its rule fired at. After a resume, pass the
    environments quarantined before (``flagged``, or the log's crossing records) in the set:
    this action does not travel in checkpoints."""

    __name__ = "quarantine"

    def __init__(self, envs: set[str]):
        if not isinstance(envs, set):
            raise ConfigError(f"QuarantineOnFlag needs the set passed as attach(..., quarantine=...), got {envs!r}.",
                              "pass one set object to both: flagged = set(); quarantine=flagged, "
                              "action=QuarantineOnFlag(flagged).")
        self.envs = envs
        self.flagged: dict[str, int] = {}

    def __call__(self, violation: Violation, record: StepRecord) -> bool:
        if violation.env is None:
            return True
        if violation.env not in self.envs:
            self.envs.add(violation.env)
            self.flagged[violation.env] = int(violation.step)
        return False


class HaltPolicy:
    """A set of rules and an action.

    ``HaltPolicy(max_adapter_norm=5.0, max_env_share=0.8, action="stop")``; more rules with
    ``rules=[...]`` or ``policy | other``.
    """

    def __init__(
        self,
        max_adapter_norm: float | None = None,
        max_growth: float | None = None,
        growth_window: int = 10,
        max_env_share: float | None = None,
        env_share_min_norm: float = 0.0,
        max_activation_z: float | None = None,
        baseline_steps: int = 20,
        activation_window: int = 1,
        max_push_z: float | None = None,
        push_min_steps: int = 5,
        max_watch_push_z: float | None = None,
        halt_on_nonfinite: bool = True,
        max_nonfinite_rewards: int | None = None,
        action: str | Callable[[Violation, StepRecord], Any] = "stop",
        rules: Sequence[Rule] = (),
    ):
        if not (callable(action) or (isinstance(action, str) and action in ("stop", "warn"))):
            raise ConfigError(f"action must be 'stop', 'warn' or a callable, got {action!r}.",
                              "pass action='stop', action='warn' or a function f(violation, record) -> bool.")
        if not isinstance(halt_on_nonfinite, bool):
            raise ConfigError(f"halt_on_nonfinite must be True or False, got {halt_on_nonfinite!r}.",
                              "pass a bool.")
        if isinstance(rules, Rule | str | bytes) or not isinstance(rules, Sequence | set | frozenset):
            raise ConfigError(f"rules must be a list of gradroute.policy.Rule, got {rules!r}.",
                              "pass rules=[rule, ...].")
        self.action = action
        self.rules: list[Rule] = []
        if max_adapter_norm is not None:
            self.rules.append(AdapterNormRule(max_adapter_norm))
        if max_growth is not None:
            self.rules.append(GrowthRule(max_growth, growth_window))
        if max_env_share is not None:
            self.rules.append(EnvShareRule(max_env_share, env_share_min_norm))
        if max_activation_z is not None:
            self.rules.append(ActivationDriftRule(max_activation_z, baseline_steps, activation_window))
        if max_push_z is not None:
            self.rules.append(PushRule(max_push_z, push_min_steps))
        if max_watch_push_z is not None:
            self.rules.append(PushRule(max_watch_push_z, push_min_steps, watch=True))
        if halt_on_nonfinite:
            self.rules.append(NonFiniteRule())
        if max_nonfinite_rewards is not None:
            self.rules.append(NonFiniteRewardRule(max_nonfinite_rewards))
        for r in rules:
            if not isinstance(r, Rule):
                raise ConfigError(f"{r!r} is not a gradroute.policy.Rule.",
                                  "pass instances of the rule classes in gradroute.policy (or subclasses of Rule).")
            self.rules.append(r)

    # the keywords a policy can be written with in a config file or on a command line, and their types
    SPEC_KEYS: dict[str, Callable[[Any], Any]] = {
        "max_adapter_norm": float, "max_growth": float, "growth_window": int, "max_env_share": float,
        "env_share_min_norm": float, "max_activation_z": float, "baseline_steps": int, "activation_window": int,
        "max_push_z": float, "push_min_steps": int, "max_watch_push_z": float,
        "halt_on_nonfinite": lambda v: v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes"),
        "max_nonfinite_rewards": int, "action": str}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | str | None, what: str = "policy") -> HaltPolicy | None:
        """A policy from a mapping (a YAML config) or ``'key=value,key=value'`` text (a command
        line): ``HaltPolicy.from_dict("max_env_share=0.95,action=warn")``. Values are converted to
        the keyword's type (:attr:`SPEC_KEYS`); an empty spec gives None (no policy). ``what``
        names the option in error messages."""
        if spec is None or spec == "" or spec == {}:
            return None
        if isinstance(spec, str):
            items: dict[str, str] = {}
            for part in spec.split(","):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise ConfigError(f"{what}: {part!r} is not key=value.",
                                      "write it like 'max_env_share=0.95,env_share_min_norm=0.05'.")
                k, v = part.split("=", 1)
                items[k.strip()] = v.strip()
            spec = items
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{what} must be key=value pairs or a mapping, got {spec!r}.",
                              "write it like 'max_env_share=0.95,action=warn'.")
        unknown = sorted(set(spec) - set(cls.SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{what}: unknown keys {unknown}.", f"use some of {sorted(cls.SPEC_KEYS)}.")
        try:
            kw = {k: cls.SPEC_KEYS[k](v) for k, v in spec.items()}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{what}: {e}.", "give numbers for the thresholds and window sizes.") from None
        return cls(**kw)

    def __or__(self, other: HaltPolicy) -> HaltPolicy:
        if not isinstance(other, HaltPolicy):
            raise ConfigError(f"cannot combine a HaltPolicy with {type(other).__name__}.",
                              "combine two HaltPolicy objects: policy_a | policy_b.")
        if other.action is not self.action and other.action != self.action:
            raise ConfigError("the two policies have different actions; the combination would keep only the first's.",
                              "give both the same action, or put the action on the rules themselves "
                              "(rule.action = ...) before combining.")
        out = HaltPolicy(halt_on_nonfinite=False, action=self.action)
        seen = set()
        for r in [*self.rules, *other.rules]:
            if isinstance(r, NonFiniteRule):
                if "nf" in seen:
                    continue
                seen.add("nf")
            out.rules.append(r)
        return out

    def fired(self, record: StepRecord, history: Sequence[StepRecord]) -> list[tuple[Rule, Violation]]:
        """Each rule that fires at this record, with its violation (pure: no action runs)."""
        return [(rule, v) for rule, v in ((r, r.check(record, history)) for r in self.rules) if v is not None]

    def decide(self, rule: Rule, violation: Violation, record: StepRecord) -> bool:
        """Run the action for a crossing of ``rule`` (warn, or the callable; the rule's own action
        wins over the policy's) and say whether to stop. Call once per crossing."""
        action = rule.action if rule.action is not None else self.action
        if isinstance(action, QuarantineOnFlag):
            stop = bool(action(violation, record))
            if not stop and violation.env is not None:  # this rule goes on to name the other environments
                rule.__dict__.setdefault("_handled", set()).add(violation.env)
            return stop
        if callable(action):
            return bool(action(violation, record))
        if action == "warn":
            v = violation
            warnings.warn(f"drift: {v.rule} = {v.value:.4g} > {v.threshold:.4g} at step {v.step} "
                          f"({v.detail}; top environments {v.top_envs})", GradrouteWarning, stacklevel=3)
        return action == "stop"

    def evaluate(self, record: StepRecord, history: Sequence[StepRecord],
                 active: set[ViolationKey] | None = None) -> list[tuple[Violation, bool]]:
        """The violations of this record that are *new* — whose :attr:`Violation.key` is not in
        ``active``, the crossings already above threshold at the previous step — each with whether
        it asks to stop (:meth:`decide`). ``active`` is replaced by this record's keys."""
        found = self.fired(record, history)
        out = [(v, self.decide(rule, v, record)) for rule, v in found if active is None or v.key not in active]
        if active is not None:
            active.clear()
            active.update(v.key for _, v in found)
        return out

    def describe(self) -> dict[str, Any]:
        return {"action": self.action if isinstance(self.action, str) else getattr(self.action, "__name__", "callable"),
                "rules": [r.describe() for r in self.rules]}
