"""Latent Adversarial Diffusion Distillation, LADD (Sauer et al. 2024, arXiv:2403.12015; SD3-Turbo).

The student maps a noised latent at one of its few timesteps to x0 in one call (ADD, Sauer et al.
2023, §3). Its x0 and "real" latents are re-noised at a level drawn from a logit-normal or
shifted distribution (LADD §3) and fed to the frozen teacher; token features of chosen teacher
blocks go to light trainable heads conditioned on the pooled text and the noise level. Hinge loss
for both players (Lim & Ye 2017). Optional regression of the student's one-step x0 to CFG teacher
samples from the same noise. The StudentModule owns the optimisers and alternates the steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.samplers import Sampler
from fewstep.diffusion.schedules import NoiseProcess
from fewstep.diffusion.timesteps import LogitNormal, TimestepSampler
from fewstep.distill.base import (
    DistillationMethod,
    DistillBatch,
    Models,
    student_grid,
    take_cached_sample,
)
from fewstep.models.discriminator import hinge_d_loss, hinge_g_loss
from fewstep.models.ladd_discriminator import (
    FeatureDiscriminatorHeads,
    frozen_parameters,
    network_features,
    resolve_blocks,
    token_features,
)
from fewstep.models.token_features import TokenFeatures

RealSource = Literal["data", "teacher"]


def randn(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``like``'s device/dtype."""
    z = torch.randn(tuple(shape), generator=generator, device=generator.device)
    return z.to(like.device, torch.promote_types(like.dtype, torch.float32))


def unit_to_process_time(u: Tensor, process: NoiseProcess) -> Tensor:
    """u in [0, 1] -> process time t_clean + u (t_max - t_clean) (flow: t = u; DDPM: ~1000 u)."""
    return process.t_clean + u * (process.t_max - process.t_clean)


def mean_over_heads(losses: Sequence[Tensor]) -> Tensor:
    """The average of per-head losses (each head sees one teacher block, LADD §3)."""
    return torch.stack(list(losses)).mean()


