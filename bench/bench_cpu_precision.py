"""CPU training speed of a teacher network by precision, in one run on one machine:
float32 (the baseline), bf16-mixed as Lightning runs it (bf16 autocast, float32 weights) with
fewstep's float32 attention (``fewstep.models.attention``), and bf16-mixed with attention left
in bf16 (``F.scaled_dot_product_attention`` under autocast, what it replaced). Each case times
forward + MSE + backward + AdamW of the reference MMDiT (the network of
``configs/teacher/shapes_reference_flux.yaml``) on random latents and text of that recipe's
shapes, median of ``--steps`` after ``--warmup``; it prints steps/s and the ratio to
float32. On AMX CPUs (Sapphire Rapids on) bf16 linears run ~10x faster than float32.
``--compile`` adds bf16-mixed with the network compiled (``nn.Module.compile``, as the teacher
module's ``compile: true``; its warm-up includes ~2 min of compiling).

    python bench/bench_cpu_precision.py [--threads 2] [--batch 32] [--steps 10] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models import flux_layers
from fewstep.models.flux import Flux

REFERENCE_MMDIT = dict(  # configs/teacher/flux_shapes.yaml + shapes_reference_flux.yaml
    in_channels=8, hidden_size=192, num_heads=6, depth=2, depth_single_blocks=4,
    context_in_dim=384, vec_in_dim=384, axes_dim=(8, 12, 12), guidance_embed=False,
)  # fmt: skip
LATENT, TEXT_LEN = 16, 24  # 64 px through the 4x VAE; MiniLM tokens of a shapes caption
CASES = ("float32", "bf16-mixed", "bf16-mixed, bf16 attention")
COMPILED = "bf16-mixed, compiled"


@contextlib.contextmanager
def bf16_attention() -> Iterator[None]:
    """Attention as plain SDPA under autocast (bf16 on the CPU): the behaviour before."""

    def plain(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with mock.patch.object(flux_layers, "attention", plain):
        yield


def step_seconds(net: nn.Module, batch: int, bf16: bool, steps: int, warmup: int) -> float:
    """Median wall seconds of one training step."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, REFERENCE_MMDIT["in_channels"], LATENT, LATENT, generator=g)
    text, pooled = torch.randn(batch, TEXT_LEN, 384, generator=g), torch.randn(batch, 384)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, TEXT_LEN // 2 :] = False  # about half the tokens padding
    t = torch.rand(batch, generator=g) * 1000
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x, t, text, text_mask=mask, cond=pooled)
        F.mse_loss(out.float(), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help=f"add the case {COMPILED!r}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = Flux(**REFERENCE_MMDIT)
    print(f"reference MMDiT ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params), "
          f"batch {args.batch}, {args.threads} threads, median of {args.steps} steps")  # fmt: skip
    baseline = None
    for case in (*CASES, COMPILED) if args.compile else CASES:
        patch = bf16_attention() if case.endswith("bf16 attention") else contextlib.nullcontext()
        if case == COMPILED:
            net.compile()
        with patch:
            seconds = step_seconds(net, args.batch, case != "float32", args.steps, args.warmup)
        baseline = baseline or seconds
        print(f"{case:28s} {1 / seconds:6.2f} steps/s  {baseline / seconds:5.2f}x float32")


if __name__ == "__main__":
    main()
