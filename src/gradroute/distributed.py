"""torch.distributed helpers (no-ops in a single process)."""

from __future__ import annotations

import torch


def world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over ranks with one collective (packed into a float64 buffer).

    Returns new tensors with the input shapes, dtypes and devices; the inputs are untouched.
    """
    if world_size() == 1 or not tensors:
        return [t.clone() for t in tensors]
    sizes = [t.numel() for t in tensors]
    backend = torch.distributed.get_backend()
    device = torch.device("cpu") if backend == "gloo" else tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    torch.distributed.all_reduce(flat)
    out, i = [], 0
    for t, n in zip(tensors, sizes):
        out.append(flat[i : i + n].view(t.shape).to(t.device, t.dtype))
        i += n
    return out


#: attributes DeepSpeed ZeRO-3 puts on every partitioned parameter
ZERO3_PARAM_ATTRS = ("ds_id", "ds_status", "ds_numel")


def zero3_attrs(p: torch.Tensor) -> list[str]:
    """The ZeRO-3 partition attributes ``p`` carries (empty: not a ZeRO-3 partition; read outside a
    forward, a partitioned parameter is an empty placeholder)."""
    return [a for a in ZERO3_PARAM_ATTRS if hasattr(p, a)]
