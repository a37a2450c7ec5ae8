"""Rectified flow on teacher couplings: reflow (Liu et al. 2022, "Flow Straight and Fast",
Alg. 1) and one-step distillation (§2.3; InstaFlow, Liu et al. 2023, §3).

A coupling is (z, x0): noise and the teacher's guided ODE sample from it (`fewstep couplings`,
read by `fewstep.data.couplings.CouplingDataModule`, which puts z in the batch as `noise`). The
student is trained as a flow x_s = (1 - s) x0 + s z, s in [0, 1], with velocity z - x0 (our
convention: `RectifiedFlow`, alpha = 1 - t, sigma = t). On a RectifiedFlow teacher s is the
process time and the network is used as is. On a DDPM teacher (eps or v prediction) the network
keeps its parameterisation and is read through `fewstep.diffusion.flow_frame`: at flow time s
it sees x_t = (alpha_t + sigma_t) x_s at the DDPM time t(s) with the same signal-to-noise ratio,
its (x0, eps) come from `parameterization.to_x0_eps`, and the sampler walks s with Euler.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.flow_frame import as_flow, flow_time, network_input
from fewstep.diffusion.losses import pseudo_huber
from fewstep.diffusion.parameterization import from_x0_eps
from fewstep.diffusion.schedules import broadcast
from fewstep.diffusion.timesteps import TimestepSampler, Uniform
from fewstep.distill.base import DistillationMethod, DistillBatch, Models

Mode = Literal["reflow", "distill", "both"]
LossSpace = Literal["prediction", "velocity"]
Distance = Literal["l2", "pseudo_huber"]


def _upcast(x: Tensor) -> Tensor:
    """x in at least float32 (losses are computed there)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def straight_path(x0: Tensor, z: Tensor, s: Tensor) -> Tensor:
    """x_s = (1 - s) x0 + s z with per-sample s [B] (Liu et al. 2022, eq. 1)."""
    s = broadcast(s, x0)
    return (1.0 - s) * x0 + s * z


def reflow_loss(
    student: Denoiser,
    x0: Tensor,
    z: Tensor,
    s: Tensor,
    space: LossSpace = "prediction",
    **cond: Tensor,
) -> Tensor:
    """Per-sample [B] squared error of the student on the straight path between a coupling (Liu
    et al. 2022, Alg. 1: min E||(z - x0) - v(x_s, s)||^2). space="velocity": that velocity
    error in the flow frame; "prediction": the error of the network's own output against the
    output that decodes to x0 at its input (identical for a velocity-predicting flow; for eps or
    v networks a time-reweighting of it that avoids the 1/alpha blow-up near pure noise)."""
    x0f, zf = _upcast(x0), _upcast(z)
    x_s = straight_path(x0f, zf, s)
    if space == "velocity":
        d = as_flow(student)(x_s.to(x0.dtype), s, **cond)
        return (d.eps - d.x0 - (zf - x0f)).pow(2).flatten(1).mean(1)  # [B, ...] -> [B]
    if space != "prediction":
        raise ValueError(f"Reflow loss_space must be 'prediction' or 'velocity', got {space!r}")
    process = student.process
    x_t, t = network_input(process, x_s, s)
    pred = _upcast(student.raw(x_t.to(x0.dtype), t, **cond))
    alpha, sigma = (broadcast(c, x0f) for c in process.alpha_sigma(t))
    clamped = broadcast(s > flow_time(process, process.t_max), x0f).bool()
    eps = torch.where(clamped, (x_t - alpha * x0f) / sigma, zf)  # = z where t(s) is not clamped
    target = from_x0_eps(x0f, eps, alpha, sigma, student.prediction)
    return (pred - target).pow(2).flatten(1).mean(1)  # [B, ...] -> [B]


def one_step_sample(student: Denoiser, z: Tensor, **cond: Tensor) -> Tensor:
    """The student's one-step Euler sample from z at s = 1: z - (eps - x0) = x0(z, 1)."""
    return as_flow(student)(z, torch.tensor(1.0), **cond).x0


