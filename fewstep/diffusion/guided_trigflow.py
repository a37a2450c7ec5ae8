"""A guidance-embedded network (FLUX.1-dev; guidance distillation, Meng et al. 2023, §3.1) seen
in TrigFlow coordinates (Lu & Song 2024, §2; SANA-Sprint, Chen et al. 2025, §3.1): the CFG scale
stays the network's ``guidance`` input, so sCM distils a FLUX.1-dev teacher with one pass per
guided call, and its student keeps the input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import GuidanceEmbedded
from fewstep.diffusion.trigflow import TrigFlowDenoiser


@dataclass(eq=False)
class GuidanceEmbeddedTrigFlow(TrigFlowDenoiser, GuidanceEmbedded):
    """TrigFlowDenoiser over a guidance-embedded network: calls without ``guidance=`` use
    ``scale``; ClassifierFreeGuidance sees a GuidanceEmbedded and makes its one pass."""

    def raw(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """The network's prediction at TrigFlow (x, t) and the call's (or default) scale."""
        if "guidance" not in cond:
            cond["guidance"] = torch.full((x.shape[0],), self.scale, device=x.device)
        return TrigFlowDenoiser.raw(self, x, t, **cond)


def trigflow_view(denoiser: Denoiser) -> TrigFlowDenoiser:
    """The denoiser in TrigFlow coordinates (itself if already there), keeping a guidance-embedded
    network's default scale (``TrigFlowDenoiser.wrap`` alone would drop it)."""
    if isinstance(denoiser, TrigFlowDenoiser):
        return denoiser
    view = TrigFlowDenoiser.wrap(denoiser)
    if not isinstance(denoiser, GuidanceEmbedded):
        return view
    return GuidanceEmbeddedTrigFlow(
        view.net, view.process, view.prediction, view.learned_sigma, scale=denoiser.scale
    )
