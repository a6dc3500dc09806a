"""Environments: the one list of environment names, and the per-environment split.

:class:`Environments` is the vocabulary (names ↔ indices) shared by attribution (which indexes
rows by it) and the split below; ``_unattributed`` is reserved for in-subspace updates made
before the first attributed step or in steps given no environments.

:class:`EnvSplit` splits each step's ΔA across environments by per-module shares that sum to
one (float64), ``A_e += s_e ΔA``, so that Σ_e A_e = A exactly and one environment's adapter
can be dropped alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError, EnvColumnError
from .route import Route

UNATTRIBUTED = "_unattributed"


class Environments:
    """The environment list: names in first-seen (or declared) order, plus the reserved
    ``_unattributed`` once an update has no environment. ``fixed`` refuses new user names."""

    def __init__(self, names: Sequence[Any] | None = None):
        self.names: list[str] = []
        self.fixed = names is not None
        for n in names or []:
            n = str(n)
            if n in self.names:
                raise ConfigError(f"duplicate environment names in {list(names or [])}.",
                                  "give each environment one name.")
            self._check_name(n)
            self.names.append(n)
        self.unattributed = False  # whether _unattributed holds a share

    @staticmethod
    def _check_name(name: str) -> None:
        if name == UNATTRIBUTED:
            raise EnvColumnError(f"{UNATTRIBUTED!r} is reserved for updates with no environment.",
                                 "rename that environment.")

    def index(self, name: Any) -> int:
        """Index of ``name``, adding it unless the vocabulary is fixed."""
        name = str(name)
        try:
            return self.names.index(name)
        except ValueError:
            if self.fixed:
                raise EnvColumnError(
                    f"environment {name!r} is not among the declared environments {self.names}.",
                    "declare every environment (envs=[...]) or leave envs unset to learn them as they come.",
                ) from None
            self._check_name(name)
            self.names.append(name)
            return len(self.names) - 1

    def register(self, name: str) -> None:
        """A name that received an adapter share (``_unattributed`` included)."""
        if name == UNATTRIBUTED:
            self.unattributed = True
        elif name not in self.names:
            self.names.append(name)  # explicit env_weights may name environments attribution never saw

    def all(self) -> list[str]:
        """Every name that can hold a share, ``_unattributed`` first."""
        return ([UNATTRIBUTED] if self.unattributed else []) + self.names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> str:
        return self.names[i]


class EnvSplit:
    """Per-environment shares of the adapter, kept in the routes' coordinate blocks."""

    def __init__(self, routes: list[Route], environments: Environments):
        self.routes = routes
        self.environments = environments

    @property
    def split_envs(self) -> list[str]:
        """Environments holding a share of the adapter (in the environment list's order)."""
        held = {e for r in self.routes for e in r.blocks[0].env}
        return [e for e in self.environments.all() if e in held]

    def parse(self, env_weights: Mapping[str, Any] | None) -> dict[str, dict[str, float]] | None:
        """``{env: share}`` or ``{env: {module: share}}`` → per-module shares summing to exactly 1."""
        if env_weights is None:
            return None
        if not isinstance(env_weights, Mapping) or not env_weights:
            raise ConfigError("env_weights must be a non-empty mapping {env: share} or {env: {module: share}}.",
                              "pass e.g. env_weights={'math': 0.7, 'code': 0.3}.")
        per_module = any(isinstance(v, Mapping) for v in env_weights.values())
        if per_module and not all(isinstance(v, Mapping) for v in env_weights.values()):
            raise ConfigError("env_weights mixes global and per-module shares.",
                              "give either {env: share} or {env: {module: share}} for every environment.")
        out: dict[str, dict[str, float]] = {}
        for r in self.routes:
            name = r.name
            raw: dict[str, float] = {}
            for e, v in env_weights.items():
                if per_module and name not in v:
                    continue
                x = v[name] if per_module else v
                if isinstance(x, bool) or not isinstance(x, int | float):
                    raise ConfigError(f"env_weights[{e!r}] for {name!r} is {x!r}, not a number.",
                                      "give each environment a numeric share.")
                raw[str(e)] = float(x)
            if not raw or not all(math.isfinite(x) for x in raw.values()):
                raise ConfigError(f"env_weights for module {name!r} are missing or not finite: {raw}.",
                                  "give every routed module finite shares.")
            total = math.fsum(raw.values())
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(f"env shares for {name!r} sum to {total:.9g}, not 1.",
                                  "normalize the shares (they may be negative, but must sum to 1).")
            envs = list(raw)
            raw[envs[-1]] = 1.0 - math.fsum(raw[e] for e in envs[:-1])  # exact: sums to 1 in float64
            out[name] = raw
        return out

    def unattributed(self) -> dict[str, dict[str, float]]:
        return {r.name: {UNATTRIBUTED: 1.0} for r in self.routes}

    def accumulate(self, shares: dict[str, dict[str, float]], deltas: dict[str, list[torch.Tensor]]) -> None:
        """``A_e += s_e ΔA`` per module and block; what was routed before the first split step
        becomes the ``_unattributed`` share."""
        first = not self.split_envs
        for r in self.routes:
            for b, d in zip(r.blocks, deltas[r.name]):
                if first:
                    before = b.adapter - d
                    if bool(before.abs().max() > 0):
                        b.env[UNATTRIBUTED] = before
                for env, s in shares[r.name].items():
                    b.env[env] = b.env[env] + d * s if env in b.env else d * s
        for r in self.routes:
            for env in r.blocks[0].env:
                self.environments.register(env)

    def drop(self, env: str | None) -> None:
        """Forget the shares (all, or one environment's)."""
        for r in self.routes:
            for b in r.blocks:
                if env is None:
                    b.env.clear()
                else:
                    b.env.pop(env, None)

    def adapter_shares(self) -> dict[str, float]:
        """Who built the current adapter: ``⟨A_e, A⟩ / ‖A‖²`` per environment (sums to 1)."""
        num: dict[str, float] = {}
        total = 0.0
        for r in self.routes:
            flat = r.flat()
            total += float(flat @ flat)
            for e in self.split_envs:
                fe = r.flat(e)
                if fe is not None:
                    num[e] = num.get(e, 0.0) + float(fe @ flat)
        return {e: (v / total if total > 0 else 0.0) for e, v in num.items()}

    def adapter_norms(self) -> dict[str, float]:
        return {e: math.sqrt(sum(r.norm_sq(e) for r in self.routes)) for e in self.split_envs}
