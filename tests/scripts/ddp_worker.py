"""Two-process gloo DDP run for tests/test_distributed.py: ``python ddp_worker.py OUT_DIR``.

Launched in a fresh interpreter: forking a process that already ran a Trainer would hand the
children accelerate's single-process state.
"""

import json
import sys
from pathlib import Path

import torch


def train_on_rank(out_dir: str):
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import gradroute as gr
    from gradroute.testing import tiny_lm

    torch.manual_seed(0)
    model, _ = tiny_lm("gpt2")
    ids = torch.randint(3, 100, (32, 8), generator=torch.Generator().manual_seed(0)).tolist()
    # the first half of the rows is 'math', the second 'hack': the ranks see different mixes
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["math"] * 16 + ["hack"] * 16})
    args = TrainingArguments(output_dir=out_dir, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    sub = gr.Subspace.from_directions({1: torch.randn(2, 64, generator=torch.Generator().manual_seed(1))})
    handle = gr.attach(trainer, sub, env_column="env", mode="gradient")
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    router = handle.router
    flat = torch.cat([router.adapter_coords(m).reshape(-1) for m in router.plan.modules]
                     + [router.adapter_coords(m, e).reshape(-1) for m in router.plan.modules for e in router.envs]
                     + [p.detach().double().reshape(-1) for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    rec = handle.monitor.last
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "world": world,
        "max_diff": max(float((g - flat).abs().max()) for g in gathered),
        "samples": rec.samples,
        "env_share": rec.env_share,
        "envs": router.envs,
    }))


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(train_on_rank, args=(sys.argv[1],), num_processes=2)
