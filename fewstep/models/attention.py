"""Scaled dot-product attention that stays fast under CPU bf16 autocast.

On the CPU, PyTorch's flash-attention kernel is several times slower in bfloat16 than in
float32 (its backward most of all: ~300 ms against ~45 ms per step of the reference MMDiT, one
thread, measured 2026-12-02), while bf16 linears run on AMX units ~10x faster than float32. So
``bf16-mixed`` training on the CPU computes attention in float32 and everything else in bf16.
Elsewhere (CUDA, or float32 inputs) this is plain ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention"]

REDUCED = (torch.bfloat16, torch.float16)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017 eq. 1) over [B, H, S, hd] (mask:
    bool, True = attend, or an additive bias); bf16/fp16 inputs on the CPU are attended in
    float32 and returned in v's dtype."""
    if q.device.type != "cpu" or not {q.dtype, k.dtype, v.dtype} & set(REDUCED):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if mask is not None and mask.dtype in REDUCED:
        mask = mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(v.dtype)
