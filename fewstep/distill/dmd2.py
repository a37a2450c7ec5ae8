"""Improved Distribution Matching Distillation, DMD2 (Yin et al. 2024, arXiv:2405.14867).

The student G maps noise (or, for a k-step student, its own backward-simulated state at one of
its timesteps, DMD2 §4.5) to x0. Its output is re-noised to x_t, t ~ U[t_min, t_max], and moved
along the difference of two scores (DMD, Yin et al. 2023, eq. 7): the frozen real score (the
teacher with CFG) and an online fake score trained on the student's samples with the teacher's
diffusion loss (DMD2 §4.2). The gradient (fake x0 - real x0) / mean|x0 - real x0| (DMD eq. 8's
weighting) is applied through the surrogate 0.5 ||x0 - sg(x0 - grad)||^2. Two time-scale updates
(DMD2 §4.1): the fake score steps every batch, the student every ``fake_steps_per_generator_step``
batches. An optional GAN head on the fake-score network's features (DMD2 §4.3). No regression
loss (DMD2 drops it, §4.1). The StudentModule owns the two optimisers and the schedule's clock.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.losses import diffusion_loss
from fewstep.diffusion.schedules import NoiseProcess
from fewstep.diffusion.timesteps import TimestepSampler
from fewstep.distill.base import (
    DistillationMethod,
    DistillBatch,
    Models,
    student_grid,
    take_cached_sample,
)
from fewstep.distill.ladd import randn, unit_to_process_time
from fewstep.models.ladd_discriminator import (
    FeatureDiscriminatorHeads,
    frozen_parameters,
    network_features,
    resolve_blocks,
    token_features,
)
from fewstep.models.token_features import TokenFeatures


def generator_step_due(global_step: int, fake_steps_per_generator_step: int) -> bool:
    """Two time-scale rule (DMD2 §4.1) as a function of the optimiser-step count alone: a cycle
    of N batches takes N + 1 optimiser steps (one generator step, N fake-score steps), so the
    generator steps in the batch that starts at a multiple of N + 1 (resume-exact)."""
    return global_step % (fake_steps_per_generator_step + 1) == 0


def dm_gradient(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> tuple[Tensor, Tensor]:
    """DMD's distribution-matching gradient (s_fake - s_real, Yin et al. 2023, eq. 7 written on
    x0 predictions) normalised per sample by mean|x0 - real_x0| (eq. 8): (grad, weight [B])."""
    dims = tuple(range(1, x0.ndim))
    weight = (x0 - real_x0).abs().mean(dim=dims, keepdim=True)  # [B, 1, 1, 1]
    grad = torch.nan_to_num((fake_x0 - real_x0) / weight)
    return grad, weight.flatten()


def dm_surrogate(x0: Tensor, grad: Tensor) -> Tensor:
    """0.5 mean ||x0 - sg(x0 - grad)||^2, whose gradient w.r.t. x0 is grad / x0.numel()."""
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator loss E[softplus(-D(G(z)))] (Goodfellow et al. 2014, non-saturating; DMD2 eq. 4)."""
    return F.softplus(-fake_logits).mean()


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Classifier loss E[softplus(-D(x))] + E[softplus(D(G(z)))] (DMD2 eq. 4)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


