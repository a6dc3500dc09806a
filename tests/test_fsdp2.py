"""FSDP2 (``fully_shard``, DTensor parameters): two gloo processes on CPU give the one-process
run's adapter and base weights, in every mode, with the routed parameters really sharded.

The two-process runs are made once per module by ``tests/scripts/fsdp2_worker.py`` (a fresh
interpreter spawning 2 ranks); the one-process references run here, from the same script's
:func:`run_case`. Checks per case:

- the parameters the router routes (and activation mode's adapters) are DTensors, and both
  ranks end with the same adapter and weights;
- the sharded bookkeeping is exact: update mode's adapter is ``Uᵀ(W_t − W_0)`` of the gathered
  weights, the base keeps no in-subspace change (gradient mode: to float32 round-off), the
  writers pinned by activation mode keep their initial coordinates;
- one process vs two: adapter, routed base weights and every parameter agree to round-off
  (FSDP2 averages the halves' gradients in another order; AdamW amplifies that only slightly
  after 3 steps: measured ≤ 7e-5, against lr = 1e-2 per step).

Then the same through TRL's GRPOTrainer with accelerate's FSDP2 prepare (switched on for CPU by a
test-only shim, ``tests/scripts/fsdp2_trainer_worker.py``). Besides: the rebinding of replaced
parameters (what FSDP2 and accelerate's ``prepare`` do) in one process, and ``unwrap_model`` on
training wrappers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradroute as gr
from gradroute import projection as P
from gradroute.errors import ConfigError

WORKER = Path(__file__).parent / "scripts" / "fsdp2_worker.py"
ATOL_RUNS = 2e-4     # one process vs two, after 3 AdamW steps at lr 1e-2 (measured ≤ 7e-5)
ATOL_ADAPTER = 1e-4  # measured ≤ 1.2e-5


def _worker():
    spec = importlib.util.spec_from_file_location("fsdp2_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKER), str(out), *W.CASES], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _result(out: Path, case: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    facts = json.loads((out / f"{case}.json").read_text())
    assert "error" not in facts, facts["error"]
    return load_file(str(out / f"{case}.safetensors")), facts


def _modules(t: dict[str, torch.Tensor]) -> list[str]:
    return [k[len("adapter."):] for k in t if k.startswith("adapter.")]


def _check_sharded_run(t: dict[str, torch.Tensor], facts: dict) -> None:
    assert facts["fsdp2"] and facts["unwrapped_is_model"]  # fully_shard shards in place
    assert facts["routes_dtensor"] and all(facts["routes_dtensor"])
    assert all(facts["params_dtensor"])
    assert all(facts["mode_params_dtensor"])
    assert facts["steps"] == W.STEPS
    assert facts["rank_max_diff"] == 0.0  # both ranks: the same adapter and weights
    assert facts["discarded_norm"] > 0 and facts["adapter_norm_after_discard"] == 0.0
    for m in _modules(t):  # discarding on the shards leaves the base (float32 rounding of the weights)
        assert torch.allclose(t[f"discarded.{m}"].double(), t[f"base.{m}"].double(), rtol=0, atol=1e-6)


def _compare_with_one_process(case: str, t: dict[str, torch.Tensor]) -> dict[str, float]:
    ref, _ = W.run_case(case)
    assert set(ref) == set(t)
    worst: dict[str, float] = {}
    for k, v in ref.items():
        kind = k.split(".", 1)[0]
        worst[kind] = max(worst.get(kind, 0.0), float((t[k].double() - v.double()).abs().max()))
    assert worst["adapter"] <= ATOL_ADAPTER, worst
    assert worst["base"] <= ATOL_RUNS and worst["param"] <= ATOL_RUNS, worst
    assert max(float(t[f"adapter.{m}"].abs().max()) for m in _modules(t)) > 1e-3  # something was routed
    return worst


@pytest.mark.distributed
def test_projection_on_dtensors(runs):
    """The subspace algebra on sharded tensors equals the algebra on the whole tensors."""
    worst = json.loads((runs / "projection.json").read_text())
    assert set(worst) == {"coords", "project", "remove", "add_lift", "energy_fraction", "relative_in_subspace_norm"}
    assert max(worst.values()) <= 1e-12, worst


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["update_llama", "update_gpt2"])
def test_update_mode_on_fsdp2_shards(runs, case):
    t, facts = _result(runs, case)
    _check_sharded_run(t, facts)
    for m in _modules(t):
        U, axis = t[f"basis.{m}"].double(), facts["axes"][m]
        moved = t[f"weight.{m}"].double() - t[f"init.{m}"].double()
        # the adapter read off the shards is exactly the gathered weights' in-subspace change
        assert torch.allclose(t[f"adapter.{m}"], P.coords(moved, U, axis), rtol=0, atol=1e-12)
        assert P.relative_in_subspace_norm(t[f"base.{m}"].double() - t[f"init.{m}"].double(), U, axis) <= 1e-10
    _compare_with_one_process(case, t)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["gradient_llama", "gradient_gpt2"])
def test_gradient_mode_on_fsdp2_shards(runs, case):
    t, facts = _result(runs, case)
    _check_sharded_run(t, facts)
    for m in _modules(t):
        U, axis = t[f"basis.{m}"].double(), facts["axes"][m]
        w0, w = t[f"init.{m}"].double(), t[f"weight.{m}"].double()
        # the writers' in-subspace change is the adapter (float32 round-off), the base keeps none
        assert torch.allclose(P.coords(w - w0, U, axis), t[f"adapter.{m}"], rtol=0, atol=1e-6)
        assert P.relative_in_subspace_norm(t[f"base.{m}"].double() - w0, U, axis) <= 1e-5
    _compare_with_one_process(case, t)


@pytest.mark.distributed
def test_first_order_post_norm_on_fsdp2_shards(runs):
    """post_norm='first_order' holds each post-norm gain at its attach value: written back on
    the gain's shard (was: a crash at the first step, a sharded copy written into a shard)."""
    t, facts = _result(runs, "activation_olmo2_first_order")
    _check_sharded_run(t, facts)
    from gradroute.testing import tiny_family

    init = dict(tiny_family("olmo2").named_parameters())
    held = [k for k in t if k.startswith("param.") and ".post_" in k and k.endswith("layernorm.weight")
            and ".layers.2." not in k]  # blocks 0-1: up to the last persona layer
    assert held
    for k in held:  # the held gains are exactly their attach values after 3 AdamW steps with weight decay
        assert torch.equal(t[k], init[k[len("param."):]].detach()), k
    _compare_with_one_process("activation_olmo2_first_order", t)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["activation_llama", "activation_gpt2"])
