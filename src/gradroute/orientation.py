"""Orientation: how a routed module's weight meets the residual stream — one owner for it.

A routed module is a Linear, a GPT-2 ``Conv1D`` (weight stored transposed) or an Embedding, on
the write side (its output is added to the residual stream), the read side (its input is the
residual stream) or as the input/position embedding. With U (d x k) the basis and C the
adapter's coordinates, the adapter's weight delta is ``lift(C, U, axis)``:

=========  ===========  ================  ====  ============  =====================  ===============
side       module       weight            axis  C             PEFT lora_A / lora_B   delta on x
=========  ===========  ================  ====  ============  =====================  ===============
write      Linear       (d, d_in)         0     (k, d_in)     C / U                  (x Cᵀ) Uᵀ
write      Conv1D       (d_in, d)         1     (d_in, k)     Cᵀ / U (fan_in_fan_out) (x C) Uᵀ
read       Linear       (d_out, d)        1     (d_out, k)    Vᵀ / C                 (x V) Cᵀ
read       Conv1D       (d, d_out)        0     (k, d_out)    Vᵀ / Cᵀ                (x V) C
embed      Embedding    (vocab, d)        1     (vocab, k)    Cᵀ / U (lora_embedding) C[ids] Uᵀ
=========  ===========  ================  ====  ============  =====================  ===============

Attribution contracts per-token coordinates r (N x k: ``Uᵀδ`` for writers and embeddings,
``Vᵀx`` for readers) with the other factor o (N x m: the input x, the output gradient δ, or
the token ids) into C's orientation: ``rᵀ o`` when C is (k, ·), ``oᵀ r`` when C is (·, k), an
index-add over token ids for embeddings. Every place that needs one of these — the plan,
attribution, PEFT export, activation adapters, interventions — asks this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UnsupportedModuleError

KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class Orientation:
    """The orientation of one (module kind, side) pair; see the module table."""

    kind: str   # linear | conv1d | embedding
    side: str   # write | read | embed

    @property
    def axis(self) -> int:
        """Axis of the weight tensor that indexes the residual stream."""
        if self.kind == "embedding":
            return 1
        if self.kind == "linear":
            return 0 if self.side == "write" else 1
        return 1 if self.side == "write" else 0

    @property
    def rank_first(self) -> bool:
        """Whether C is (k, ·) (rank on axis 0)."""
        return self.axis == 0

    def adapter_shape(self, weight_shape: tuple[int, int], k: int) -> tuple[int, int]:
        s = list(weight_shape)
        s[self.axis] = k
        return (s[0], s[1])

    # ------------------------------------------------------------------ attribution
    def contract(self, r: torch.Tensor, o: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Σ over tokens of the gradient in C's orientation (r: N x k; o: N x m, or N ids)."""
        if self.side == "embed":
            out = torch.zeros(rows, r.shape[-1], dtype=r.dtype, device=r.device)  # type: ignore[arg-type]
            return out.index_add_(0, o.reshape(-1), r)
        return r.T @ o if self.rank_first else o.T @ r

    def contract_rows(self, r: torch.Tensor, o: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Per-row (batch) version of :meth:`contract`: r (B, T, k), o (B, T, m) or ids (B, T)."""
        if self.side == "embed":
            return torch.stack([self.contract(r[b], o[b], rows) for b in range(r.shape[0])])
        if self.rank_first:                                 # one batched matmul (einsum's path is slower on CPU)
            return torch.bmm(r.transpose(1, 2), o)
        return torch.bmm(o.transpose(1, 2), r)

    # ------------------------------------------------------------------ PEFT LoRA
    def lora_tensors(self, C: torch.Tensor, U: torch.Tensor) -> dict[str, torch.Tensor]:
        """PEFT tensors (key suffix → tensor) whose ``get_delta_weight()`` is ``lift(C, U, axis)``."""
        if self.side == "embed":
            return {"lora_embedding_A": C.T.contiguous(), "lora_embedding_B": U.contiguous()}
        if self.side == "write":
            A, B = (C if self.kind == "linear" else C.T), U
        else:
            A, B = U.T, (C if self.kind == "linear" else C.T)
        return {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}

    # ------------------------------------------------------------------ activation adapters
    def delta_forward(self, x: torch.Tensor, C: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """What the weight delta ``lift(C, U, axis)`` adds to the module's output for input ``x``
        (writers and embeddings), computed through the k coordinates."""
        if self.side == "embed":
            return F.linear(F.embedding(x, C), U)
        if self.side != "write":
            raise UnsupportedModuleError("delta_forward is defined for writers and embeddings only.")
        z = F.linear(x, C) if self.kind == "linear" else x @ C
        return F.linear(z, U)


def orientation(kind: str, side: str) -> Orientation:
    if kind not in KINDS:
        raise UnsupportedModuleError(f"unsupported module kind {kind!r}.", "use linear, conv1d or embedding.")
    if kind == "embedding":
        side = "embed"
    if side not in ("write", "read", "embed"):
        raise UnsupportedModuleError(f"unsupported side {side!r} for a {kind}.", "use write or read.")
    return Orientation(kind, side)


def residual_axis(kind: str, side: str) -> int:
    """Axis of the weight tensor that indexes the residual stream (see the module table)."""
    return orientation(kind, side).axis