class LADD(DistillationMethod):
    """LADD (Sauer et al. 2024): adversarial few-step distillation in latent space with the frozen
    teacher as the discriminator's feature network and trainable heads (``num_optimizers = 2``).

    ``renoise`` draws unit times u in [0, 1] (LogitNormal(1, 1) by default, LADD §3
    favours high noise) mapped onto the teacher's process time. ``real`` picks the discriminator's
    real examples: cached data latents or CFG teacher samples (LADD §3, synthetic data). The
    student's input times are the grid of the StudentModule's ``sampler`` and teacher samples use
    its reference ``teacher_sampler`` and ``guidance_scale`` (read from ``Models`` in ``setup``:
    one owner per setting). ``feature_blocks`` index the teacher's ``token_features()`` blocks:
    a DiT's blocks, or a Flux's double then single blocks (image tokens only, on the 2x2-packed
    latent grid).
    """

    num_optimizers: ClassVar[int] = 2

    def __init__(
        self,
        feature_blocks: list[int] | None = None,
        student_timestep_weights: list[float] | None = None,
        renoise: TimestepSampler | None = None,
        real: RealSource = "data",
        adv_weight: float = 1.0,
        distill_weight: float = 0.0,
        teacher_samples_per_step: int = 4,
        head_hidden: int = 128,
        head_cond_dim: int = 128,
        head_kernel_size: int = 3,
        stop_after_last_block: bool = True,
    ) -> None:
        super().__init__()
        _check_args(student_timestep_weights, real, teacher_samples_per_step)
        self.feature_blocks = feature_blocks
        self.weights_given = student_timestep_weights
        self.student_timestep_weights = torch.empty(0, dtype=torch.float64)  # set in setup
        self.renoise = renoise if renoise is not None else LogitNormal(mean=1.0, std=1.0)
        self.real = real
        self.adv_weight, self.distill_weight = adv_weight, distill_weight
        self.teacher_sampler: Sampler | None = None  # the StudentModule's, set in setup
        self.guidance_scale = 1.0
        self.teacher_samples_per_step = teacher_samples_per_step
        self.head_hidden, self.head_cond_dim = head_hidden, head_cond_dim
        self.head_kernel_size = head_kernel_size
        self.stop_after_last_block = stop_after_last_block
        self.heads: FeatureDiscriminatorHeads | None = None  # built in setup (teacher's sizes)
        self.block_indices: list[int] = []
        self.student_times = torch.empty(0, dtype=torch.float64)
        self._renoise_checked = False
        self._fake: tuple[DistillBatch, Tensor] | None = None  # the G step's detached x0
        self._teacher: tuple[DistillBatch, Tensor, Tensor] | None = None  # (batch, noise, x0)

    # ---------------------------------------------------------------- set-up
    def setup(self, models: Models) -> None:
        """Resolve the feature blocks and student times and build the heads on the teacher's
        sizes (idempotent; before a checkpoint is loaded into the method)."""
        net = models.teacher.net
        features = teacher_token_features(net)
        self.block_indices = resolve_blocks(self.feature_blocks, len(features.blocks))
        self.student_times = student_grid(models, "LADD")
        self.student_timestep_weights = timestep_weights(
            self.weights_given, len(self.student_times)
        )
        self.teacher_sampler, self.guidance_scale = models.teacher_sampler, models.guidance_scale
        if self.heads is None:
            device = next(net.parameters()).device
            self.heads = FeatureDiscriminatorHeads(
                num_heads=len(self.block_indices),
                feature_dim=features.width,
                text_dim=features.text_dim,
                cond_dim=self.head_cond_dim,
                hidden=self.head_hidden,
                kernel_size=self.head_kernel_size,
            ).to(device)

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """The heads' parameters (the teacher's stay frozen): the second optimiser's."""
        return self._heads().parameters()

    def _heads(self) -> FeatureDiscriminatorHeads:
        """The heads, or a clear error if setup was not called."""
        if self.heads is None:
            raise RuntimeError("LADD: call setup(models) before training (it builds the heads).")
        return self.heads

    # ---------------------------------------------------------------- sampling of times and inputs
    def renoise_times(
        self, batch: int, process: NoiseProcess, generator: torch.Generator
    ) -> Tensor:
        """Re-noising process times [batch] from ``renoise`` (LADD §3), float32 on gen device."""
        u = self.renoise(batch, device=generator.device, generator=generator)
        if not self._renoise_checked and (u.min() < 0 or u.max() > 1):  # once: no per-step sync
            raise ValueError(
                f"LADD renoise: {type(self.renoise).__name__} returned times outside [0, 1]; use a "
                "unit-time sampler (LogitNormal or Uniform) — it is mapped to the process's times."
            )
        self._renoise_checked = True
        return unit_to_process_time(u.double(), process).float()

    def student_inputs(self, batch: DistillBatch, process: NoiseProcess) -> tuple[Tensor, Tensor]:
        """(x_t [B, C, h, w], t [B]): per sample one student timestep; the first starts from pure
        noise, later ones noise the data latents to it (ADD §3, LADD §3)."""
        x0, g = batch.latents, batch.generator
        weights = self.student_timestep_weights.to(g.device)
        idx = torch.multinomial(weights, x0.shape[0], replacement=True, generator=g)  # [B]
        t = self.student_times.to(g.device)[idx].to(x0.device).float()
        noise = randn(x0.shape, x0, g)
        x_t = process.add_noise(x0.to(noise.dtype), noise, t)
        first = (idx == 0).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))  # [B, 1, 1, 1]
        return torch.where(first, noise, x_t), t

    def student_x0(self, batch: DistillBatch, models: Models) -> tuple[Tensor, Tensor]:
        """The student's x0 [B, C, h, w] and its input time t [B]."""
        x_t, t = self.student_inputs(batch, models.process)
        return models.student(x_t, t, **batch.cond).x0, t

    def teacher_samples(self, batch: DistillBatch, models: Models) -> tuple[Tensor, Tensor]:
        """(noise [k, C, h, w], CFG teacher samples from it) for the batch's first k captions,
        under no_grad; computed once per batch and shared by both steps."""
        if self._teacher is not None and self._teacher[0] is batch:
            return self._teacher[1], self._teacher[2]
        if self.teacher_sampler is None:
            raise RuntimeError("LADD: teacher samples need the StudentModule's teacher_sampler.")
        k = min(self.teacher_samples_per_step, batch.latents.shape[0])
        noise = randn((k, *batch.latents.shape[1:]), batch.latents, batch.generator)
        cond = {key: v[:k] for key, v in batch.cond.items()}
        uncond = {key: v[:k] for key, v in batch.uncond.items()}
        guided = ClassifierFreeGuidance(models.teacher, self.guidance_scale, cond, uncond)
        gen = batch.generator if batch.generator.device == noise.device else None
        with torch.no_grad():
            samples = self.teacher_sampler(guided, noise, gen)
        self._teacher = (batch, noise, samples)
        return noise, samples

    def real_samples(self, batch: DistillBatch, models: Models) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's real latents and their text: cached data or teacher samples."""
        if self.real == "data":
            return batch.latents, batch.cond
        samples = self.teacher_samples(batch, models)[1]
        return samples, {key: v[: samples.shape[0]] for key, v in batch.cond.items()}

    # ---------------------------------------------------------------- discriminator
    def teacher_features(
        self, teacher: Denoiser, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]
    ) -> list[Tensor]:
        """Image-token features [B, N, D] of the chosen teacher blocks at (x_t, t) via hooks (a
        sharded teacher's forward runs to the end whatever ``stop_after_last_block`` says:
        ``network_features``)."""
        return network_features(
            teacher.net,
            teacher_token_features(teacher.net),
            lambda: teacher.raw(x_t, t, **cond),
            self.block_indices,
            x_t.shape[-2:],
            self.stop_after_last_block,
        )

    def noisy_features(
        self, x0: Tensor, cond: dict[str, Tensor], models: Models, generator: torch.Generator
    ) -> tuple[list[Tensor], Tensor]:
        """Re-noise x0 at sampled levels t and read the teacher's block features there (LADD §3):
        (features, each [B, N, D]; t [B])."""
        t = self.renoise_times(x0.shape[0], models.process, generator).to(x0.device)
        x_t = models.process.add_noise(x0, randn(x0.shape, x0, generator), t)
        return self.teacher_features(models.teacher, x_t, t, cond), t

    def head_logits(
        self,
        features: list[Tensor],
        t: Tensor,
        latent_hw: tuple[int, int],
        cond: dict[str, Tensor],
        models: Models,
    ) -> list[Tensor]:
        """Per-head token logits (each [B, N]) conditioned on the text and the noise level t."""
        grid = teacher_token_features(models.teacher.net).grid(latent_hw)
        model_time = models.process.model_time(t).float()
        return self._heads()(features, grid, model_time, cond["text"], cond["text_mask"])

    # ---------------------------------------------------------------- the two losses
    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge generator loss -E[D(re-noised student x0)] through the frozen teacher features
        (heads frozen in this graph), plus the optional distillation regression."""
        fake, t_student = self.student_x0(batch, models)
        with frozen_parameters(self._heads()):
            features, t = self.noisy_features(fake, batch.cond, models, batch.generator)
            logits = self.head_logits(features, t, fake.shape[-2:], batch.cond, models)
        adv = mean_over_heads([hinge_g_loss(lg) for lg in logits])
        loss = self.adv_weight * adv
        logs = {"g_adv": adv.detach(), "student_t": t_student.mean().detach()}
        if self.distill_weight > 0:
            distill = self.distill_loss(batch, models)
            loss = loss + self.distill_weight * distill
            logs["g_distill"] = distill.detach()
        self._fake = (batch, fake.detach())
        return loss, logs

    def distill_loss(self, batch: DistillBatch, models: Models) -> Tensor:
        """MSE between the student's one-step x0 from noise z and the teacher's CFG sample from z
        (an optional regression term: LADD itself drops ADD's distillation loss, §3)."""
        noise, target = self.teacher_samples(batch, models)
        k = noise.shape[0]
        cond = {key: v[:k] for key, v in batch.cond.items()}
        t0 = self.student_times[0].to(noise.device).float().expand(k)
        pred = models.student(noise, t0, **cond).x0
        return F.mse_loss(pred.float(), target.float())

    def discriminator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge discriminator loss E[relu(1 - D(real))] + E[relu(1 + D(fake))] on detached
        features: only the heads receive gradients."""
        fake = self._cached_fake(batch, models)
        real, real_cond = self.real_samples(batch, models)
        b = fake.shape[0]
        x0 = torch.cat([fake, real.to(fake.dtype)])  # [B + Br, C, h, w]: one teacher pass
        cond = {key: torch.cat([batch.cond[key], real_cond[key]]) for key in batch.cond}
        with torch.no_grad():  # teacher features of detached inputs: heads-only graph below
            features, t = self.noisy_features(x0, cond, models, batch.generator)
        logits = self.head_logits(features, t, x0.shape[-2:], cond, models)
        loss = mean_over_heads([hinge_d_loss(lg[b:], lg[:b]) for lg in logits])
        real_logit = torch.stack([lg[b:].mean() for lg in logits]).mean().detach()
        fake_logit = torch.stack([lg[:b].mean() for lg in logits]).mean().detach()
        return loss, {"d_hinge": loss.detach(), "d_real": real_logit, "d_fake": fake_logit}

    def _cached_fake(self, batch: DistillBatch, models: Models) -> Tensor:
        """The G step's detached student x0 for this batch, or a fresh one under no_grad."""
        cached, self._fake = self._fake, None
        return take_cached_sample(cached, batch, lambda: self.student_x0(batch, models)[0])


def teacher_token_features(net: nn.Module) -> TokenFeatures:
    """The teacher network's feature blocks (DiT blocks; Flux double then single blocks)."""
    return token_features(net, "LADD (the discriminator reads the teacher's blocks)", ".")


def timestep_weights(weights: list[float] | None, steps: int) -> Tensor:
    """The sampling weights of the student's timesteps (uniform by default), one per step."""
    if weights is not None and len(weights) != steps:
        raise ValueError(
            f"LADD student_timestep_weights has {len(weights)} entries; the student's sampler "
            f"walks {steps} timesteps: give one weight per timestep"
        )
    return torch.tensor(weights or [1.0] * steps, dtype=torch.float64)


def _check_args(weights: list[float] | None, real: str, samples_per_step: int) -> None:
    """Clear errors for a bad LADD config, naming the field."""
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(
            f"LADD student_timestep_weights must be non-negative numbers with a positive "
            f"sum (one per student timestep), got {weights}"
        )
    if real not in ("data", "teacher"):
        raise ValueError(f"LADD real must be 'data' or 'teacher', got {real!r}")
    if samples_per_step < 1:
        raise ValueError(f"LADD teacher_samples_per_step must be >= 1, got {samples_per_step}")