def test_activation_mode_on_fsdp2_shards(runs, case):
    from gradroute.router.modes import ActivationMode

    if not ActivationMode.supports_sharding:  # refused, with a typed error, until the mode shards
        facts = json.loads((runs / f"{case}.json").read_text())
        assert facts["error"].startswith("ConfigError") and "Fix:" in facts["error"]
        return
    t, facts = _result(runs, case)
    _check_sharded_run(t, facts)  # including the adapters, sharded with the model
    for m in _modules(t):
        U, axis = t[f"basis.{m}"].double(), facts["axes"][m]
        # the base never moves inside the span: the pins held on the shards
        assert P.relative_in_subspace_norm(t[f"weight.{m}"].double() - t[f"init.{m}"].double(), U, axis) <= 1e-5
    _compare_with_one_process(case, t)


@pytest.mark.distributed
def test_unroutable_sharded_setups_are_refused(runs):
    errors = {c: json.loads((runs / f"{c}.json").read_text()).get("error", "") for c in
              ("activation_after_shard", "lora_update")}
    # activation adapters added to an already-sharded model would not be sharded/averaged with it
    from gradroute.router.modes import ActivationMode

    assert errors["activation_after_shard"].startswith("ConfigError: ") and "Fix:" in errors["activation_after_shard"]
    if ActivationMode.supports_sharding:
        assert "before fully_shard" in errors["activation_after_shard"]
    # a LoRA policy's effective weight W + s·B·A is not read from shards
    assert errors["lora_update"].startswith("RoutingError: ") and "Fix:" in errors["lora_update"]


# --------------------------------------------------------------------------- TRL + accelerate FSDP2
TRAINER_WORKER = Path(__file__).parent / "scripts" / "fsdp2_trainer_worker.py"


@pytest.mark.slow
@pytest.mark.distributed
def test_grpo_with_accelerate_fsdp2(tmp_path):
    """``gradroute.attach`` before ``train()``, in which accelerate's FSDP2 prepare replaces the
    parameters by DTensors: the router routes the ones the trainer's optimizer steps (was:
    ConfigError "the optimizer steps none of the routed model's trainable parameters")."""
    from gradroute.router.modes import ActivationMode

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    modes = ["update", "gradient", "activation"]
    r = subprocess.run([sys.executable, str(TRAINER_WORKER), str(tmp_path), *modes], env=env, capture_output=True,
                       text=True, timeout=400, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    for mode in modes:
        facts = json.loads((tmp_path / f"{mode}.json").read_text())
        if mode == "activation" and not ActivationMode.supports_sharding:
            assert facts["error"].startswith("ConfigError") and "Fix:" in facts["error"]
            continue
        assert "error" not in facts, (mode, facts["error"])
        t = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / f"{mode}.safetensors"))
        assert facts["fsdp2"] and facts["world"] == 2
        assert all(facts["routes_dtensor"]) and facts["optimizer_dtensor"] and facts["routes_stepped"]
        assert all(facts["mode_params_dtensor"])
        assert facts["steps"] == 2 and facts["rank_max_diff"] == 0.0
        # per-environment attribution is summed over the ranks: 2 ranks x 4 rows
        assert set(facts["samples"]) == {"bang", "plain"} and sum(facts["samples"].values()) == 8.0
        for m in _modules(t):
            U, axis = t[f"basis.{m}"].double(), facts["axes"][m]
            moved = t[f"weight.{m}"].double() - t[f"init.{m}"].double()
            if mode == "update":
                assert torch.allclose(t[f"adapter.{m}"], P.coords(moved, U, axis), rtol=0, atol=1e-12)
            elif mode == "gradient":
                assert torch.allclose(t[f"adapter.{m}"], P.coords(moved, U, axis), rtol=0, atol=1e-6)
            else:  # the base writers held their in-span coordinates on the shards
                assert P.relative_in_subspace_norm(moved, U, axis) <= 1e-5
        assert max(float(t[f"adapter.{m}"].abs().max()) for m in _modules(t)) > 0


