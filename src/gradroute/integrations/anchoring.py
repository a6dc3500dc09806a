"""Concept anchoring in a ``Trainer``/``SFTTrainer``: the labels travel with the batch and the
regularizer is added to the loss, scaled the way ``Trainer`` scales the task loss."""

from __future__ import annotations

from typing import Any

import torch

from . import _compat
from .columns import carry_column, check_column, refuse_packing
from .logs import insert_callback, metrics_sink
from .loss import wrap_compute_loss

LABEL_KEY = "gradroute_concept_labels"


def attach_anchoring(trainer: Any, anchoring: Any, label_column: str = "concepts") -> Any:
    """Add a concept-anchoring regularizer to a ``Trainer``/``SFTTrainer``'s loss.

    Each row's ``label_column`` holds its concept labels: ``{label: probability}``, a list with
    one value per ``anchoring.label_names``, a label name, or None (unlabelled). The labels
    travel with the batch (the same column mechanism as :func:`attach`), and the loss becomes
    ``task_loss + anchoring.loss(labels, mask=attention_mask, step=global_step)``; the terms'
    values go to the trainer's logs as ``anchoring/<term>/<layer>``. Packing and
    padding-free batching are refused (they mix rows).
    """
    from transformers import TrainerCallback

    from ..errors import LabelError

    if _compat.is_rl_trainer(trainer):
        raise LabelError("attach_anchoring is for SFT/pre-training trainers (Trainer, SFTTrainer).",
                         "use gradroute.attach for RL trainers.")
    _compat.check_versions()
    refuse_packing(trainer, "per-row concept labels would leak across samples",
                   "set packing=False and padding_free=False.")
    check_column(trainer.train_dataset, label_column, LabelError,
                 "add a column with each row's concept labels, or pass label_column=<its name>.")
    names = list(anchoring.label_names)

    def encode(rows):
        out = torch.zeros(len(rows), len(names))
        for i, r in enumerate(rows):
            v = r.get(label_column)
            if v is None:
                continue
            if isinstance(v, str):
                v = {v: 1.0}
            if isinstance(v, dict):
                for k_, p in v.items():
                    if k_ not in names:
                        raise LabelError(f"row label {k_!r} is not among {names}.")
                    out[i, names.index(k_)] = float(p)
            else:
                vals = list(v)
                if len(vals) != len(names):
                    raise LabelError(f"a row has {len(vals)} label values; expected {len(names)} ({names}).")
                out[i] = torch.tensor([float(x) for x in vals])
        return out

    carry_column(trainer, label_column, LABEL_KEY, encode)

    def add_loss(out, labels, inputs, kw):
        if not torch.is_grad_enabled() or not trainer.model.training:
            anchoring.capture.clear()  # evaluation / prediction: no regularizer
            return out
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        reg = anchoring.loss(labels, mask=mask, step=trainer.state.global_step)
        n_items = kw.get("num_items_in_batch")
        # Trainer.compute_loss scales the task loss by the number of processes when tokens are
        # averaged across devices; the regularizer must be scaled alike to keep its weight
        factor = _compat.loss_process_factor(trainer, n_items)
        if factor is not None:
            reg = reg * factor
        # Trainer divides the loss by the accumulation steps only when the model did not
        # normalize it over the whole accumulation window (num_items_in_batch); match it
        if _compat.loss_scaled_for_ga(trainer, n_items):
            reg = reg / _compat.grad_accum_steps(trainer)
        if isinstance(out, tuple):
            return (out[0] + reg.to(out[0].device), *out[1:])
        return out + reg.to(out.device)

    wrap_compute_loss(trainer, LABEL_KEY, after=add_loss)
    sink = metrics_sink(trainer)

    class AnchoringLogs(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            if sink is not None:
                sink({f"anchoring/{k}": v for k, v in anchoring.last.items()})
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if sink is None and logs is not None and "loss" in logs:
                logs.update({f"anchoring/{k}": v for k, v in anchoring.last.items()})
            return control

    insert_callback(trainer, AnchoringLogs())
    return anchoring