class DMD2(DistillationMethod):
    """DMD2 (Yin et al. 2024): distribution matching with an online fake score, two time-scale
    updates, backward simulation for multi-step students and an optional GAN head.

    ``min_time``/``max_time`` bound the unit time of the distribution-matching re-noising (DMD2's
    min/max_step_percent); ``fake_timesteps`` draws the fake score's diffusion-loss times in the
    process's own time (None: the teacher's own ``timestep_sampler``, from ``Models``; without one,
    the same U[min, max] as the matching). The student's grid is its sampler's (read from
    ``Models``); the real score uses the StudentModule's ``guidance_scale``. ``gan_weight`` > 0
    adds heads on the fake-score network's ``gan_feature_blocks`` (indices into its
    ``token_features()`` blocks: DiT blocks, or Flux double then single blocks) trained with
    weight ``gan_head_weight`` in the fake-score step. The fake score is a denoiser of the
    teacher's kind (a guidance-embedded FLUX.1-dev copy gets the teacher's guidance input).
    """

    num_optimizers: ClassVar[int] = 2

    def __init__(
        self,
        fake_steps_per_generator_step: int = 5,
        min_time: float = 0.02,
        max_time: float = 0.98,
        fake_timesteps: TimestepSampler | None = None,
        backward_simulation: bool = True,
        gan_weight: float = 0.0,
        gan_head_weight: float = 0.01,
        gan_feature_blocks: list[int] | None = None,
        head_hidden: int = 128,
        head_cond_dim: int = 128,
    ) -> None:
        super().__init__()
        _check_args(fake_steps_per_generator_step, min_time, max_time, gan_weight, gan_head_weight)
        self.fake_steps_per_generator_step = fake_steps_per_generator_step
        self.min_time, self.max_time = min_time, max_time
        self.fake_timesteps = fake_timesteps
        self.teacher_timesteps: TimestepSampler | None = None  # from Models in setup
        self.backward_simulation = backward_simulation
        self.gan_weight, self.gan_head_weight = gan_weight, gan_head_weight
        self.gan_feature_blocks = gan_feature_blocks if gan_feature_blocks is not None else [-1]
        self.head_hidden, self.head_cond_dim = head_hidden, head_cond_dim
        self.fake_score: nn.Module | None = None  # built in setup: a trainable teacher copy
        self.heads: FeatureDiscriminatorHeads | None = None  # built in setup if gan_weight > 0
        self.block_indices: list[int] = []
        self.student_times = torch.empty(0, dtype=torch.float64)
        self.guidance_scale = 1.0
        self._fake: tuple[DistillBatch, Tensor] | None = None  # the G step's detached x0

    # ---------------------------------------------------------------- set-up
    def setup(self, models: Models) -> None:
        """Read the student's grid and CFG scale; build the fake score as a trainable copy of the
        teacher network (DMD2 §4.2) and the optional GAN heads (idempotent)."""
        self.student_times = student_grid(models, "DMD2")
        self.guidance_scale = models.guidance_scale
        self.teacher_timesteps = models.teacher_timesteps  # the fake score trains like the teacher
        teacher = models.teacher.net
        if self.fake_score is None:
            self.fake_score = copy.deepcopy(teacher).requires_grad_(True).train()
        if self.gan_weight > 0 and self.heads is None:
            self.heads = self._build_heads(teacher)

    def _build_heads(self, net: nn.Module) -> FeatureDiscriminatorHeads:
        """LADD-style token heads on the fake-score network's image-token block features (DMD2
        §4.3; DiT blocks, or Flux double then single blocks)."""
        features = gan_token_features(net)
        try:
            self.block_indices = resolve_blocks(self.gan_feature_blocks, len(features.blocks))
        except ValueError as err:
            raise ValueError(f"DMD2 gan_feature_blocks: {err}") from None
        device = next(net.parameters()).device
        return FeatureDiscriminatorHeads(
            num_heads=len(self.block_indices),
            feature_dim=features.width,
            text_dim=features.text_dim,
            cond_dim=self.head_cond_dim,
            hidden=self.head_hidden,
        ).to(device)

    def generator_step_due(self, global_step: int) -> bool:
        """Whether the StudentModule steps the student in the batch starting at ``global_step``."""
        return generator_step_due(global_step, self.fake_steps_per_generator_step)

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """The fake-score network's (and the heads') parameters: the second optimiser's."""
        return self.parameters()

    def fake_denoiser(self, models: Models) -> Denoiser:
        """The fake score as a denoiser of the teacher's kind: its process, parameterisation and,
        for a guidance-embedded teacher (FLUX.1-dev), its default guidance input."""
        if self.fake_score is None:
            raise RuntimeError("DMD2: call setup(models) first (it builds the fake score).")
        return dataclasses.replace(models.teacher, net=self.fake_score)

    # ---------------------------------------------------------------- times and student inputs
    def matching_times(self, batch: int, process: NoiseProcess, g: torch.Generator) -> Tensor:
        """Re-noising process times [B]: unit time ~ U[min_time, max_time] (DMD2's range)."""
        u = torch.rand(batch, generator=g, device=g.device, dtype=torch.float64)
        u = self.min_time + u * (self.max_time - self.min_time)
        return unit_to_process_time(u, process).float()

    def fake_times(self, batch: int, process: NoiseProcess, g: torch.Generator) -> Tensor:
        """The fake score's diffusion-loss times [B] (``fake_timesteps``, else matching times)."""
        sampler = self.fake_timesteps or self.teacher_timesteps
        if sampler is None:
            return self.matching_times(batch, process, g)
        return sampler(batch, device=g.device, generator=g).float()

    @torch.no_grad()
    def student_inputs(self, batch: DistillBatch, models: Models) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, h, w], t [B]) at one grid step i ~ U{0..k-1} shared by the batch (DMD2
        code): noise at i = 0; else the student's own sampler run from noise through its first
        i steps (backward simulation, DMD2 §4.5) or, without it, the data noised to t_i."""
        x0, g = batch.latents, batch.generator
        k = len(self.student_times)
        i = same_on_every_rank(int(torch.randint(0, k, (1,), generator=g, device=g.device)), x0)
        noise = randn(x0.shape, x0, g)
        t = self.student_times[i].to(x0.device).float().expand(x0.shape[0])
        if i == 0:
            return noise, t
        if not self.backward_simulation:
            return models.process.add_noise(x0.to(noise.dtype), noise, t), t
        return self.simulate(noise, i, batch, models), t

    def simulate(self, noise: Tensor, i: int, batch: DistillBatch, models: Models) -> Tensor:
        """The state at grid time t_i after the student's sampler walks its first i steps."""
        sampler = models.student_sampler
        if sampler is None:
            raise ValueError("DMD2 needs the StudentModule's sampler (Models.student_sampler).")
        student = self.student_denoiser(models.student).bind(**batch.cond)
        gen = batch.generator if batch.generator.device == noise.device else None
        return sampler.sample(student, noise, self.student_times[: i + 1], gen)

    def student_x0(self, batch: DistillBatch, models: Models) -> tuple[Tensor, Tensor]:
        """The student's x0 [B, C, h, w] (with its graph) and its input time t [B]."""
        x_t, t = self.student_inputs(batch, models)
        return self.student_denoiser(models.student)(x_t, t, **batch.cond).x0, t

    # ---------------------------------------------------------------- distribution matching
    @torch.no_grad()
    def matching_gradient(
        self, x0: Tensor, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(grad, weight [B], t [B]): x0 re-noised at t, scored by the CFG teacher (real) and the
        fake score, combined as ``dm_gradient`` (DMD2 Alg. 1, distribution matching)."""
        g = batch.generator
        t = self.matching_times(x0.shape[0], models.process, g).to(x0.device)
        x_t = models.process.add_noise(x0, randn(x0.shape, x0, g), t)
        real = ClassifierFreeGuidance(models.teacher, self.guidance_scale, batch.cond, batch.uncond)
        fake_x0 = self.fake_denoiser(models)(x_t, t, **batch.cond).x0
        grad, weight = dm_gradient(x0, real(x_t, t).x0, fake_x0)
        return grad, weight, t

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The distribution-matching surrogate on the student's x0 (+ gan_weight x the
        non-saturating GAN loss through the frozen fake-score features)."""
        x0, t_student = self.student_x0(batch, models)
        grad, weight, _ = self.matching_gradient(x0.detach().float(), batch, models)
        dm = dm_surrogate(x0, grad)
        loss, logs = dm, {"g_dm": dm.detach(), "dm_weight": weight.mean()}
        if self.gan_weight > 0:
            with frozen_parameters(self):
                logits = self.gan_logits(x0, batch.cond, models, batch.generator)
            adv = torch.stack([nonsaturating_g_loss(lg) for lg in logits]).mean()
            loss = loss + self.gan_weight * adv
            logs["g_gan"] = adv.detach()
        logs["student_t"] = t_student.mean().detach()
        self._fake = (batch, x0.detach())
        return loss, logs

    # ---------------------------------------------------------------- fake score and GAN head
    def gan_logits(
        self, x0: Tensor, cond: dict[str, Tensor], models: Models, g: torch.Generator
    ) -> list[Tensor]:
        """Per-head token logits (each [B, N]) of x0 re-noised at matching times, read from the
        fake-score network's block features (DMD2 §4.3: a head on the fake diffusion model)."""
        if self.heads is None:
            raise RuntimeError("DMD2: the GAN head is built in setup when gan_weight > 0.")
        t = self.matching_times(x0.shape[0], models.process, g).to(x0.device)
        x_t = models.process.add_noise(x0, randn(x0.shape, x0, g), t)
        fake = self.fake_denoiser(models)
        tokens = gan_token_features(fake.net)
        features = network_features(  # a sharded fake score: a whole forward, kept in the graph
            fake.net, tokens, lambda: fake.raw(x_t, t, **cond), self.block_indices, x0.shape[-2:]
        )
        grid = tokens.grid(x0.shape[-2:])
        model_time = models.process.model_time(t).float()
        return self.heads(features, grid, model_time, cond["text"], cond["text_mask"])

    def discriminator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The fake score's diffusion loss on detached student samples (the teacher's objective,
        DMD2 §4.2), plus gan_head_weight x the head's classification loss (data vs student)."""
        x0 = self._cached_fake(batch, models).float()
        g = batch.generator
        t = self.fake_times(x0.shape[0], models.process, g).to(x0.device)
        noise = randn(x0.shape, x0, g)
        loss = diffusion_loss(self.fake_denoiser(models), x0, noise, t, **batch.cond)
        logs = {"fake_diffusion": loss.detach()}
        if self.gan_weight > 0:
            real = batch.latents.to(x0.dtype)
            cond = {key: torch.cat([v, v]) for key, v in batch.cond.items()}
            logits = self.gan_logits(torch.cat([x0, real]), cond, models, g)  # [2B]: one pass
            b = x0.shape[0]
            cls = torch.stack([nonsaturating_d_loss(lg[b:], lg[:b]) for lg in logits]).mean()
            loss = loss + self.gan_head_weight * cls
            logs["d_gan"] = cls.detach()
        return loss, logs

    def _cached_fake(self, batch: DistillBatch, models: Models) -> Tensor:
        """The G step's detached student x0 for this batch, or a fresh one under no_grad."""
        cached, self._fake = self._fake, None
        return take_cached_sample(cached, batch, lambda: self.student_x0(batch, models)[0])


