"""Per-row dataset columns carried to the loss: environment names and ids, reserved names, and
the SFTTrainer / Trainer column carrier.

A column reaches ``compute_loss`` as a batch tensor: it is kept through
``remove_unused_columns`` (added to the trainer's signature columns) and a collator wrapper
encodes it. Packing and padding-free batching put several rows into one sequence, so they are
refused wherever a per-row column matters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import EnvColumnError, PackingError
from . import _compat
from ._patches import patch

ENV_KEY = "gradroute_env_ids"
FLAG_KEY = "gradroute_quarantine_flags"  # mode="quarantine": the rows' flags, one bool per row
# columns TRL/transformers use themselves, and reward-function keyword arguments TRL reserves
RESERVED_COLUMNS = frozenset({
    "prompt", "completion", "completion_ids", "environment", "input_ids", "attention_mask", "labels",
    "messages", "images", "image", "position_ids", "seq_lengths", "completion_mask", "assistant_masks",
    "trainer_state", "log_extra", "log_metric", "environments", "prompts", "completions", ENV_KEY, FLAG_KEY,
})


def refuse_packing(trainer: Any, what: str, fix: str) -> None:
    """Per-row columns cannot survive packing / padding-free batching (rows share a sequence)."""
    args = trainer.args
    if getattr(args, "packing", False) or getattr(args, "padding_free", False) or _compat.padding_free(trainer):
        raise PackingError(f"packing / padding-free batching puts several rows into one sequence, so {what}.", fix)


def check_column(dataset: Any, column: str, error: type, fix: str) -> bool:
    """Refuse reserved names and columns the dataset lacks; False if the dataset lists no columns."""
    if column in RESERVED_COLUMNS:
        raise error(f"{column!r} is reserved by TRL/transformers.", "rename the column and pass its new name.")
    names = getattr(dataset, "column_names", None)
    if names is None:
        return False
    if column not in names:
        raise error(f"the training dataset has no column {column!r} (it has {list(names)}).", fix)
    return True


def env_name(value: Any, where: str) -> str:
    """An environment name from a column value; None, NaN and empty values are refused."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
        raise EnvColumnError(f"{where} has no environment (its env value is {value!r}); it would be counted as an "
                             f"environment named {str(value)!r}.",
                             "fill in every row's environment (or drop those rows) before training.")
    if isinstance(value, list | dict | tuple | set):
        raise EnvColumnError(f"{where} has environment {value!r}, not a single name.",
                             "give each row one environment name (a string).")
    return str(value)


def dataset_envs(dataset: Any, column: str) -> list[str] | None:
    """The distinct environments of ``column`` (None if the dataset does not list its columns)."""
    if not check_column(dataset, column, EnvColumnError,
                        "add a column naming each row's environment, or pass env_column=<its name>."):
        return None
    return sorted({env_name(v, f"row {i} of the training dataset") for i, v in enumerate(dataset[column])})


def env_ids_encoder(vocab: Sequence[str], env_column: str) -> Callable[[Sequence[dict[str, Any]], Any], torch.Tensor]:
    """``ids_of(rows, device)``: the rows' environment indices in ``vocab`` as a long tensor."""
    index = {e: i for i, e in enumerate(vocab)}

    def ids_of(rows: Sequence[dict[str, Any]], device: Any) -> torch.Tensor:
        try:
            return torch.tensor([index[env_name(r[env_column], "a training row")] for r in rows],
                                dtype=torch.long, device=device)
        except KeyError as e:
            raise EnvColumnError(f"a row has environment {e} or lacks the column {env_column!r}.",
                                 "give every row one of the declared environments.") from None

    return ids_of


def carry_column(trainer: Any, column: str, key: str, encode: Any) -> None:
    """Make a dataset column reach ``compute_loss`` as ``inputs[key]`` (SFTTrainer / Trainer).

    The column is kept through ``remove_unused_columns`` (added to the signature columns) and
    the collator is wrapped: ``encode(features) -> tensor`` builds the batch tensor from the
    rows, and the column is removed before the original collator sees them."""
    _compat.add_signature_column(trainer, column)
    collate = trainer.data_collator

    def collator(features, *a, **kw):
        value = encode(features)
        batch = collate([{k: v for k, v in f.items() if k != column} for f in features], *a, **kw)
        batch[key] = value
        return batch

    patch(trainer, "data_collator", collator)
