"""TRL GRPO + accelerate FSDP2 on two CPU processes, for tests/test_fsdp2.py:
``python fsdp2_trainer_worker.py OUT_DIR MODE...``.

On CPU accelerate silently turns an FSDP configuration into DDP (its FSDP branch is for GPU
backends only), so :func:`use_fsdp2_on_cpu` — test-only — switches the built
``AcceleratorState`` to FSDP with an FSDP2 plugin after the trainer is made. ``train()`` then
runs accelerate's FSDP2 ``prepare`` (``fully_shard`` of every decoder block and the root,
parameters replaced by DTensors, optimizer parameters swapped) after ``gradroute.attach`` built
the router: the router must route the parameters the trainer steps.

Rank 0 writes ``OUT_DIR/<mode>.json`` (or the typed error) and ``OUT_DIR/<mode>.safetensors``:
the adapter coordinates, the routed weights before and after training and their bases. Launched
with accelerate's ``debug_launcher`` in a fresh interpreter (a forked process that already ran a
Trainer would hand the children accelerate's single-process state).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

LAYER = 3


def use_fsdp2_on_cpu(trainer: Any, layer_cls: str) -> None:
    """Test-only: make the trainer's accelerator prepare with FSDP2 although it runs on CPU.

    Call it right before ``train()``: constructing ``AcceleratorState()`` copies the process
    state (MULTI_CPU) back over ``distributed_type``."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[layer_cls], cpu_ram_efficient_loading=False,
        state_dict_type="SHARDED_STATE_DICT")
    state = trainer.accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def reward(completions: list[str], env: list[str], **kw: Any) -> list[float]:
    return [float(c.count("!")) if e == "bang" else float(c.count("a")) for c, e in zip(completions, env)]


def run(out_dir: str, mode: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch.distributed as dist
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import gradroute as gr
    from gradroute import projection as P
    from gradroute.testing import tiny_lm

    torch.manual_seed(0)
    model, tok = tiny_lm("llama")
    ds = Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(32)],
                            "env": ["bang" if i % 2 else "plain" for i in range(32)]})
    args = GRPOConfig(output_dir=str(Path(out_dir) / mode), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, learning_rate=1e-2, max_steps=2, report_to=[],
                      logging_steps=1, seed=0, disable_tqdm=True, save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    sub = gr.Subspace.from_directions({LAYER: torch.randn(2, 64, generator=torch.Generator().manual_seed(1))})
    handle = gr.attach(trainer, sub, env_column="env", mode=mode, check_provenance=False)
    router = handle.router
    # after attach: a fresh AcceleratorState() (attach's DeepSpeed check makes one) copies the process
    # state's MULTI_CPU back over the switch
    use_fsdp2_on_cpu(trainer, "LlamaDecoderLayer")
    fsdp2 = bool(trainer.accelerator.is_fsdp2)
    initial = {f"init.{m}": router._route(m).weight.detach().clone() for m in router.plan.modules}
    trainer.train()
    opt_params = [p for g in router.optimizer.param_groups for p in g["params"]]
    tensors = dict(initial)
    with torch.no_grad():
        for m in router.plan.modules:
            tensors[f"basis.{m}"] = router.basis(m).contiguous()
            tensors[f"weight.{m}"] = P.full(router._route(m).weight.detach()).contiguous()
            tensors[f"adapter.{m}"] = router.adapter_coords(m).contiguous()
    flat = torch.cat([t.double().reshape(-1) for t in tensors.values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    rec = handle.monitor.last
    facts = {
        "world": dist.get_world_size(),
        "fsdp2": fsdp2,
        "routes_dtensor": [P.is_sharded(r.weight) for r in router.routes_state],
        "routes_stepped": all(any(p is q for q in opt_params) for r in router.routes_state for p in r.trainable()),
        "optimizer_dtensor": all(P.is_sharded(p) for p in opt_params),
        "mode_params_dtensor": [P.is_sharded(p) for p in router.mode_strategy.trainable_parameters()],
        "axes": {t.module: t.axis for t in router.plan},
        "steps": router.steps,
        "samples": rec.samples,
        "rank_max_diff": max(float((g - flat).abs().max()) for g in gathered),
    }
    return tensors, facts


def main(out_dir: str, modes: list[str]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from gradroute.errors import GradrouteError

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for mode in modes:
        try:
            tensors, facts = run(out_dir, mode)
        except GradrouteError as e:  # a refusal is a result too (every rank raises alike)
            tensors, facts = {}, {"error": f"{type(e).__name__}: {e}"}
        if dist.get_rank() == 0:
            if tensors:
                save_file(tensors, str(Path(out_dir, f"{mode}.safetensors")))
            Path(out_dir, f"{mode}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(main, args=(sys.argv[1], sys.argv[2:] or ["update", "gradient", "activation"]), num_processes=2)
