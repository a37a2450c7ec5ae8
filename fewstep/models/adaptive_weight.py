"""The learned loss weight w_φ(t) of sCM (Lu & Song 2024, §4.3, eq. 8), after EDM2's
uncertainty weighting (Karras et al. 2024, App. B.2): Fourier features of the noise level through
one zero-initialised linear layer, so training starts unweighted (w = 0)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

TIME_MARGIN = 1e-6  # keeps log(tan t) finite at t = 0 and t = pi / 2


class AdaptiveWeight(nn.Module):
    """w_φ(t) [B] from TrigFlow times t [B]: c = log(tan t) / 4 (EDM2's c_noise = ln(σ/σ_d) / 4),
    sqrt(2) cos(2π (f c + φ)) with fixed random f ~ N(0, 1), φ ~ U[0, 1) (EDM2's MPFourier),
    then a linear layer to one scalar."""

    def __init__(self, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"AdaptiveWeight: channels must be >= 1, got {channels}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        """w_φ(t) [B] in the linear layer's dtype."""
        t = t.double().clamp(TIME_MARGIN, math.pi / 2 - TIME_MARGIN)
        c = torch.log(torch.tan(t)) / 4  # [B]
        features = math.sqrt(2) * torch.cos(c[:, None] * self.freqs.double() + self.phases.double())
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(-1)  # [B, 1] -> [B]