def distill_loss(
    student: Denoiser,
    x0: Tensor,
    z: Tensor,
    distance: Distance = "l2",
    huber_c: float | None = None,
    **cond: Tensor,
) -> Tensor:
    """Per-sample [B] distance between the one-step sample from z and the coupled x0 (Liu et
    al. 2022, §2.3 distillation; InstaFlow uses LPIPS, here L2 or pseudo-Huber in latents)."""
    x0_hat, x0 = _upcast(one_step_sample(student, z, **cond)), _upcast(x0)
    if distance == "l2":
        return (x0_hat - x0).pow(2).flatten(1).mean(1)  # [B, ...] -> [B]
    if distance == "pseudo_huber":
        return pseudo_huber(x0_hat, x0, huber_c)
    raise ValueError(f"Reflow distance must be 'l2' or 'pseudo_huber', got {distance!r}")


def coupling_noise(batch: DistillBatch) -> Tensor:
    """The coupled noise z of the batch, with a clear error if the data has none."""
    noise = getattr(batch, "noise", None)
    if noise is None:
        raise ValueError(
            "Reflow needs (noise, teacher sample) couplings: build them with `fewstep couplings "
            "-c configs/student/reflow_couplings_shapes.yaml` and train with data: "
            "fewstep.data.couplings.CouplingDataModule on that folder."
        )
    if noise.shape != batch.latents.shape:
        raise ValueError(f"coupling noise {tuple(noise.shape)} != latents {batch.latents.shape}")
    return noise


class Reflow(DistillationMethod):
    """Student training on teacher couplings (Liu et al. 2022; InstaFlow, Liu et al. 2023).
    mode "reflow": straight-path flow matching (2-rectified flow); "distill": regression of the
    one-step sample onto the coupled x0; "both": reflow + distill_weight * distill. Flow times
    s come from `timestep_sampler` (default U(0, 1), as Liu et al.), at least `min_time`."""

    def __init__(
        self,
        mode: Mode = "reflow",
        distill_weight: float = 1.0,
        distance: Distance = "l2",
        huber_c: float | None = None,
        loss_space: LossSpace = "prediction",
        timestep_sampler: TimestepSampler | None = None,
        min_time: float = 1e-3,
    ) -> None:
        super().__init__()
        if mode not in ("reflow", "distill", "both"):
            raise ValueError(f"Reflow mode must be 'reflow', 'distill' or 'both', got {mode!r}")
        if distance not in ("l2", "pseudo_huber") or loss_space not in ("prediction", "velocity"):
            raise ValueError(
                f"Reflow: distance must be l2|pseudo_huber (got {distance!r}), loss_space "
                f"prediction|velocity (got {loss_space!r})"
            )
        if not 0.0 < min_time < 1.0:
            raise ValueError(f"Reflow min_time must be in (0, 1), got {min_time}")
        self.mode, self.distill_weight = mode, distill_weight
        self.distance, self.huber_c, self.loss_space = distance, huber_c, loss_space
        self.timestep_sampler = timestep_sampler or Uniform()
        self.min_time = min_time

    def student_denoiser(self, student: Denoiser) -> Denoiser:
        """The student as a flow-time denoiser, so Euler samples it on any teacher process."""
        return as_flow(student)

    def flow_times(self, batch: DistillBatch) -> Tensor:
        """Flow times s [B] in [min_time, 1] from the step's generator."""
        x0 = batch.latents
        s = self.timestep_sampler(x0.shape[0], device=x0.device, generator=batch.generator)
        return s.double().clamp(self.min_time, 1.0)

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """reflow and/or distill loss on the batch's couplings (z = batch.noise, x0 = latents)."""
        x0, z = batch.latents, coupling_noise(batch)
        logs: dict[str, Tensor] = {}
        total = x0.new_zeros((), dtype=torch.float32)
        if self.mode in ("reflow", "both"):
            s = self.flow_times(batch)
            loss = reflow_loss(models.student, x0, z, s, self.loss_space, **batch.cond).mean()
            total, logs["reflow"] = total + loss, loss.detach()
        if self.mode in ("distill", "both"):
            loss = distill_loss(
                models.student, x0, z, self.distance, self.huber_c, **batch.cond
            ).mean()
            total, logs["distill"] = total + self.distill_weight * loss, loss.detach()
        return total, logs
