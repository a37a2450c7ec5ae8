"""Continuous-time consistency distillation in TrigFlow, sCM (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", Alg. 1), as SANA-Sprint (Chen et al.
2025, §3) applies it to flow teachers: the teacher and the student (initialised from it) are seen
in TrigFlow coordinates by the exact, training-free conversion of `fewstep.diffusion.trigflow`.

The student is f_θ(x_t, t) = cos(t) x_t - sin(t) sigma_d F_θ(x_t / sigma_d, t) (f_θ(x, 0) = x by
construction). Each step draws t from the log-normal proposal, x_t = cos(t) x0 + sin(t) z with x0 =
sigma_d * latents and z ~ N(0, sigma_d² I), takes the CFG teacher's PF-ODE velocity dx_t/dt, the
tangent g = cos(t) d f_θ⁻/dt (JVP or finite differences; warmed up and normalised) and regresses
F_θ onto F_θ⁻ + g with the learned weight w_φ(t) (eq. 8). Optionally adds LADD's adversarial
generator loss (SANA-Sprint's sCM + LADD). Sampled by `Consistency` in TrigFlow time.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from fewstep.diffusion.continuous_consistency import (
    adaptive_weighted_loss,
    finite_difference_tangent,
    jvp_tangent,
    normalize_tangent,
    proposal_times,
    scm_tangent,
    warmup_ratio,
)
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.trigflow import (
    TrigFlowDenoiser,
    TrigFlowTime,
    as_trigflow,
    trig_velocity,
)
from fewstep.distill.base import DistillationMethod, DistillBatch, Models
from fewstep.distill.ladd import LADD, randn
from fewstep.models.adaptive_weight import AdaptiveWeight

Tangent = Literal["jvp", "finite_difference"]


class SCM(DistillationMethod):
    """sCM distillation (Lu & Song 2024, Alg. 1) of the CFG teacher (``Models.guidance_scale``).

    ``tangent``: "jvp" (`torch.func.jvp`, attention on the math kernel) or "finite_difference"
    (central differences with step ``finite_difference_epsilon`` in TrigFlow time, for kernels
    or sharded models without forward-mode AD). ``warmup_steps`` ramps the tangent's second term
    (r: 0 -> 1, §4.2); ``tangent_norm_c`` is c in g / (||g|| + c). ``adaptive_weighting`` learns
    w_φ(t) (eq. 8): it and any ``ladd`` heads form the second optimiser (``num_optimizers`` is 2
    then), trained on the same batch after the student step with the student's detached error —
    the gradients of the joint objective. With ``ladd`` the student also minimises
    ``ladd_weight`` x LADD's generator loss (SANA-Sprint §3.3).
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -0.8,
        p_std: float = 1.6,
        tangent: Tangent = "jvp",
        finite_difference_epsilon: float = 1e-4,
        tangent_norm_c: float = 0.1,
        warmup_steps: int = 1000,
        adaptive_weighting: bool = True,
        weight_channels: int = 128,
        ladd: LADD | None = None,
        ladd_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check(sigma_data, p_std, tangent, finite_difference_epsilon, tangent_norm_c, ladd_weight)
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.tangent, self.finite_difference_epsilon = tangent, finite_difference_epsilon
        self.tangent_norm_c, self.warmup_steps = tangent_norm_c, warmup_steps
        self.weight_net = AdaptiveWeight(weight_channels) if adaptive_weighting else None
        self.ladd, self.ladd_weight = ladd, ladd_weight
        self.register_buffer("student_steps", torch.zeros((), dtype=torch.long))  # warm-up clock
        self._error: tuple[DistillBatch, Tensor, Tensor] | None = None  # (batch, error [B], t)

    @property
    def num_optimizers(self) -> int:  # type: ignore[override]  # per instance, not per class
        """2 when w_φ or LADD heads need the second optimiser, else 1."""
        return 2 if self.weight_net is not None or self.ladd is not None else 1

    def setup(self, models: Models) -> None:
        """Set up the LADD part (its heads on the teacher's sizes), if any."""
        if self.ladd is not None:
            self.ladd.setup(models)

    def attach_fsdp_root(self, root: FSDP | None) -> None:
        """Under FSDP, refuse JVP tangents (one clear error on every rank at fit start) and hand
        the root to the LADD part."""
        if root is not None and self.tangent == "jvp":
            raise ValueError(
                "SCM tangent 'jvp' under FSDP: torch.func.jvp cannot run through FSDP units "
                "(forward-mode AD over weights that FSDP gathers and frees in its hooks crashes "
                "the processes); set model.init_args.method.init_args.tangent: "
                "finite_difference (central differences, forwards only)."
            )
        if self.ladd is not None:
            self.ladd.attach_fsdp_root(root)

    def student_denoiser(self, student: Denoiser) -> Denoiser:
        """The student in TrigFlow coordinates: its x0 is f_θ(x_t, t) (sampled by Consistency);
        a guidance-embedded one (FLUX.1-dev) keeps its guidance input."""
        return as_trigflow(student)

    def after_student_step(self, models: Models) -> None:
        """Advance the tangent warm-up clock (saved with the method: exact resume)."""
        self.student_steps += 1
        if self.ladd is not None:
            self.ladd.after_student_step(models)

    # --- the sCM terms -----------------------------------------------------------------------

    def teacher_velocity(self, x: Tensor, t: Tensor, batch: DistillBatch, models: Models) -> Tensor:
        """The CFG teacher's TrigFlow velocity F_pre(x, t) (sigma_d units) under no_grad."""
        teacher = as_trigflow(models.teacher)  # a guidance-embedded one: one pass
        guided = ClassifierFreeGuidance(teacher, models.guidance_scale, batch.cond, batch.uncond)
        with torch.no_grad():
            return trig_velocity(guided(x, t), t).to(x.dtype)

    def student_tangent(
        self, student: TrigFlowDenoiser, x: Tensor, t: Tensor, velocity: Tensor, batch: DistillBatch
    ) -> Tensor:
        """cos t sin t dF_θ⁻/dt along the teacher's ODE (x, t) -> (velocity, 1), no graph."""

        def fn(x_: Tensor, t_: Tensor) -> Tensor:
            return student.velocity(x_, t_, **batch.cond).to(x_.dtype)

        with torch.no_grad():
            if self.tangent == "jvp":
                return jvp_tangent(fn, x, t, velocity)[1]
            t_max = student.process.t_max
            return finite_difference_tangent(
                fn, x, t, velocity, self.finite_difference_epsilon, t_max
            )

    def scm_terms(self, batch: DistillBatch, models: Models) -> tuple[Tensor, Tensor, Tensor]:
        """(F_θ(x_t / sigma_d, t) with its graph, the normalised tangent g, t [B]) (Alg. 1)."""
        x0, g = batch.latents, batch.generator
        student = as_trigflow(models.student)
        t_max = TrigFlowTime(models.process).t_max
        t = proposal_times(x0.shape[0], self.p_mean, self.p_std, self.sigma_data, g, t_max)
        t = t.to(x0.device)
        eps = randn(x0.shape, x0, g)
        cos, sin = (c.reshape(-1, *[1] * (x0.ndim - 1)) for c in (torch.cos(t), torch.sin(t)))
        x_unit = (cos * x0.double() + sin * eps.double()).to(eps.dtype)  # x_t / sigma_d
        velocity = self.teacher_velocity(x_unit, t, batch, models)  # dx_t/dt / sigma_d
        cs_df_dt = self.student_tangent(student, x_unit, t, velocity, batch)
        f_theta = student.velocity(x_unit, t, **batch.cond)
        r = warmup_ratio(int(self.student_steps), self.warmup_steps)
        sd = self.sigma_data
        g_raw = scm_tangent(f_theta.detach(), sd * velocity, sd * x_unit, cs_df_dt, t, sd, r)
        return f_theta, normalize_tangent(g_raw, self.tangent_norm_c), t

    # --- the two losses ----------------------------------------------------------------------

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The sCM loss mean_B e^{w(t)} ||F_θ - F_θ⁻ - g||² / D - w(t) with w detached (eq. 8),
        plus ``ladd_weight`` x LADD's generator loss if set."""
        f_theta, g, t = self.scm_terms(batch, models)
        diff = f_theta.float() - f_theta.detach().float() - g.float()
        error = diff.pow(2).flatten(1).mean(1)  # [B] ||·||² / D
        logs = {"scm_error": error.detach().mean(), "tangent_warmup": self._warmup_tensor(t)}
        if self.weight_net is not None:
            w = self.weight_net(t).detach().float()
            loss = adaptive_weighted_loss(error, w).mean()
            self._error = (batch, error.detach(), t)
            logs["adaptive_weight"] = w.mean()
        else:
            loss = error.mean()
        logs["scm_loss"] = loss.detach()
        if self.ladd is not None:
            adv, adv_logs = self.ladd.generator_loss(batch, models)
            loss = loss + self.ladd_weight * adv
            logs.update({f"ladd_{k}": v for k, v in adv_logs.items()})
        return loss, logs

    def _warmup_tensor(self, like: Tensor) -> Tensor:
        """The current warm-up ratio r as a logged scalar."""
        r = warmup_ratio(int(self.student_steps), self.warmup_steps)
        return torch.tensor(r, device=like.device)

    def discriminator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The second optimiser's loss: w_φ's part of eq. 8 on the student step's detached error,
        plus LADD's discriminator loss (disjoint parameters: their sum trains each alone)."""
        losses, logs = [], {}
        if self.ladd is not None:
            d_loss, d_logs = self.ladd.discriminator_loss(batch, models)
            losses.append(d_loss)
            logs.update(d_logs)
        if self.weight_net is not None:
            error, t = self._student_error(batch, models)
            w = self.weight_net(t).float()
            w_loss = adaptive_weighted_loss(error, w).mean()
            losses.append(w_loss)
            logs.update(weight_loss=w_loss.detach(), adaptive_weight=w.detach().mean())
        if not losses:
            raise NotImplementedError("SCM without adaptive weighting or LADD has one optimiser")
        return torch.stack(losses).sum(), logs

    def _student_error(self, batch: DistillBatch, models: Models) -> tuple[Tensor, Tensor]:
        """The student step's detached per-sample error and times for this batch (or fresh)."""
        cached, self._error = self._error, None
        if cached is not None and cached[0] is batch:
            return cached[1], cached[2]
        with torch.no_grad():
            _, g, t = self.scm_terms(batch, models)
        return g.float().pow(2).flatten(1).mean(1), t  # F_θ - F_θ⁻ is 0 in value

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """w_φ's parameters and LADD's heads: the second optimiser's."""
        weight = self.weight_net.parameters() if self.weight_net is not None else iter(())
        heads = self.ladd.discriminator_parameters() if self.ladd is not None else iter(())
        return chain(heads, weight)


def _check(
    sigma_data: float,
    p_std: float,
    tangent: str,
    epsilon: float,
    norm_c: float,
    ladd_weight: float,
) -> None:
    """Reject bad SCM arguments, naming the field."""
    problems = {
        "sigma_data must be > 0": sigma_data <= 0,
        "p_std must be > 0": p_std <= 0,
        "tangent must be 'jvp' or 'finite_difference'": tangent not in ("jvp", "finite_difference"),
        "finite_difference_epsilon must be > 0": epsilon <= 0,
        "tangent_norm_c must be >= 0": norm_c < 0,
        "ladd_weight must be >= 0": ladd_weight < 0,
    }
    for message, bad in problems.items():
        if bad:
            raise ValueError(f"SCM: {message}")
