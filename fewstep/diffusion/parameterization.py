"""Conversions between network predictions (eps, v, x0, flow velocity) and (x0, eps), in one place.

All formulas hold for any process x_t = alpha x0 + sigma eps (VP or not); alpha and sigma must
already broadcast against x (see `schedules.broadcast`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

PredictionType = Literal["epsilon", "v", "x0", "velocity"]
PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "v", "x0", "velocity")


def from_x0_eps(
    x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float, kind: PredictionType
) -> Tensor:
    """The target a network of this kind predicts for (x0, eps): the training regression target."""
    if kind == "epsilon":
        return eps  # Ho et al. 2020, eq. 14
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0  # Salimans & Ho 2022, §4 (v = alpha eps - sigma x)
    if kind == "velocity":
        return eps - x0  # Liu et al. 2022, eq. 1 (rectified-flow velocity)
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {kind!r}")


def to_x0_eps(
    pred: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, kind: PredictionType
) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a prediction of this kind at x_t = alpha x0 + sigma eps (inverse of above)."""
    if kind == "epsilon":
        return (x_t - sigma * pred) / alpha, pred  # singular at alpha = 0 (flow t = 1)
    if kind == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if kind == "v":
        norm = alpha * alpha + sigma * sigma  # 1 for VP processes
        return (alpha * x_t - sigma * pred) / norm, (sigma * x_t + alpha * pred) / norm
    if kind == "velocity":
        norm = alpha + sigma  # 1 for rectified flow
        return (x_t - sigma * pred) / norm, (x_t + alpha * pred) / norm
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {kind!r}")


def x0_error_scale(alpha: Tensor, sigma: Tensor, kind: PredictionType) -> Tensor:
    """c with d x0 = c * d pred at fixed x_t: converts an error in `kind` to an error in x0."""
    if kind == "epsilon":
        return sigma / alpha
    if kind == "x0":
        return alpha.new_ones(()).expand_as(alpha)
    if kind == "v":
        return sigma / (alpha * alpha + sigma * sigma)
    if kind == "velocity":
        return sigma / (alpha + sigma)
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {kind!r}")
