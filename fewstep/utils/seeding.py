"""Seeds and noise that depend only on integers (seed, step, rank, sample index), so that runs,
resumes and evaluations draw the same numbers on every machine."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), e.g. (seed, step, rank)."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) % 2**63


def fixed_noise(
    shape: tuple[int, ...],
    indices: Iterable[int],
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Noise [B, *shape] whose row for sample ``index`` depends only on (seed, index)."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, int(i))))
        for i in indices
    ]
    return torch.stack(rows).to(device)  # B x [C, H, W] -> [B, C, H, W]
