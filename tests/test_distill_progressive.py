"""Progressive distillation (Salimans & Ho 2022): the one-step target, zero loss for a consistent
teacher, rounds that hand the student over as the next teacher."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fewstep.diffusion.denoiser import Denoised, Denoiser
from fewstep.diffusion.parameterization import from_x0_eps
from fewstep.diffusion.samplers import ddim_deterministic_step
from fewstep.diffusion.schedules import DiscreteDDPM, RectifiedFlow, broadcast
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.progressive import ProgressiveDistillation, one_step_x0

B, C, HW = 3, 4, 8
PROCESSES = [(RectifiedFlow(), "velocity"), (DiscreteDDPM(), "epsilon")]


@pytest.mark.parametrize("process, prediction", PROCESSES)
def test_one_ddim_step_with_the_target_x0_lands_on_the_two_step_point(process, prediction):
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(B, C, HW, HW, generator=g), torch.randn(B, C, HW, HW, generator=g)
    grid = process.timesteps(8, "trailing")
    t, s = grid[[0, 2, 4]], grid[[2, 4, 6]]
    x0 = one_step_x0(x_t, x_s, t, s, process)
    alpha, sigma = (broadcast(c, x_t) for c in process.alpha_sigma(t))
    landed = ddim_deterministic_step(Denoised(x0, (x_t - alpha * x0) / sigma), s, process)
    torch.testing.assert_close(landed, x_s, rtol=1e-4, atol=1e-4)


class ConstantX0(nn.Module):
    """A network whose x0 estimate is a fixed tensor whatever x_t and t: DDIM with it is
    consistent (two steps = one step), so progressive distillation's target is that x0."""

    def __init__(self, x0: torch.Tensor, process, prediction) -> None:
        super().__init__()
        self.x0 = nn.Parameter(x0.clone())
        self.process, self.prediction = process, prediction

    def forward(self, x, model_t, text=None, text_mask=None):
        t = self._process_time(model_t)
        alpha, sigma = (broadcast(c, x) for c in self.process.alpha_sigma(t))
        eps = (x.double() - alpha * self.x0.double()) / sigma
        return from_x0_eps(self.x0.double(), eps, alpha, sigma, self.prediction).float()

    def _process_time(self, model_t):
        if isinstance(self.process, RectifiedFlow):
            return model_t.double() / self.process.num_train_timesteps
        return model_t.double()


def models_and_batch(process, prediction):
    x0 = torch.randn(1, C, HW, HW, generator=torch.Generator().manual_seed(3))  # broadcast
    teacher = ConstantX0(x0, process, prediction).requires_grad_(False)
    models = Models(
        Denoiser(copy.deepcopy(teacher).requires_grad_(True), process, prediction),
        Denoiser(teacher, process, prediction),
        process,
        guidance_scale=3.0,
    )
    g = torch.Generator().manual_seed(1)
    batch = DistillBatch(
        latents=torch.randn(B, C, HW, HW, generator=g),
        text=torch.zeros(B, 2, 4),
        text_mask=torch.ones(B, 2, dtype=torch.bool),
        null_text=torch.zeros(B, 1, 4),
        null_mask=torch.ones(B, 1, dtype=torch.bool),
        generator=torch.Generator().manual_seed(2),
    )
    return models, batch


@pytest.mark.parametrize("process, prediction", PROCESSES)
def test_loss_is_zero_when_the_student_already_takes_the_teachers_two_steps_in_one(
    process, prediction
):
    models, batch = models_and_batch(process, prediction)
    method = ProgressiveDistillation(rounds=[4, 2, 1], steps_per_round=2)
    method.setup(models)
    for _ in range(3):  # rounds 0 (guided teacher) and 1 (the round teacher)
        loss, logs = method.generator_loss(batch, models)
        assert loss.item() < 1e-6, (method.round, loss.item())
        method.after_student_step(models)
    with torch.no_grad():
        models.student.net.x0.add_(0.5)  # a different x0: the loss sees it
    assert method.generator_loss(batch, models)[0].item() > 1e-3


def test_rounds_hand_the_student_over_as_the_next_teacher_and_resume():
    models, batch = models_and_batch(RectifiedFlow(), "velocity")
    method = ProgressiveDistillation(rounds=[2, 1], steps_per_round=2)
    method.setup(models)
    assert method.round == 0 and method.generator_loss(batch, models)[1]["round_steps"] == 2
    for step in range(2):
        with torch.no_grad():
            models.student.net.x0.add_(0.1 * (step + 1))
        method.after_student_step(models)
    assert method.round == 1 and method.generator_loss(batch, models)[1]["round_steps"] == 1
    teacher = method._teacher[0]
    assert torch.equal(teacher.x0, models.student.net.x0) and not teacher.x0.requires_grad
    restored = ProgressiveDistillation(rounds=[2, 1], steps_per_round=2)
    restored.set_extra_state(copy.deepcopy(method.get_extra_state()))
    restored.setup(models)
    restored.round_teacher(batch, models)
    assert restored.round == 1 and torch.equal(restored._teacher[0].x0, teacher.x0)


@pytest.mark.parametrize(
    "kwargs", [dict(rounds=[8, 3, 1]), dict(rounds=[]), dict(steps_per_round=0)]
)
def test_bad_rounds_are_one_clear_error(kwargs):
    with pytest.raises(ValueError, match="rounds must be step counts that halve"):
        ProgressiveDistillation(**kwargs)


def test_models_replace_keeps_the_method_usable():
    models, batch = models_and_batch(RectifiedFlow(), "velocity")
    method = ProgressiveDistillation(rounds=[1], steps_per_round=5)
    method.setup(dataclasses.replace(models, guidance_scale=1.0))
    assert method.guidance_scale == 1.0 and method.generator_loss(batch, models)[0].item() < 1e-6