def same_on_every_rank(value: int, like: Tensor) -> int:
    """Rank 0's ``value`` on every rank (a broadcast on ``like``'s device; unchanged in one
    process). The backward-simulation step index sets how many student forwards a step runs;
    FSDP needs the same sequence of unit forwards on every rank (its collectives and backward
    prefetch follow it), or the ranks wait on different all-gathers."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    shared = torch.tensor([value], device=like.device, dtype=torch.long)
    dist.broadcast(shared, src=0)
    return int(shared.item())


def gan_token_features(net: nn.Module) -> TokenFeatures:
    """The fake-score network's feature blocks for the GAN head (DMD2 §4.3)."""
    return token_features(net, "DMD2 gan_weight > 0", "; set gan_weight: 0.0 otherwise.")


def _check_args(n: int, t_min: float, t_max: float, gan: float, head: float) -> None:
    """Clear errors for a bad DMD2 config, naming the field."""
    if n < 1:
        raise ValueError(f"DMD2 fake_steps_per_generator_step must be >= 1, got {n}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(
            f"DMD2 min_time/max_time must satisfy 0 <= min_time < max_time <= 1 (unit time, "
            f"mapped onto the process), got {t_min} and {t_max}"
        )
    if gan < 0 or head < 0:
        raise ValueError(f"DMD2 gan_weight and gan_head_weight must be >= 0, got {gan}, {head}")
