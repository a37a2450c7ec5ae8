"""Diffusion training objectives: MSE on the denoiser's parameterisation target, and weightings."""

from __future__ import annotations

import math

from torch import Tensor

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.parameterization import PredictionType, from_x0_eps, x0_error_scale
from fewstep.diffusion.schedules import broadcast


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    weights: Tensor | None = None,
    **cond: Tensor,
) -> Tensor:
    """E_t w(t) ||net(x_t, t) - target||^2 (Ho et al. 2020 eq. 14; target eps, v, x0 or velocity
    per denoiser.prediction; flow matching: Lipman et al. 2023, §4.1). `noise` may come from
    a coupling (reflow, Liu et al. 2022). Mean over elements, per-sample weights [B] optional."""
    x0f, noise_f = x0.float(), noise.float()
    alpha, sigma = denoiser.process.alpha_sigma(t)
    alpha, sigma = broadcast(alpha, x0f), broadcast(sigma, x0f)
    x_t = (alpha * x0f + sigma * noise_f).to(x0.dtype)
    pred = denoiser.raw(x_t, t, **cond).float()
    target = from_x0_eps(x0f, noise_f, alpha, sigma, denoiser.prediction)
    per_sample = (pred - target).pow(2).flatten(1).mean(1)  # [B, ...] -> [B]
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def min_snr_weights(
    alpha: Tensor, sigma: Tensor, prediction: PredictionType, gamma: float = 5.0
) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023): x0-loss weight min(SNR, gamma), expressed for a
    loss on `prediction` (eps: min(SNR, g)/SNR; v on VP: min(SNR, g)/(SNR + 1))."""
    snr = (alpha / sigma) ** 2
    return snr.clamp(max=gamma) * x0_error_scale(alpha, sigma, prediction) ** 2


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Per-sample [B] sqrt(||a - b||^2 + c^2) - c over all but the batch dim, c = 0.00054
    sqrt(dim) by default (Song & Dhariwal 2023, iCT §3.3); exactly 0 when a == b. LCM's
    elementwise form is this on [N, 1] rows, averaged."""
    diff = (a.float() - b.float()).flatten(1)  # [B, ...] -> [B, d]
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return (diff.pow(2).sum(1) + c * c).sqrt() - c
