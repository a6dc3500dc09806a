"""The router's state file (checkpoints): ``router_state.safetensors`` + ``router.json``.

Tensors: per module and coordinate block ``ref0.<i>.<module>`` (Uᵀ P_0), ``adapter.<i>.<module>``
(A), ``env.<j>.<i>.<module>`` (environment j's share), plus what the mode and attribution add.
``router.json`` holds the format tag, mode, step count, plan fingerprint, subspace hash, the
environment list, the mode's and attribution's metadata, and the sha256 of the tensor file.
Block 0 is the weight, block 1 a routed bias. Nothing is pickled.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import _io
from ..errors import AdapterError, FileFormatError, GradrouteWarning
from .envs import UNATTRIBUTED

if TYPE_CHECKING:
    from .core import GradientRouter

STATE_FORMAT = "gradroute.router_state"
STATE_FILE = "router_state.safetensors"
STATE_META = "router.json"


def state_dict(router: GradientRouter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (safetensors-ready) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    envs = router.envs
    router.mode_strategy.sync_state()
    for r in router.routes_state:
        for i, b in enumerate(r.blocks):
            tensors[f"ref0.{i}.{r.name}"] = b.ref0
            tensors[f"adapter.{i}.{r.name}"] = b.adapter
            for j, env in enumerate(envs):
                if env in b.env:
                    tensors[f"env.{j}.{i}.{r.name}"] = b.env[env]
    mode_t, mode_meta = router.mode_strategy.state_dict()
    tensors.update({f"mode.{k}": v for k, v in mode_t.items()})
    attr_meta: dict[str, Any] = {}
    if router.attribution is not None:
        at, attr_meta = router.attribution.state_dict()
        tensors.update({f"attr.{k}": v for k, v in at.items()})
    meta = {
        "format": STATE_FORMAT,
        "format_version": 2,
        "mode": router.mode,
        "mode_state": mode_meta,
        "attribution": attr_meta,
        "steps": router.steps,
        "plan_fingerprint": router.plan.fingerprint(),
        "subspace_hash": router.subspace.content_hash,
        "modules": router.plan.modules,
        "targets": [[t.module, t.layer, t.side] for t in router.plan],
        "route_bias": any(t.bias for t in router.plan),
        "envs": envs,
        "env_vocab": list(router.environments.names),
        "nonfinite_rewards_total": dict(router._nf_rewards_total),
    }
    return tensors, meta


def load_state_dict(router: GradientRouter, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    if meta.get("format") != STATE_FORMAT:
        raise AdapterError("not a gradroute router state.",
                           "pass the directory written by router.save_state (a checkpoint's gradroute/).")
    if meta.get("plan_fingerprint") != router.plan.fingerprint() or meta.get("subspace_hash") != router.subspace.content_hash:
        raise AdapterError(
            "the router state was saved for another routing plan or subspace "
            f"(modules {meta.get('modules')}, subspace {str(meta.get('subspace_hash'))[:12]}).",
            "build the router with the same subspace and options as the run that saved it.",
        )
    if meta.get("mode") != router.mode:
        raise AdapterError(f"the state is from mode {meta.get('mode')!r}, this router is {router.mode!r}.",
                           f"create the router with mode={meta.get('mode')!r}.")
    envs = [str(e) for e in meta.get("envs", [])]

    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise FileFormatError(f"the router state lacks tensor {key!r} (damaged or from another version).",
                                  "resume from a complete checkpoint written by this gradroute version.")
        return tensors[key]

    with torch.no_grad():
        for r in router.routes_state:
            dev = r.weight.device
            for i, b in enumerate(r.blocks):
                b.ref0 = get(f"ref0.{i}.{r.name}").to(dev, r.dtype)
                b.adapter = get(f"adapter.{i}.{r.name}").to(dev, r.dtype)
                b.env = {e: tensors[f"env.{j}.{i}.{r.name}"].to(dev, r.dtype) for j, e in enumerate(envs)
                         if f"env.{j}.{i}.{r.name}" in tensors}
            # the model's weights must be the ones this state was saved with
            b0 = r.blocks[0]
            realized = b0.coords() - (b0.adapter if router.mode_strategy.weights_hold_adapter else 0)
            scale = float(realized.abs().max()) + float(b0.ref0.abs().max()) + 1e-12
            if float((realized - b0.ref0).abs().max()) > 1e-5 * scale:
                warnings.warn(
                    f"{r.name}: the model's weights do not match the loaded router state "
                    "(was a different checkpoint loaded?). Re-syncing: the difference goes to the base.",
                    GradrouteWarning, stacklevel=3)
                for b in r.blocks:
                    b.ref0 = b.coords() - (b.adapter if router.mode_strategy.weights_hold_adapter else 0)
            r.version = r.versions()
    for e in list(meta.get("env_vocab", [])) + envs:
        if e == UNATTRIBUTED or e not in router.environments.names:
            router.environments.register(e)
    router.steps = int(meta.get("steps", 0))
    router._nf_rewards = {}
    router._nf_rewards_total = {str(e): int(n) for e, n in (meta.get("nonfinite_rewards_total") or {}).items()}
    if router.attribution is not None and meta.get("attribution"):
        router.attribution.load_state_dict(
            {k[5:]: v for k, v in tensors.items() if k.startswith("attr.")}, meta["attribution"])
    router.mode_strategy.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("mode.")},
                                         dict(meta.get("mode_state") or {}))


def save(router: GradientRouter, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, meta = state_dict(router)
    _io.save_tensors(path / STATE_FILE, tensors)
    if not (path / "subspace" / "subspace.json").is_file():
        router.subspace.save(path / "subspace")
    meta["tensor_sha256"] = _io.sha256_file(path / STATE_FILE)
    _io.write_json(path / STATE_META, meta)
    return path


def load(router: GradientRouter, path: str | Path) -> None:
    path = Path(path)
    meta = read_meta(path)
    if _io.sha256_file(path / STATE_FILE) != meta.get("tensor_sha256"):
        raise FileFormatError(f"{path / STATE_FILE} does not match {STATE_META} (corrupt or modified).",
                              "resume from an intact checkpoint (or the last clean one).")
    load_state_dict(router, _io.load_tensors(path / STATE_FILE), meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The state file's metadata (a JSON object), or a FileFormatError naming what is wrong."""
    meta = _io.read_json(Path(path) / STATE_META)
    if not isinstance(meta, dict):
        raise FileFormatError(f"{Path(path) / STATE_META} holds a JSON {type(meta).__name__}, not the router state's "
                              "metadata object (damaged or not a router state).",
                              "pass a checkpoint's gradroute/ directory written by router.save_state.")
    try:
        int(meta.get("steps", 0))
    except (TypeError, ValueError):
        raise FileFormatError(f"{Path(path) / STATE_META}: steps is {meta.get('steps')!r}, not an integer (damaged).",
                              "resume from an intact checkpoint (or the last clean one).") from None
    return meta
