"""The router inside transformers' Trainer: same training, checkpointed state, resume, skipped steps."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradroute as gr
from gradroute.integrations.trainer import STATE_DIR
from gradroute.testing import tiny_lm

MAX_STEPS = 6


def _data(n=48, T=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (n, T), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                lr_scheduler_type="linear", warmup_steps=1, save_steps=3, save_strategy="steps",
                logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _subspace():
    g = torch.Generator().manual_seed(0)
    return gr.Subspace.from_directions({1: torch.randn(2, 64, generator=g), 2: torch.randn(2, 64, generator=g)})


def _run(out, routed=True, mode="update", resume=None, extra_callbacks=()):
    model, _ = tiny_lm("llama")
    router = gr.GradientRouter(model, _subspace(), mode=mode) if routed else None
    cbs = ([gr.RouterCallback(router)] if routed else []) + list(extra_callbacks)
    trainer = Trainer(model=model, args=_args(out), train_dataset=_data(), callbacks=cbs)
    trainer.train(resume_from_checkpoint=resume)
    return model, router


def test_update_mode_inside_trainer_is_exact_and_checkpointed(tmp_path):
    model, router = _run(tmp_path / "routed")
    plain, _ = _run(tmp_path / "plain", routed=False)
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), n
    assert router.steps == MAX_STEPS
    assert router.adapter_norm().total > 0
    for step in (3, 6):
        assert (tmp_path / "routed" / f"checkpoint-{step}" / STATE_DIR / "router_state.safetensors").is_file()


@pytest.mark.parametrize("mode", ["update", "gradient"])
def test_resume_restores_router_state(tmp_path, mode):
    model, router = _run(tmp_path / "full", mode=mode)
    resumed_model, resumed = _run(tmp_path / "full", mode=mode, resume=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.steps == MAX_STEPS
    for m in router.plan.modules:
        assert torch.allclose(resumed.adapter_coords(m), router.adapter_coords(m), atol=1e-6), m
    for (n, a), (_, b) in zip(resumed_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


class _SkipOneStep(TrainerCallback):
    """Makes the optimizer skip its step once, as an AMP overflow would."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 2 and not getattr(self, "done", False):
            self.done = True
            real = optimizer.step

            def skipped(*a, **k):
                optimizer.step = real  # skip this one call only
            optimizer.step = skipped


def test_skipped_optimizer_steps_are_not_counted(tmp_path):
    model, router = _run(tmp_path / "skip", extra_callbacks=[_SkipOneStep()])
    assert router.steps == MAX_STEPS - 1
    cb = gr.RouterCallback(router)
    assert cb.router is router


def test_resume_without_router_state_is_refused_unless_allowed(tmp_path):
    from gradroute.errors import AdapterError

    _run(tmp_path / "plain", routed=False)  # checkpoints without gradroute state
    model, _ = tiny_lm("llama")
    trainer = Trainer(model=model, args=_args(tmp_path / "plain"), train_dataset=_data())
    gr.attach(trainer, _subspace(), env_column=None)
    with pytest.raises(AdapterError, match="allow_missing_state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))
    model, _ = tiny_lm("llama")
    trainer = Trainer(model=model, args=_args(tmp_path / "plain"), train_dataset=_data())
    handle = gr.attach(trainer, _subspace(), env_column=None, allow_missing_state=True)
    with pytest.warns(gr.GradrouteWarning, match="starts empty"):
        trainer.train(resume_from_checkpoint=True)  # the newest checkpoint
    assert handle.router.steps == 0 or handle.router.steps <= MAX_STEPS


def test_detach_restores_the_trainer(tmp_path):
    model, _ = tiny_lm("llama")
    ids = torch.randint(3, 100, (8, 6)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "env": ["a", "b"] * 4})
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=ds)
    collator, n_callbacks = trainer.data_collator, len(trainer.callback_handler.callbacks)
    handle = gr.attach(trainer, _subspace(), env_column="env")
    assert "compute_loss" in trainer.__dict__ and trainer.data_collator is not collator
    handle.detach()
    assert "compute_loss" not in trainer.__dict__ and "train" not in trainer.__dict__
    assert trainer.data_collator is collator and len(trainer.callback_handler.callbacks) == n_callbacks
    gr.attach(trainer, _subspace(), env_column="env")  # attaching again works
    trainer.train()
