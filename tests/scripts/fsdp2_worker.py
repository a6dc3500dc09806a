"""Raw FSDP2 (``fully_shard``) runs for tests/test_fsdp2.py: ``python fsdp2_worker.py OUT_DIR CASE...``.

Two gloo processes on CPU each train the same tiny model on their half of a fixed batch, with
the model sharded by ``fully_shard`` (each decoder block, then the root), an AdamW optimizer
with weight decay and a router in the case's mode. FSDP2 averages the two halves' gradients,
so the run is the one-process run on the whole batch (equal-length rows, mean loss) up to float
round-off. Rank 0 writes, per case, ``OUT_DIR/<case>.safetensors`` (the adapter coordinates, the
routed modules' base weights and every parameter, all gathered to full tensors) and
``OUT_DIR/<case>.json`` (which tensors were DTensors, the ranks' disagreement, timings); then it
discards the adapter on every rank and records the routed weights (``discarded.<m>``).

:func:`run_case` with ``world=1`` is the one-process reference the test compares against.
Launched in a fresh interpreter (``torch.multiprocessing`` spawn, a free port) so that the
children start clean.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROWS, LENGTH, STEPS = 8, 12, 3

#: case -> (architecture, mode, router options, when the router is built: before/after fully_shard)
CASES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # Linear writers and readers (weights sharded along the basis axis for writers: all-reduce;
    # along the other axis for readers: all-gather of coordinates); router built on the sharded model
    "update_llama": ("llama", "update", {"side": "both"}, "after"),
    # GPT-2 Conv1D writers (transposed: sharded along the other axis) and their biases; router built
    # before fully_shard, so it must find the DTensor parameters by name when the optimizer is bound
    "update_gpt2": ("gpt2", "update", {}, "before"),
    "gradient_llama": ("llama", "gradient", {"adapter_lr": 1e-2}, "after"),
    "gradient_gpt2": ("gpt2", "gradient", {"adapter_lr": 1e-2}, "before"),
    # the adapters are parameters of the model: the router must exist before fully_shard shards them
    "activation_llama": ("llama", "activation", {}, "before"),
    "activation_gpt2": ("gpt2", "activation", {}, "before"),
    # a post-norm family (OLMo 2) to first order: the held norm gains are written back on their shards
    "activation_olmo2_first_order": ("olmo2", "activation", {"post_norm": "first_order"}, "before"),
    # refusals: a typed error on every rank, never a wrong adapter
    "activation_after_shard": ("llama", "activation", {}, "after"),   # adapters would not be sharded
    "lora_update": ("llama+lora", "update", {}, "before"),             # W + s·B·A is not read from shards
}


def batch() -> torch.Tensor:
    return torch.randint(3, 100, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))


def subspace(arch: str) -> Any:
    import gradroute as gr

    g = torch.Generator().manual_seed(1)
    return gr.Subspace.from_directions({L: torch.randn(2, 64, generator=g) for L in (1, 2)})


def shard(model: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradroute.model import decoder_layers_path, unwrap_model

    mesh = init_device_mesh("cpu", (world,))
    base = unwrap_model(model)
    for block in base.get_submodule(decoder_layers_path(base)):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run_case(case: str, rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train ``case`` on this rank's rows (all rows when ``world == 1``, without FSDP); returns
    full tensors (``adapter.<m>``, ``base.<m>``, ``param.<name>``) and facts about the run."""
    import gradroute as gr
    from gradroute import projection as P
    from gradroute.testing import tiny_family, tiny_lm

    arch, mode, opts, when = CASES[case]
    torch.manual_seed(0)
    model = tiny_family(arch) if arch == "olmo2" else tiny_lm(arch.split("+")[0])[0]
    if arch.endswith("+lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    model.eval()  # no dropout: the two runs see the same function
    sub = subspace(arch)
    ids = batch()
    if world > 1:
        per = ROWS // world
        ids = ids[rank * per:(rank + 1) * per]
    sharded = world > 1
    if sharded and when == "after":
        shard(model, world)
    router = gr.GradientRouter(model, sub, mode=mode, check_provenance=False, **opts)
    if sharded and when == "before":
        shard(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    router.bind_optimizer(opt)
    initial = {f"init.{m}": P.full(router._route(m).weight.detach()).clone() for m in router.plan.modules}
    t0 = time.perf_counter()
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        router.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    tensors: dict[str, torch.Tensor] = dict(initial)
    with torch.no_grad():
        for m in router.plan.modules:
            tensors[f"basis.{m}"] = router.basis(m).contiguous()
            tensors[f"weight.{m}"] = P.full(router._route(m).weight.detach()).clone().contiguous()
            tensors[f"adapter.{m}"] = router.adapter_coords(m).contiguous()
            tensors[f"base.{m}"] = P.full(router.base_weight(m)).clone().contiguous()
        for n, p in model.named_parameters():
            tensors[f"param.{n}"] = P.full(p.detach()).clone().contiguous()
        # discarding edits the shards on every rank: the weights become the base
        removed = router.discard()
        for m in router.plan.modules:
            tensors[f"discarded.{m}"] = P.full(router._route(m).weight.detach()).clone().contiguous()
    from gradroute.model import is_fsdp2, unwrap_model

    facts = {
        "fsdp2": is_fsdp2(model),
        "unwrapped_is_model": unwrap_model(model) is model,
        "routes_dtensor": [P.is_sharded(r.weight) for r in router.routes_state],
        "params_dtensor": [P.is_sharded(p) for p in model.parameters()],
        "mode_params_dtensor": [P.is_sharded(p) for p in router.mode_strategy.trainable_parameters()],
        "axes": {t.module: t.axis for t in router.plan},
        "steps": router.steps,
        "discarded_norm": removed,
        "adapter_norm_after_discard": router.adapter_norm().total,
        "train_seconds": seconds,
    }
    return tensors, facts


def projection_checks() -> dict[str, float]:
    """gradroute.projection on DTensors vs the same tensors whole: the largest difference per
    function, over both sharding cases (the basis axis or the other one) and uneven shards (one
    rank's slab empty)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gradroute import projection as P

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    g = torch.Generator().manual_seed(3)
    worst: dict[str, float] = {}

    def note(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        worst[name] = max(worst.get(name, 0.0), float((P.full(got).double() - want.double()).abs().max()))

    for shape, dim in (((9, 5), 0), ((9, 5), 1), ((5, 9), 1), ((1, 9), 1), ((9,), 0), ((3, 9, 4), 1)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        U = P.random_basis(shape[dim], 2, generator=g).double()
        c = torch.randn(*[2 if i == dim else n for i, n in enumerate(shape)], generator=g, dtype=torch.float64)
        d = distribute_tensor(x, mesh, [Shard(0)])
        note("coords", P.coords(d, U, dim), P.coords(x, U, dim))
        note("project", P.project(d, U, dim), P.project(x, U, dim))
        note("remove", P.remove(d, U, dim), P.remove(x, U, dim))
        note("add_lift", P.add_lift(d, c, U, dim, alpha=-0.5), P.add_lift(x, c, U, dim, alpha=-0.5))
        note("energy_fraction", P.energy_fraction(d, U, dim), P.energy_fraction(x, U, dim))
        worst["relative_in_subspace_norm"] = max(worst.get("relative_in_subspace_norm", 0.0), abs(
            P.relative_in_subspace_norm(d, U, dim) - P.relative_in_subspace_norm(x, U, dim)))
    return worst


def _rank_main(rank: int, world: int, port: int, out_dir: str, cases: list[str]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from gradroute.errors import GradrouteError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worst = projection_checks()
        if rank == 0:
            Path(out_dir, "projection.json").write_text(json.dumps(worst))
        for case in cases:
            try:
                tensors, facts = run_case(case, rank, world)
            except GradrouteError as e:  # a refusal is a result too (every rank raises alike)
                facts = {"error": f"{type(e).__name__}: {e}"}
                if rank == 0:
                    Path(out_dir, f"{case}.json").write_text(json.dumps(facts))
                continue
            # the ranks hold the same adapter and (gathered) weights
            flat = torch.cat([t.double().reshape(-1) for t in tensors.values()])
            gathered = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            facts["rank_max_diff"] = max(float((g - flat).abs().max()) for g in gathered)
            if rank == 0:
                save_file(tensors, str(Path(out_dir, f"{case}.safetensors")))
                Path(out_dir, f"{case}.json").write_text(json.dumps(facts))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import torch.multiprocessing as mp

    out, cases = sys.argv[1], sys.argv[2:] or list(CASES)
    mp.spawn(_rank_main, args=(2, free_port(), out, cases), nprocs=2)
