"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.diffusion.denoiser import Denoised, Denoiser, batch_time
from fewstep.diffusion.schedules import NoiseProcess, broadcast


def _pad_seq(x: Tensor, length: int) -> Tensor:
    """Zero-pad (False for masks) dim 1 of [B, L, ...] up to `length`."""
    pad = [0, 0] * (x.ndim - 2) + [0, length - x.shape[1]]  # F.pad lists the last dim first
    return F.pad(x, pad)


def batch_conditions(cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate [cond; uncond] along the batch. An uncond batch of 1 is expanded; tensors with
    a sequence dim (dim 1, e.g. text [B, L, D] and text_mask [B, L]) are padded to a common length
    with zeros / False, so the null text may have its own length L0."""
    if cond.keys() != uncond.keys():
        raise ValueError(
            f"CFG needs the same condition keys for cond {sorted(cond)} and uncond {sorted(uncond)}"
        )
    out = {}
    for key, c in cond.items():
        u = uncond[key].to(c.device)
        if u.shape[0] == 1 and c.shape[0] != 1:
            u = u.expand(c.shape[0], *u.shape[1:])  # [1, ...] -> [B, ...]
        if c.ndim >= 2 and c.shape[1] != u.shape[1]:
            length = max(c.shape[1], u.shape[1])
            c, u = _pad_seq(c, length), _pad_seq(u, length)
        out[key] = torch.cat([c, u])  # [2B, ...]
    return out


@dataclass(eq=False)
class ClassifierFreeGuidance:
    """D = D_u + s (D_c - D_u) (Ho & Salimans 2022, eq. 6 with s = 1 + w), cond and uncond in one
    batched forward. Combining (x0, eps) equals combining eps or velocity as PixArt does, since
    both are affine in the prediction at fixed x_t. ``scale`` is a float or a per-sample [B]
    tensor (LCM eq. 12, w = s - 1); a scale of 1 everywhere skips the unconditional pass. Over a
    guidance-embedded denoiser (FLUX.1-dev; Meng et al. 2023) the guided estimate is its one
    conditional pass with ``guidance=scale``: ``uncond`` is not used."""

    denoiser: Denoiser
    scale: float | Tensor
    cond: dict[str, Tensor]
    uncond: dict[str, Tensor]

    @property
    def process(self) -> NoiseProcess:
        """The wrapped denoiser's process."""
        return self.denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float) -> Denoised:
        """The guided estimate; one network call with batch 2B (or B at scale 1 or when the
        denoiser embeds the scale)."""
        if isinstance(self.denoiser, GuidanceEmbedded):
            scale = torch.as_tensor(self.scale, dtype=torch.float32, device=x.device)
            return self.denoiser(x, t, guidance=scale.expand(x.shape[0]), **self.cond)
        if bool((torch.as_tensor(self.scale) == 1.0).all()):
            return self.denoiser(x, t, **self.cond)
        t = batch_time(t, x)
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([t, t]), **batch_conditions(self.cond, self.uncond)
        )
        (x0_c, x0_u), (eps_c, eps_u) = both.x0.chunk(2), both.eps.chunk(2)  # [2B] -> 2 x [B]
        s = broadcast(self.scale, x0_c) if torch.is_tensor(self.scale) else self.scale
        return Denoised(x0_u + s * (x0_c - x0_u), eps_u + s * (eps_c - eps_u))


@dataclass(eq=False)
class GuidanceEmbedded(Denoiser):
    """A guidance-distilled network (Meng et al. 2023, §3.1): the CFG scale is an input
    (``guidance=``), so one pass gives the guided estimate. Calls without ``guidance=`` (the
    estimate and the raw prediction, e.g. in the training loss) use ``scale``."""

    scale: float = 1.0

    def raw(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """The prediction at the call's (or the default) guidance scale."""
        if "guidance" not in cond:
            cond["guidance"] = torch.full((x.shape[0],), self.scale, device=x.device)
        return super().raw(x, t, **cond)


def guidance_passes(denoiser: Denoiser, scale: float | Tensor) -> int:
    """Network passes per guided denoiser call (for NFE): 1 at scale 1 or when the denoiser embeds
    the scale (GuidanceEmbedded), else 2 (a CFG step is a conditional and an unconditional pass,
    batched or not)."""
    if isinstance(denoiser, GuidanceEmbedded) or bool((torch.as_tensor(scale) == 1.0).all()):
        return 1
    return 2
