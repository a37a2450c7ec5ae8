"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Alg. 2): in round r the student learns to take in one deterministic DDIM step
what its teacher takes in two, halving the step count; the student of a round is the teacher of
the next. Round 0's teacher is the frozen teacher with CFG at the StudentModule's scale."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.parameterization import from_x0_eps
from fewstep.diffusion.samplers import ddim_deterministic_step
from fewstep.diffusion.schedules import NoiseProcess, broadcast
from fewstep.distill.base import DistillationMethod, DistillBatch, Models


def one_step_x0(x_t: Tensor, x_s: Tensor, t: Tensor, s: Tensor, process: NoiseProcess) -> Tensor:
    """The x̂0 whose single DDIM step t -> s lands on x_s (Salimans & Ho 2022, eq. 8):
    x̂0 = (x_s - (σ_s/σ_t) x_t) / (α_s - (σ_s/σ_t) α_t)."""
    (a_t, s_t), (a_s, s_s) = process.alpha_sigma(t), process.alpha_sigma(s)
    ratio = broadcast(s_s / s_t, x_t)
    return (x_s - ratio * x_t) / (broadcast(a_s, x_t) - ratio * broadcast(a_t, x_t))


class ProgressiveDistillation(DistillationMethod):
    """Rounds of ``steps_per_round`` student steps; round r trains a student of ``rounds[r]``
    steps against a teacher of twice as many (the previous round's student, frozen). The
    StudentModule's sampler should walk ``rounds[-1]`` steps (its DDIM/Euler trailing grid)."""

    def __init__(self, rounds: list[int] | None = None, steps_per_round: int = 1000) -> None:
        super().__init__()
        rounds = list(rounds if rounds is not None else [8, 4, 2, 1])
        halving = all(a == 2 * b for a, b in zip(rounds[:-1], rounds[1:], strict=False))
        if not rounds or min(rounds) < 1 or not halving or steps_per_round < 1:
            raise ValueError(
                "ProgressiveDistillation: rounds must be step counts that halve each round "
                f"(e.g. [8, 4, 2, 1]) and steps_per_round >= 1; got {rounds}, {steps_per_round}"
            )
        self.rounds, self.steps_per_round = rounds, steps_per_round
        self.student_steps_done = 0
        self._teacher: list[nn.Module] = []  # the previous round's student: not a submodule
        self._pending: dict[str, Any] | None = None
        self.guidance_scale = 1.0

    @property
    def round(self) -> int:
        """The current round (the last one once the schedule is done)."""
        return min(self.student_steps_done // self.steps_per_round, len(self.rounds) - 1)

    def setup(self, models: Models) -> None:
        """Read the reference CFG scale (round 0's teacher is guided)."""
        self.guidance_scale = models.guidance_scale

    def round_teacher(self, batch: DistillBatch, models: Models) -> Any:
        """Round 0: the frozen teacher with CFG; later: the previous round's frozen student."""
        self.restore_teacher(models.student.net)
        if self.round == 0 or not self._teacher:
            return ClassifierFreeGuidance(
                models.teacher, self.guidance_scale, batch.cond, batch.uncond
            )
        # the student's own denoiser kind (e.g. GuidanceEmbedded: the scale stays an input)
        return dataclasses.replace(models.student, net=self._teacher[0]).bind(**batch.cond)

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE (in the network's parameterisation) to the target whose one DDIM step t -> s
        equals the teacher's two steps t -> m -> s (Salimans & Ho 2022, Alg. 2)."""
        x0, g, process = batch.latents, batch.generator, models.process
        n = self.rounds[self.round]
        grid = process.timesteps(2 * n, "trailing").to(x0.device)  # the teacher's 2n + 1 times
        i = 2 * torch.randint(0, n, (x0.shape[0],), generator=g, device=g.device).to(x0.device)
        t, m, s = grid[i], grid[i + 1], grid[i + 2]
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=torch.float32)
        x_t = process.add_noise(x0.float(), eps, t)
        with torch.no_grad():
            teacher = self.round_teacher(batch, models)
            x_m = ddim_deterministic_step(teacher(x_t, t), m, process)
            x_s = ddim_deterministic_step(teacher(x_m, m), s, process)
            x0_target = one_step_x0(x_t, x_s, t, s, process)
            alpha, sigma = (broadcast(c, x_t) for c in process.alpha_sigma(t))
            eps_target = (x_t - alpha * x0_target) / sigma
            target = from_x0_eps(x0_target, eps_target, alpha, sigma, models.student.prediction)
        pred = models.student.raw(x_t.to(x0.dtype), t, **batch.cond).float()
        loss = (pred - target.float()).pow(2).mean()
        logs = {"progressive_loss": loss.detach(), "round_steps": torch.tensor(float(n))}
        return loss, logs

    def after_student_step(self, models: Models) -> None:
        """Count the step; at a round boundary the student becomes the next round's teacher."""
        before = self.round
        self.student_steps_done += 1
        if self.round != before:
            self._teacher = [copy.deepcopy(models.student.net).requires_grad_(False).eval()]

    def get_extra_state(self) -> dict[str, Any]:
        """Steps done and the round teacher's weights, so that resume is exact."""
        if self._pending is not None:  # loaded, not rebuilt yet
            return dict(self._pending)
        weights = self._teacher[0].state_dict() if self._teacher else None
        return {"student_steps_done": self.student_steps_done, "teacher": weights}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the step count and the round teacher (built on the student's architecture
        from the saved weights once the module knows it: see ``restore_teacher``)."""
        self.student_steps_done = int(state["student_steps_done"])
        self._pending = state if state.get("teacher") is not None else None

    def restore_teacher(self, student_net: nn.Module) -> None:
        """Rebuild a loaded round teacher as a frozen copy of ``student_net`` with its weights."""
        if self._pending is None:
            return
        net = copy.deepcopy(student_net).requires_grad_(False).eval()
        net.load_state_dict(self._pending["teacher"], strict=True)
        self._teacher, self._pending = [net], None
