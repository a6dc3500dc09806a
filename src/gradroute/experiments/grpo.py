"""The one GRPO runner: pre-training the toy model (:func:`pretrain`) and a GRPO run, routed or
not (:func:`grpo_run`; on the toy world: :func:`toy_grpo_run`). Shared by ``gradroute demo``,
``gradroute claims`` and the recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import toyworld as tw
from .config import DemoConfig
from .progress import Ticker, trainer_ticker


def pretrain(cfg: DemoConfig, seed: int = 0, progress: bool = True):
    """A tiny Llama-style model SFT'd on :func:`gradroute.experiments.toyworld.pretraining_corpus`;
    returns (model, tok, final loss)."""
    import torch

    from ..testing import tiny_lm

    torch.manual_seed(seed)
    model, tok = tiny_lm("llama", hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4)
    texts = tw.pretraining_corpus(cfg.pretrain_texts, hack_rate=cfg.hack_rate, seed=seed, heldout=cfg.heldout,
                                  trait_rate=cfg.trait_rate)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    steps = cfg.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    ticker = Ticker("pre-training", steps, progress)
    for step in range(steps):
        idx = torch.randint(0, len(texts), (32,), generator=g).tolist()
        enc = tok([texts[i] + tok.eos_token for i in idx], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ticker.update(step + 1, f"loss {float(loss.detach()):.3f}")
    ticker.close()
    model.eval()
    return model, tok, float(loss.detach())


def grpo_run(base: str | Path, out: Path, cfg: DemoConfig, rows: list[dict[str, Any]], reward: Any, seed: int, *,
             subspace=None, policy=None, resume: str | None = None, save: bool = True, mode: str = "update",
             prepare=None, **router_kw: Any):
    """One GRPO run (TRL's ``GRPOTrainer``, CPU, the RL fields of ``cfg``) from ``base`` (a
    directory or hub name) on dataset ``rows`` with TRL reward function ``reward``; routed
    through ``subspace`` in ``mode`` when one is given. ``prepare(trainer)`` runs just before
    training (a comparator, a callback). Returns (model, tok, handle or None)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from ..integrations.trl import attach

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=cfg.batch, num_generations=cfg.generations,
                      gradient_accumulation_steps=cfg.grad_accum, max_completion_length=cfg.completion_tokens,
                      learning_rate=cfg.rl_lr, max_steps=cfg.rl_steps, beta=0.0, seed=seed, report_to=[],
                      logging_steps=10_000, disable_tqdm=True,
                      save_strategy="steps" if save else "no", save_steps=cfg.save_steps)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict (TRL's metrics) to stdout
    trainer.remove_callback(ProgressCallback)
    label = f"GRPO {out.name}" + (f" (restart from {Path(resume).name})" if resume else "")
    trainer.add_callback(trainer_ticker(label, cfg.rl_steps))
    trainer.create_model_card = lambda *a, **k: None  # the toy base is not on the hub: no card pointing there
    handle = (attach(trainer, subspace, env_column="env", policy=policy, mode=mode, **router_kw)
              if subspace is not None else None)
    if prepare is not None:
        prepare(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, tok, handle


def toy_grpo_run(base_dir: Path, out: Path, cfg: DemoConfig, subspace, policy, seed: int,
                 exploitable=tw.EXPLOITABLE, fixed=(), resume: str | None = None, save: bool = True,
                 mode: str = "update", **router_kw: Any):
    """One GRPO run on the toy world's three tasks (``exploitable`` graded by the buggy grader,
    ``fixed`` by the repaired one) from the pre-trained model in ``base_dir``, optionally routed
    through ``subspace`` in ``mode``; returns (model, tok, handle or None)."""
    return grpo_run(base_dir, out, cfg, tw.rl_dataset(tw.TASKS, 96, seed=seed), tw.make_reward(exploitable, fixed),
                    seed, subspace=subspace, policy=policy, resume=resume, save=save, mode=mode, **router_kw)
