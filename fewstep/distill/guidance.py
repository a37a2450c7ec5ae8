"""Guidance distillation, stage one of Meng et al. 2023 ("On Distillation of Guided Diffusion
Models", §3.1, eq. 5): a student conditioned on the CFG scale w learns to give the teacher's
classifier-free-guided prediction in one network pass, halving the cost of guided sampling. It
samples with the StudentModule's sampler and can be the teacher of any other method."""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance, GuidanceEmbedded
from fewstep.diffusion.parameterization import from_x0_eps
from fewstep.diffusion.schedules import DiscreteDDPM, NoiseProcess, broadcast
from fewstep.diffusion.timesteps import LogitNormal, TimestepSampler, UniformDiscrete
from fewstep.distill.base import (
    DistillationMethod,
    DistillBatch,
    Models,
    add_guidance_embedding,
)

GuidanceRange = tuple[float, float]


def default_times(process: NoiseProcess) -> TimestepSampler:
    """The teacher's usual training times: uniform discrete for DDPM, logit-normal for flows."""
    if isinstance(process, DiscreteDDPM):
        return UniformDiscrete(process.num_train_timesteps)
    return LogitNormal()


class GuidanceDistillation(DistillationMethod):
    """min E_{w, t, x_t} ||net_θ(x_t, t, w) - target(D_u + w (D_c - D_u))||², the target in the
    network's own parameterisation (Meng et al. 2023, eq. 5), w ~ U[``guidance_scale``]; the
    student is sampled at the StudentModule's ``guidance_scale`` (one pass per step)."""

    def __init__(
        self,
        guidance_scale: GuidanceRange = (1.0, 6.0),
        timestep_sampler: TimestepSampler | None = None,
    ) -> None:
        super().__init__()
        lo, hi = guidance_scale
        if not 1.0 <= lo <= hi:
            raise ValueError(
                f"GuidanceDistillation guidance_scale must be [min, max] with 1 <= min <= max, "
                f"got {guidance_scale}"
            )
        self.guidance_scale = (float(lo), float(hi))
        self.timestep_sampler = timestep_sampler
        self.sample_scale = 1.0  # the StudentModule's reference CFG scale, set in setup

    def setup(self, models: Models) -> None:
        """Give the student its (zero-initialised) guidance embedding; read the sampling scale."""
        add_guidance_embedding(models.student, "GuidanceDistillation")
        self.sample_scale = models.guidance_scale

    def student_denoiser(self, student: Denoiser) -> Denoiser:
        """The student at the reference CFG scale, one pass per step."""
        return GuidanceEmbedded(
            student.net, student.process, student.prediction, student.learned_sigma,
            scale=self.sample_scale,
        )  # fmt: skip

    def sample_scales(self, batch: int, device: torch.device, generator: torch.Generator) -> Tensor:
        """w ~ U[min, max] per sample (Meng et al. 2023 train over a range of w)."""
        lo, hi = self.guidance_scale
        return lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE between the student's prediction at w and the guided teacher's, same x_t."""
        x0, g, process = batch.latents, batch.generator, models.process
        sampler = self.timestep_sampler or default_times(process)
        t = sampler(x0.shape[0], device=x0.device, generator=g)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float32)
        x_t = process.add_noise(x0.float(), eps, t).to(x0.dtype)
        w = self.sample_scales(x0.shape[0], x0.device, g)
        with torch.no_grad():
            guided = ClassifierFreeGuidance(models.teacher, w, batch.cond, batch.uncond)(x_t, t)
            alpha, sigma = (broadcast(c, guided.x0) for c in process.alpha_sigma(t))
            target = from_x0_eps(guided.x0, guided.eps, alpha, sigma, models.student.prediction)
        pred = models.student.raw(x_t, t, guidance=w, **batch.cond).float()
        loss = (pred - target.float()).pow(2).mean()
        return loss, {"guidance_loss": loss.detach(), "guidance_scale": w.mean()}
