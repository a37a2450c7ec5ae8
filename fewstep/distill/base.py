"""The distillation-method interface the StudentModule drives; methods know nothing of Lightning."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.samplers import Sampler
from fewstep.diffusion.schedules import NoiseProcess
from fewstep.diffusion.timesteps import TimestepSampler


@dataclass(eq=False)
class DistillBatch:
    """One training batch for a distillation step (cache latents + text, null text, generator)."""

    latents: Tensor  # [B, C, h, w] normalised data latents x0 (scaled like the teacher's)
    text: Tensor  # [B, L, D] text embeddings (zero-padded)
    text_mask: Tensor  # [B, L] bool
    null_text: Tensor  # [B, L0, D] the empty-caption embedding, expanded to the batch
    null_mask: Tensor  # [B, L0] bool
    generator: torch.Generator  # all randomness of the step (resume-exact)
    noise: Tensor | None = None  # [B, C, h, w] coupled noise (CouplingDataModule), else None
    pooled: Tensor | None = None  # [B, Dv] pooled text vector (FLUX.1's CLIP), else None
    null_pooled: Tensor | None = None  # [B, Dv] the empty caption's pooled vector, expanded

    @property
    def cond(self) -> dict[str, Tensor]:
        """The conditional keyword arguments of a Denoiser call (with ``cond=`` the pooled
        vector, for networks that take one)."""
        extra = {} if self.pooled is None else {"cond": self.pooled}
        return {"text": self.text, "text_mask": self.text_mask, **extra}

    @property
    def uncond(self) -> dict[str, Tensor]:
        """The unconditional (null-caption) keyword arguments of a Denoiser call."""
        extra = {} if self.null_pooled is None else {"cond": self.null_pooled}
        return {"text": self.null_text, "text_mask": self.null_mask, **extra}


@dataclass(eq=False)
class Models:
    """The networks a method sees: trainable student, frozen teacher, and the teacher's process."""

    student: Denoiser  # over the TRAINABLE student network
    teacher: Denoiser  # over the frozen teacher network (requires_grad False, eval mode)
    process: NoiseProcess  # the teacher's process (DiscreteDDPM or RectifiedFlow)
    # The StudentModule owns these settings; methods read them here, never restate them:
    student_sampler: Sampler | None = None  # the student's sampler (its step grid)
    teacher_sampler: Sampler | None = None  # the teacher's reference sampler
    guidance_scale: float = 1.0  # the teacher's reference CFG scale
    teacher_timesteps: TimestepSampler | None = None  # the teacher's training-time sampler


class DistillationMethod(nn.Module):
    """A distillation method: the losses of one student step and any trainable extras.

    Trainable extras (e.g. LADD discriminator heads) are registered submodules: the StudentModule
    optimises them with the second optimiser and checkpoints them. Frozen helper copies (e.g. the
    consistency EMA target) are kept out of parameters() (plain attributes or buffers) but saved
    via state_dict hooks or `get_extra_state` so that resume is exact.
    """

    num_optimizers: ClassVar[int] = 1  # 2 for adversarial methods

    def setup(self, models: Models) -> None:
        """Called once before training (and before loading a checkpoint into the method)."""

    def student_denoiser(self, student: Denoiser) -> Denoiser:
        """What the student's sampler calls after `.bind(text=..., text_mask=...)` (a Denoiser or
        subclass, e.g. with boundary conditions); identity by default."""
        return student

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss the student optimiser minimises + detached scalars to log (no prefix)."""
        raise NotImplementedError

    def discriminator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The second optimiser's loss (only for num_optimizers == 2)."""
        raise NotImplementedError(f"{type(self).__name__} has no discriminator")

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """The second optimiser's parameters."""
        return iter(())

    def generator_step_due(self, global_step: int) -> bool:
        """Whether the student steps in the batch starting at optimiser step ``global_step``
        (two time-scale rules such as DMD2's; a function of the step alone so resume is exact)."""
        return True

    def after_student_step(self, models: Models) -> None:
        """Hook after each student optimiser step (e.g. the EMA-target update)."""

    def attach_fsdp_root(self, root: FSDP | None) -> None:
        """Hook at fit start with the FSDP root wrapping the StudentModule (None when not
        sharded): methods that keep weights laid out like the student's (LCM's θ⁻) shard them
        here. Every rank calls it, outside any forward; a no-op by default."""


def add_guidance_embedding(student: Denoiser, method: str) -> None:
    """Give the student network its zero-initialised CFG-scale embedding (LCM §4.2; Meng et
    al. 2023), or one clear error naming ``method`` if the network has none to add."""
    add = getattr(student.net, "add_guidance_embedding", None)
    if add is None:
        raise ValueError(
            f"{method} needs a student network with add_guidance_embedding() (fewstep DiT); "
            f"got {type(student.net).__name__}"
        )
    add()


def student_grid(models: Models, method: str) -> Tensor:
    """The student's k input times (float64, descending): the grid its sampler walks."""
    if models.student_sampler is None:
        raise ValueError(f"{method} needs the StudentModule's sampler (Models.student_sampler).")
    return models.student_sampler.timesteps(models.process)[:-1].to(torch.float64)


def take_cached_sample(
    cached: tuple[DistillBatch, Tensor] | None, batch: DistillBatch, fresh: Callable[[], Tensor]
) -> Tensor:
    """The generator step's detached student sample when it was made for ``batch``, else
    ``fresh()`` under no_grad (a second-optimiser step without a generator step before it)."""
    if cached is not None and cached[0] is batch:
        return cached[1]
    with torch.no_grad():
        return fresh().detach()