# --------------------------------------------------------------------------- one process
def _replace_parameters(model: torch.nn.Module) -> None:
    """What FSDP2 / accelerate's prepare do to a model: new parameter objects, same values."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_router_routes_replaced_parameters(mode):
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    ref_model, _ = tiny_lm("llama")
    sub = W.subspace("llama")
    ids = W.batch()
    routers = []
    for m in (model, ref_model):
        routers.append(gr.GradientRouter(m, sub, mode=mode, check_provenance=False))
    _replace_parameters(model)  # after the router was built, before the optimizer
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, ref_model)]
    for router, opt in zip(routers, opts):
        router.bind_optimizer(opt)  # was: ConfigError "the optimizer steps none of the routed ... parameters"
    for _ in range(2):
        for m, router, opt in zip((model, ref_model), routers, opts):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            router.step()
            opt.zero_grad()
    for mod in routers[0].plan.modules:
        assert routers[0]._route(mod).weight is model.get_submodule(mod).weight
        assert torch.equal(routers[0].adapter_coords(mod), routers[1].adapter_coords(mod))
        assert float(routers[0].adapter_coords(mod).abs().max()) > 0


def test_step_follows_parameters_replaced_without_rebinding_the_optimizer():
    """A loop without ``optimizer=``: the router still reads the parameters the model holds."""
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    sub = W.subspace("llama")
    router = gr.GradientRouter(model, sub, mode="update", check_provenance=False)
    _replace_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = W.batch()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    rec = router.step()
    assert rec is not None and rec.update_norm > 0  # the stale parameters did not move; the new ones did


def test_optimizer_of_another_model_still_refused():
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    other, _ = tiny_lm("llama")
    router = gr.GradientRouter(model, W.subspace("llama"), check_provenance=False)
    with pytest.raises(ConfigError, match="steps none of the routed"):
        router.bind_optimizer(torch.optim.SGD(other.parameters(), lr=0.1))


def test_rebind_to_the_trained_model():
    """The trainer callback hands the model as wrapped for training: the router's own model inside a
    wrapper is fine; another model object is refused (the router's hooks are not on it)."""
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    router = gr.GradientRouter(model, W.subspace("llama"), check_provenance=False)

    class DistributedDataParallel(torch.nn.Module):  # stands for torch's (unwrap_model reads the name)
        def __init__(self, module):
            super().__init__()
            self.module = module

    _replace_parameters(model)
    assert set(router.rebind(DistributedDataParallel(model))) == set(router.plan.modules)
    name = router.plan.modules[0]
    assert router._route(name).weight is model.get_submodule(name).weight
    assert router.rebind(DistributedDataParallel(model)) == []
    other, _ = tiny_lm("llama")
    with pytest.raises(ConfigError, match="not the one the router was built on"):
        router.rebind(DistributedDataParallel(other))


def test_unwrap_model_knows_training_wrappers():
    from gradroute.model import is_fsdp2, unwrap_model
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")

    def wrapper(name: str, attr: str):
        cls = type(name, (torch.nn.Module,), {})
        w = cls()
        setattr(w, attr, model)
        return w

    for name, attr in (("DistributedDataParallel", "module"), ("FullyShardedDataParallel", "module"),
                       ("DeepSpeedEngine", "module"), ("OptimizedModule", "_orig_mod")):
        assert unwrap_model(wrapper(name, attr)) is model
    assert unwrap_model(wrapper("OptimizedModule", "module")) is not model  # compile keeps _orig_mod
    assert not is_fsdp2(model)


def test_full_weight_saves_are_refused_on_shards(tmp_path, monkeypatch):
    """Writing full base weights needs a gather gradroute does not do: refused with the trainer's
    full-state-dict path as the fix; the adapter alone (base='none') is still written."""
    import gradroute as gr
    from gradroute.errors import AdapterError
    from gradroute.router import GradientRouter
    from gradroute.testing import tiny_lm

    model, _ = tiny_lm("llama")
    router = GradientRouter(model, gr.Subspace.from_directions({1: torch.randn(1, 64)}), check_provenance=False)
    monkeypatch.setattr(GradientRouter, "sharded", property(lambda self: True))
    for call in (lambda: gr.save_adapter(router, tmp_path / "a"), lambda: gr.save_discarded(router, tmp_path / "d")):
        with pytest.raises(AdapterError, match="FSDP2") as e:
            call()
        assert "get_state_dict" in str(e.value)
    gr.save_adapter(router, tmp_path / "alone", base="none")
    assert (tmp_path / "alone" / "adapter_model.safetensors").is_file()
