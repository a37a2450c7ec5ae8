"""Latent consistency distillation (Luo et al. 2023, LCM, arXiv:2310.04378, Alg. 1; PixArt-δ,
Chen et al. 2024, arXiv:2401.05252): the student f_θ learns to map any point of the teacher's
guided probability-flow ODE to its origin, f_θ(x_{t_{n+k}}, t_{n+k}) ≈ f_θ⁻(x̂_{t_n}, t_n), where
x̂_{t_n} is one teacher ODE-solver step with classifier-free guidance folded in and θ⁻ is an EMA
of θ (the target network). Sampled in 1-4 steps by `fewstep.diffusion.samplers.Consistency`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from fewstep.diffusion.consistency import ConsistencyDenoiser
from fewstep.diffusion.denoiser import Denoised, Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.losses import pseudo_huber
from fewstep.diffusion.samplers import ddim_deterministic_step, euler_step
from fewstep.diffusion.schedules import NoiseProcess, RectifiedFlow
from fewstep.distill.base import (
    DistillationMethod,
    DistillBatch,
    Models,
    add_guidance_embedding,
)
from fewstep.models.fsdp_params import in_nested_unit, nested_units, reshards_after_forward
from fewstep.models.shadow_weights import ShadowWeights, named_tensors, trainable_parameters

Boundary = Literal["auto", "lcm", "x0"]
Solver = Literal["auto", "ddim", "euler"]
Loss = Literal["huber", "l2"]
GuidanceScale = float | tuple[float, float]


def consistency_loss(pred: Tensor, target: Tensor, kind: Loss = "huber", c: float = 1e-3) -> Tensor:
    """Distance d(f_θ, f_θ⁻) of LCM eq. 10: pseudo-Huber with constant c, or mean squared error."""
    if kind == "huber":  # LCM's elementwise pseudo-Huber: each element a row of one
        return pseudo_huber(pred.reshape(-1, 1), target.reshape(-1, 1), c).mean()
    if kind == "l2":
        return (pred.float() - target.float()).pow(2).mean()
    raise ValueError(f"ConsistencyDistillation: loss must be 'huber' or 'l2', got {kind!r}")


def skipping_schedule(process: NoiseProcess, num_solver_steps: int) -> Tensor:
    """The teacher-solver grid: N + 1 descending times with skip k = num_train_timesteps // N
    between neighbours (LCM §4.3, "skipping-step"; DDPM: 999, 979, ..., 19, then t_clean)."""
    return process.timesteps(num_solver_steps, "trailing")


class ConsistencyDistillation(DistillationMethod):
    """Latent consistency distillation (LCM, Luo et al. 2023, Alg. 1).

    Per sample: n ~ U{0..N-1} on the skipping-step grid, t = t_n > s = t_{n+1}; x_t = alpha_t x0
    + sigma_t ε; x̂_s = Ψ(x_t, t, s; guided teacher with scale w); loss d(f_θ(x_t, t, w),
    f_θ⁻(x̂_s, s, w)). `guidance_scale` is a fixed CFG scale or a (min, max) range sampled
    uniformly per sample; with `guidance_embedding` the student is w-conditioned (LCM §4.2) and
    sampled at `sample_guidance_scale`. The target θ⁻ starts equal to the student and follows it
    with `target_decay` after each student step; it is no parameter but is saved (extra state).
    θ⁻ shadows the student's trainable parameters only (a LoRA student's θ⁻ costs its adapters)
    and is sharded like them under FSDP (the StudentModule calls ``attach_fsdp_root``).
    """

    def __init__(
        self,
        num_solver_steps: int = 50,
        guidance_scale: GuidanceScale = 4.5,
        guidance_embedding: bool = False,
        sample_guidance_scale: float | None = None,
        target_decay: float = 0.95,
        loss: Loss = "huber",
        huber_c: float = 1e-3,
        boundary: Boundary = "auto",
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
        solver: Solver = "auto",
    ) -> None:
        super().__init__()
        _check(num_solver_steps, guidance_scale, target_decay, loss, boundary, solver)
        self.num_solver_steps = num_solver_steps
        self.guidance_scale = guidance_scale
        self.guidance_embedding = guidance_embedding
        self.sample_guidance_scale = sample_guidance_scale
        self.target_decay, self.loss, self.huber_c = target_decay, loss, huber_c
        self.boundary, self.sigma_data = boundary, sigma_data
        self.timestep_scaling = timestep_scaling
        self.solver = solver
        self._student: list[nn.Module] = []  # the student network (a plain list: no submodule)
        self._root: list[FSDP] = []  # the FSDP root sharding it, once attached
        self._names: list[str] = []  # its trainable parameters (θ⁻ shadows them)
        self._shadow: ShadowWeights | None = None
        self._pending: dict[str, Tensor] | None = None

    # --- set-up and the EMA target θ⁻ ------------------------------------------------------
    #
    # θ⁻ is a shadow copy of the student's TRAINABLE parameters (a LoRA student: its adapters;
    # frozen weights and buffers are shared with the student). Its prediction swaps the shadows
    # into the student for one no-grad forward (ShadowWeights.swapped_into), then restores it. Under
    # FSDP (use_orig_params) each rank keeps the shards of the parameters that FSDP units inside
    # the student hold, and full copies of those left to the root unit (gathered during the
    # training step's root forward); the saved state is full tensors by name either way.

    def setup(self, models: Models) -> None:
        """Give the student its guidance embedding (if asked) and make θ⁻ = θ."""
        if self.guidance_embedding:
            add_guidance_embedding(
                models.student, "ConsistencyDistillation(guidance_embedding=True)"
            )
        net = models.student.net
        named = trainable_parameters(net)
        self._student, self._names = [net], list(named)
        self._shadow = ShadowWeights.copy_of(self._names, list(named.values()))
        if self._pending is not None:
            self._load_target(self._pending)

    def attach_fsdp_root(self, root: FSDP | None) -> None:
        """Lay θ⁻ out like the student under ``root``, the FSDP root wrapping it (None: not
        sharded): this rank's shards for parameters of FSDP units inside the student, full
        tensors for those of the root unit. Every rank calls (a collective), outside forward."""
        if root is None or (self._root and self._root[0] is root):
            return
        net = self._student_net()
        units = nested_units(net)
        bad = [u.sharding_strategy.name for u in units if not reshards_after_forward(u)]
        if bad:
            raise ValueError(
                f"ConsistencyDistillation under FSDP: sharding_strategy {bad[0]} keeps a "
                "unit's gathered weights from one forward to the next, so θ⁻ could not be "
                "swapped in; use FULL_SHARD or HYBRID_SHARD in trainer.strategy.init_args."
            )
        params = named_tensors(net, self._names)
        full = [not held for held in in_nested_unit(net, params)]
        saved = self._pending if self._pending is not None else self._full_state(None)
        self._shadow = ShadowWeights.from_full(saved, self._names, params, full, root)
        self._root, self._pending = [root], None

    def _student_net(self) -> nn.Module:
        if not self._student or self._shadow is None:
            raise RuntimeError("ConsistencyDistillation: call setup(models) first")
        return self._student[0]

    @property
    def target_network(self) -> nn.Module:
        """θ⁻ as a network of its own: a frozen copy of the student with the shadow weights in
        (unsharded runs; a sharded θ⁻ is read from a checkpoint, which holds it gathered)."""
        net = copy.deepcopy(self._student_net()).requires_grad_(False).eval()
        if self._root:
            raise RuntimeError("ConsistencyDistillation.target_network: θ⁻ is sharded (FSDP)")
        with torch.no_grad():
            self._sync_device()
            for param, value in zip(named_tensors(net, self._names), self._values(), strict=True):
                param.copy_(value)
        return net

    @property
    def target_parameter_names(self) -> list[str]:
        """The student's parameters θ⁻ shadows: its trainable ones (a LoRA student's adapters)."""
        return list(self._names)

    def _values(self) -> list[Tensor]:
        assert self._shadow is not None
        return self._shadow.values

    def _sync_device(self) -> None:
        """Unsharded: θ⁻ on the student's device and dtype (the module moves after setup)."""
        if self._root or self._shadow is None:
            return
        params = named_tensors(self._student_net(), self._names)
        values = self._shadow.values
        for i, (param, value) in enumerate(zip(params, values, strict=True)):
            if (value.device, value.dtype) != (param.device, param.dtype):
                values[i] = value.to(param.device, param.dtype)

    @contextmanager
    def target_weights(self, net: nn.Module) -> Iterator[None]:
        """Inside the context the student network ``net`` is θ⁻ (shadows swapped in, eval mode);
        under FSDP this runs in the training step's root forward (its root unit gathered)."""
        self._sync_device()
        assert self._shadow is not None
        modes = [(m, m.training) for m in net.modules()]
        net.eval()
        try:
            with self._shadow.swapped_into(net):
                yield
        finally:
            for module, mode in modes:
                module.training = mode

    @torch.no_grad()
    def after_student_step(self, models: Models) -> None:
        """θ⁻ ← decay θ⁻ + (1 - decay) θ (LCM Alg. 1, last line)."""
        net, shadow = self._student_net(), self._shadow
        assert shadow is not None
        self._sync_device()
        if not self._root or all(not f for f in shadow.full):
            shadow.lerp_(named_tensors(net, self._names), 1.0 - self.target_decay)
            return
        # the root unit's parameters gathered (the nested units' stay this rank's shards)
        with FSDP.summon_full_params(self._root[0], recurse=False, writeback=False):
            shadow.lerp_(named_tensors(net, self._names), 1.0 - self.target_decay)

    def get_extra_state(self) -> dict[str, Any]:
        """θ⁻'s weights as full tensors by name, so that resume is exact on any number of
        devices (under FSDP gathered: every rank calls, rank 0 keeps them)."""
        if self._pending is not None or self._shadow is None:
            return {"target": self._pending or {}}
        return {"target": self._full_state(self._root[0] if self._root else None)}

    def _full_state(self, root: FSDP | None) -> dict[str, Tensor]:
        assert self._shadow is not None
        params = named_tensors(self._student_net(), self._names)
        return self._shadow.full_state(root, params)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore θ⁻; before setup, or for a sharded student before the FSDP root is attached,
        kept until then. Also reads the old format, the whole target network's state dict."""
        target = state["target"]
        if not target:
            return
        if self._shadow is None or (not self._root and nested_units(self._student[0])):
            self._pending = target
        elif self._root:  # FSDP: Lightning restores after on_fit_start, on every rank
            params = named_tensors(self._student_net(), self._names)
            full = self._shadow.full
            self._shadow = ShadowWeights.from_full(target, self._names, params, full, self._root[0])
        else:
            self._load_target(target)

    def _load_target(self, weights: dict[str, Tensor]) -> None:
        """Copy saved full weights into θ⁻ (the student unsharded, or its root unit only)."""
        if weights:
            params = named_tensors(self._student_net(), self._names)
            full = [True] * len(params)
            self._shadow = ShadowWeights.from_full(weights, self._names, params, full, None)
        self._pending = None

    # --- the consistency function ----------------------------------------------------------

    def resolved_boundary(self, process: NoiseProcess) -> Literal["lcm", "x0"]:
        """'auto': the exact x0 form for flows, LCM's c_skip/c_out otherwise."""
        if self.boundary != "auto":
            return self.boundary
        return "x0" if isinstance(process, RectifiedFlow) else "lcm"

    def default_sample_scale(self) -> float:
        """The CFG scale a w-conditioned student is sampled at (the range's midpoint)."""
        if self.sample_guidance_scale is not None:
            return self.sample_guidance_scale
        scale = self.guidance_scale
        return float(scale) if isinstance(scale, int | float) else 0.5 * (scale[0] + scale[1])

    def consistency_function(self, denoiser: Denoiser) -> ConsistencyDenoiser:
        """``denoiser``'s network as a boundary-conditioned consistency function."""
        return ConsistencyDenoiser(
            denoiser.net,
            denoiser.process,
            denoiser.prediction,
            denoiser.learned_sigma,
            boundary=self.resolved_boundary(denoiser.process),
            sigma_data=self.sigma_data,
            timestep_scaling=self.timestep_scaling,
            guidance=self.default_sample_scale()
            if self.guidance_embedding
            else getattr(denoiser, "scale", None),  # a guidance-embedded net's own scale
        )

    def student_denoiser(self, student: Denoiser) -> Denoiser:
        """The student as f_θ (boundary conditions, sampling guidance scale)."""
        return self.consistency_function(student)

    # --- one training step -----------------------------------------------------------------

    def sample_scales(self, batch: int, device: torch.device, generator: torch.Generator) -> Tensor:
        """Per-sample CFG scales [B]: fixed, or U[min, max] (LCM §4.2 samples w per sample)."""
        scale = self.guidance_scale
        if isinstance(scale, int | float):
            return torch.full((batch,), float(scale), device=device)
        lo, hi = scale
        u = torch.rand(batch, generator=generator, device=device)
        return lo + (hi - lo) * u

    def sample_times(
        self, batch: int, process: NoiseProcess, device: torch.device, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """(t, s) [B] each: neighbours t_n > t_{n+1} of the skipping-step grid, n uniform."""
        grid = skipping_schedule(process, self.num_solver_steps).to(device)
        n = torch.randint(0, self.num_solver_steps, (batch,), generator=generator, device=device)
        return grid[n], grid[n + 1]

    def solver_step(
        self, teacher: Denoised, x: Tensor, t: Tensor, s: Tensor, process: NoiseProcess
    ) -> Tensor:
        """Ψ(x_t, t → s): DDIM for DDPM teachers, Euler for flow teachers (`solver`)."""
        solver = self.solver
        if solver == "auto":
            solver = "euler" if isinstance(process, RectifiedFlow) else "ddim"
        if solver == "euler":
            return euler_step(teacher, x, t, s, process)
        return ddim_deterministic_step(teacher, s, process)

    def generator_loss(
        self, batch: DistillBatch, models: Models
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """LCM Alg. 1: d(f_θ(x_t, t), f_θ⁻(Ψ(x_t, t → s), s)) with the guided teacher."""
        x0, g = batch.latents, batch.generator
        b, device, process = x0.shape[0], x0.device, models.process
        t, s = self.sample_times(b, process, device, g)
        scale = self.sample_scales(b, device, g)
        eps = torch.randn(x0.shape, generator=g, device=device, dtype=torch.float32)
        x_t = process.add_noise(x0.float(), eps, t).to(x0.dtype)
        cond = batch.cond
        extra = {"guidance": scale} if self.guidance_embedding else {}
        with torch.no_grad():  # θ⁻ first: its weights swap into the student's in place
            guided = ClassifierFreeGuidance(models.teacher, scale, cond, batch.uncond)(x_t, t)
            x_s = self.solver_step(guided, x_t, t, s, process).to(x0.dtype)
            target = self.consistency_function(models.student)
            with self.target_weights(models.student.net):
                target_x0 = target(x_s, s, **cond, **extra).x0
        pred = self.consistency_function(models.student)(x_t, t, **cond, **extra).x0
        loss = consistency_loss(pred, target_x0, self.loss, self.huber_c)
        logs = {"consistency_loss": loss.detach(), "guidance_scale": scale.mean()}
        return loss, logs


def _check(
    num_solver_steps: int,
    guidance_scale: GuidanceScale,
    target_decay: float,
    loss: str,
    boundary: str,
    solver: str,
) -> None:
    """Reject bad ConsistencyDistillation arguments, naming the field."""
    scales = [guidance_scale] if isinstance(guidance_scale, int | float) else list(guidance_scale)
    problems = {
        "num_solver_steps must be >= 1": num_solver_steps < 1,
        "guidance_scale must be a float or a [min, max] pair with min <= max": len(scales)
        not in (1, 2)
        or (len(scales) == 2 and scales[0] > scales[1]),
        "target_decay must be in [0, 1]": not 0.0 <= target_decay <= 1.0,
        "loss must be 'huber' or 'l2'": loss not in ("huber", "l2"),
        "boundary must be 'auto', 'lcm' or 'x0'": boundary not in ("auto", "lcm", "x0"),
        "solver must be 'auto', 'ddim' or 'euler'": solver not in ("auto", "ddim", "euler"),
    }
    for message, bad in problems.items():
        if bad:
            raise ValueError(f"ConsistencyDistillation: {message}")
