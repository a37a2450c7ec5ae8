"""Diffusers schedulers equivalent to our (process, prediction, sampler), and the pipeline call
arguments that reproduce our sampler's step grid."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fewstep.diffusion.consistency import ConsistencyDenoiser, lcm_boundary
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.flow_frame import FlowTime
from fewstep.diffusion.parameterization import PredictionType
from fewstep.diffusion.samplers import DDIM, DDPM, Consistency, DPMSolver2M, Euler, Heun, Sampler
from fewstep.diffusion.schedules import DiscreteDDPM, NoiseProcess, RectifiedFlow
from fewstep.diffusion.trigflow import TrigFlowDenoiser
from fewstep.models.pixart_io import BINNED_SAMPLE_SIZES


def _beta_config(process: DiscreteDDPM) -> dict[str, Any]:
    """Diffusers beta arguments reproducing ``process``: linear / scaled_linear, else the list."""
    abar = process.alphas_cumprod.numpy()
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])  # beta_t = 1 - abar_t / abar_{t-1}
    start, end = float(f"{betas[0]:.12g}"), float(f"{betas[-1]:.12g}")
    n = len(betas)
    candidates = {
        "linear": np.linspace(start, end, n),
        "scaled_linear": np.linspace(start**0.5, end**0.5, n) ** 2,
    }
    for name, ref in candidates.items():
        if np.allclose(betas, ref, rtol=1e-9, atol=1e-12):
            return {"beta_schedule": name, "beta_start": start, "beta_end": end}
    return {"trained_betas": betas.tolist()}


_DDPM_PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def _ddpm_scheduler(process: DiscreteDDPM, prediction: str, sampler: Sampler) -> Any:
    """DDIM / DDPM / DPM-Solver++(2M) scheduler for a discrete DDPM process."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if prediction not in _DDPM_PREDICTIONS:
        raise ValueError(
            f"Cannot export a DiscreteDDPM model predicting {prediction!r}: diffusers schedulers "
            f"take {sorted(_DDPM_PREDICTIONS)} on a DDPM process."
        )
    common = dict(
        num_train_timesteps=process.num_train_timesteps,
        prediction_type=_DDPM_PREDICTIONS[prediction],
        timestep_spacing=sampler.spacing,
        **_beta_config(process),
    )
    if isinstance(sampler, DDIM):
        if sampler.eta != 0.0:
            warnings.warn(
                f"Export: the sampler is DDIM(eta={sampler.eta}); call the pipeline with "
                f"eta={sampler.eta} (its default is 0).",
                stacklevel=3,
            )
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0, **common)
    if isinstance(sampler, DDPM):
        return DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=getattr(sampler, "lower_order_final", True),
        final_sigmas_type="zero",  # end at the data (abar = 1), as our samplers do
        **common,
    )


def _flow_scheduler(process: RectifiedFlow, prediction: str) -> Any:
    """Euler on the flow ODE. FlowMatchEulerDiscreteScheduler cannot run in PixArtSigmaPipeline
    (no ``init_noise_sigma`` / ``scale_model_input``); FlowMapEulerDiscreteScheduler with r = the
    next grid time is the same Euler step, takes float timesteps and walks shift(linspace(1, 0))."""
    try:
        from diffusers import FlowMapEulerDiscreteScheduler
    except ImportError:
        import diffusers

        raise ImportError(
            "Exporting a rectified-flow model needs a diffusers with FlowMapEulerDiscreteScheduler "
            f"(installed: {diffusers.__version__}); upgrade diffusers."
        ) from None
    if prediction != "velocity":
        raise ValueError(
            f"Cannot export a RectifiedFlow model predicting {prediction!r}: diffusers' flow "
            "schedulers take the velocity (prediction: velocity)."
        )
    scheduler = FlowMapEulerDiscreteScheduler(
        num_train_timesteps=process.num_train_timesteps, shift=process.shift
    )
    # PixArtSigmaPipeline multiplies the initial latents by scheduler.init_noise_sigma; diffusers
    # reads config entries as attributes, so a config entry of 1 (flow noise has unit scale) lets
    # the pipeline run this scheduler.
    scheduler.register_to_config(init_noise_sigma=1.0)
    return scheduler


def diffusers_scheduler(
    process: NoiseProcess, prediction: PredictionType, sampler: Sampler | None = None
) -> Any:
    """A diffusers scheduler that PixArtSigmaPipeline can run and that reproduces ``sampler``
    on (``process``, ``prediction``): DDIM / DDPM / DPM-Solver++(2M) on DiscreteDDPM (default
    DPM-Solver++(2M)), Euler on RectifiedFlow. Other combinations warn and fall back."""
    if isinstance(process, DiscreteDDPM):
        sampler = sampler if sampler is not None else DPMSolver2M()
        if not isinstance(sampler, DDIM | DDPM | DPMSolver2M):
            warnings.warn(
                f"Export: no diffusers scheduler for {sampler!r} on DiscreteDDPM; writing "
                "DPM-Solver++(2M) instead.",
                stacklevel=2,
            )
            sampler = DPMSolver2M(sampler.steps, sampler.spacing)
        return _ddpm_scheduler(process, prediction, sampler)
    if isinstance(process, RectifiedFlow):
        deterministic_ddim = isinstance(sampler, DDIM) and sampler.eta == 0.0  # = Euler on a flow
        if sampler is not None and not isinstance(sampler, Euler) and not deterministic_ddim:
            hint = " (Heun's diffusers scheduler cannot run in PixArtSigmaPipeline)"
            warnings.warn(
                f"Export: no PixArtSigmaPipeline-compatible diffusers scheduler for {sampler!r} "
                f"on RectifiedFlow{hint if isinstance(sampler, Heun) else ''}; writing Euler.",
                stacklevel=2,
            )
        return _flow_scheduler(process, prediction)
    raise ValueError(
        f"Cannot export a model on {type(process).__name__}: only DiscreteDDPM and RectifiedFlow "
        "have diffusers schedulers."
    )


def default_sampler(process: NoiseProcess) -> Sampler:
    """The sampler an export reproduces when none is given: DPM-Solver++(2M) or flow Euler."""
    return Euler() if isinstance(process, RectifiedFlow) else DPMSolver2M()


def process_record(process: NoiseProcess) -> dict[str, Any]:
    """A JSON description of a noise process for the export record."""
    record: dict[str, Any] = {"class": type(process).__name__}
    record["num_train_timesteps"] = getattr(process, "num_train_timesteps", None)
    if isinstance(process, DiscreteDDPM):
        record.update(_beta_config(process))
    if isinstance(process, RectifiedFlow):
        record["shift"] = process.shift
    return record


def _unshift(t: Tensor, shift: float) -> Tensor:
    """Inverse of the resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23)."""
    return t / (shift - (shift - 1.0) * t)


def pipeline_call_kwargs(
    scheduler: Any, process: NoiseProcess, sampler: Sampler | None, sample_size: int
) -> dict[str, Any]:
    """PixArtSigmaPipeline call arguments that walk ``sampler``'s grid with ``scheduler``; warns
    when the scheduler cannot reproduce it."""
    kwargs: dict[str, Any] = {}
    if sample_size not in BINNED_SAMPLE_SIZES:
        kwargs["use_resolution_binning"] = False  # the pipeline raises for other sample sizes
    if sampler is None:
        return kwargs
    kwargs["num_inference_steps"] = sampler.steps
    ours = sampler.timesteps(process)  # [N + 1] process times, float64
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(sampler.steps)
    if isinstance(process, RectifiedFlow):
        if not torch.allclose(probe.sigmas.double().cpu(), ours, atol=1e-6):
            kwargs["sigmas"] = _unshift(ours[:-1], process.shift).tolist()  # the scheduler shifts
        return kwargs
    same = torch.equal(probe.timesteps.cpu().long(), ours[:-1].round().long())
    if same and type(probe).__name__ == "DDIMScheduler":  # its step goes to t - T // N
        stride = process.num_train_timesteps // sampler.steps
        prev = [t - stride if t - stride >= 0 else process.t_clean for t in ours[:-1].tolist()]
        same = prev == ours[1:].tolist()
    if not same:
        warnings.warn(
            f"Export: {type(scheduler).__name__} walks {probe.timesteps.tolist()} at "
            f"{sampler.steps} steps, not the sampler's {ours[:-1].tolist()}; pipeline samples "
            "will differ slightly from fewstep's (use spacing='trailing' with steps dividing "
            f"{process.num_train_timesteps} for an exact match).",
            stacklevel=2,
        )
    return kwargs


# --- students: the few-step sampler of a distilled network -------------------------------------

DIFFUSERS_SIGMA_DATA = 0.5  # fixed inside LCMScheduler.get_scalings_for_boundary_condition_discrete
X0_TIMESTEP_SCALING = 1.0e6  # LCM scalings (c_skip, c_out) = (0, 1) within 1e-12 for t >= 1
BOUNDARY_TOLERANCE = 1e-6  # |Δc_skip| + |Δc_out| between ours and diffusers' above which we warn
NO_CFG = "the student runs without CFG (distilled in): guidance_scale 1, PixArtSigmaPipeline "
NO_CFG += "applies CFG only when guidance_scale > 1"
EMBEDDED_CFG = (
    "guidance-embedded student: GuidedPixArtSigmaPipeline (fewstep.export.guided_pixart) "
)
EMBEDDED_CFG += "feeds guidance_scale to the scale embedding, one network pass per step"


@dataclass(frozen=True)
class Boundary:
    """Consistency boundary scalings f = c_skip x + c_out x̂0 (fewstep.distill.consistency)."""

    kind: Literal["lcm", "x0"] = "x0"
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    @classmethod
    def of(cls, denoiser: Denoiser) -> Boundary:
        """A ConsistencyDenoiser's boundary; a plain denoiser is f = x̂0 (c_skip 0, c_out 1)."""
        if isinstance(denoiser, ConsistencyDenoiser):
            return cls(denoiser.boundary, denoiser.sigma_data, denoiser.timestep_scaling)
        return cls("x0")

    def scalings(self, t: Tensor, process: NoiseProcess) -> tuple[Tensor, Tensor]:
        """Our (c_skip, c_out) at process times t, float64."""
        t = t.to(torch.float64)
        if self.kind == "x0":
            return torch.zeros_like(t), torch.ones_like(t)
        return lcm_boundary(t, process, self.sigma_data, self.timestep_scaling)

    @property
    def lcm_timestep_scaling(self) -> float:
        """LCMScheduler's ``timestep_scaling`` for these scalings. c_skip = 1 / (r² + 1) and c_out
        = r / sqrt(r² + 1) depend on r = Δ / σ_d only and diffusers fixes σ_d = 0.5, so ours
        (Δ = scaling · (t + 1)) is diffusers' with scaling · 0.5 / σ_d, up to t + 1 vs t."""
        if self.kind == "x0":
            return X0_TIMESTEP_SCALING
        return self.timestep_scaling * DIFFUSERS_SIGMA_DATA / self.sigma_data


@dataclass
class StudentSchedule:
    """A diffusers scheduler reproducing a student's sampler and the pipeline calls that do."""

    scheduler: Any
    calls: dict[int, dict[str, Any]]  # PixArtSigmaPipeline kwargs per step count it reproduces
    notes: dict[str, Any] = field(default_factory=dict)  # for fewstep_export.json


def embedded_scale(denoiser: Denoiser) -> float | None:
    """The CFG scale a guidance-embedded student samples at (Meng et al. 2023; LCM §4.2), or None
    for a student without the embedding."""
    if getattr(denoiser.net, "g_embedder", None) is None:
        return None
    scale = getattr(denoiser, "scale", None)  # GuidanceEmbedded
    scale = getattr(denoiser, "guidance", None) if scale is None else scale  # ConsistencyDenoiser
    return None if scale is None else float(scale)


def check_student_exportable(denoiser: Denoiser) -> None:
    """Refuse students no diffusers PixArt pipeline can run, naming the reason."""
    if getattr(denoiser.net, "g_embedder", None) is not None and embedded_scale(denoiser) is None:
        raise ValueError(
            f"Cannot export {type(denoiser).__name__} over a guidance-embedded network: it names "
            "no CFG scale to sample at (GuidanceEmbedded.scale or ConsistencyDenoiser.guidance)."
        )
    if isinstance(denoiser.process, FlowTime):
        raise ValueError(
            f"Cannot export this student: it samples its {type(denoiser.process.base).__name__} "
            "network in flow time (fewstep.diffusion.flow_frame: the network sees (alpha + sigma) "
            "x_s at fractional teacher times), which no diffusers scheduler does. Distill from a "
            "rectified-flow teacher to export an Euler student."
        )


def lcm_boundary_mismatch(
    scheduler: Any, boundary: Boundary, process: NoiseProcess, times: list[int]
) -> dict[int, float]:
    """|Δc_skip| + |Δc_out| between ours and the scheduler's own scalings, per timestep."""
    t = torch.tensor(times, dtype=torch.float64)
    c_skip, c_out = boundary.scalings(t, process)
    d_skip, d_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    gap = (c_skip - d_skip).abs() + (c_out - d_out).abs()
    return {int(ti): float(g) for ti, g in zip(times, gap.tolist(), strict=True)}


def _lcm_times(process: DiscreteDDPM, sampler: Sampler) -> list[int]:
    """The integer DDPM timesteps ``sampler`` evaluates (it then ends at the data)."""
    ts = sampler.timesteps(process)[:-1]
    if not torch.equal(ts, ts.round()):
        raise ValueError(
            f"Cannot export {sampler!r} on DiscreteDDPM: LCMScheduler walks integer timesteps, "
            f"the sampler {ts.tolist()}; use integer timesteps."
        )
    return [int(t) for t in ts.tolist()]


def _origin_steps(process: DiscreteDDPM, times: list[int]) -> int:
    """LCMScheduler's ``original_inference_steps`` whose grid (k i - 1, k = T / steps) holds every
    time: k = gcd(T, t + 1 ...). Custom timesteps off that grid only log a warning, and with
    num_inference_steps dividing this value LCM's own picks are our trailing grid."""
    k = math.gcd(process.num_train_timesteps, *[t + 1 for t in times])
    return process.num_train_timesteps // k


def _lcm_schedule(
    denoiser: Denoiser, sampler: Sampler, steps: list[int], sample_size: int
) -> StudentSchedule:
    """Consistency sampling on a DDPM process as diffusers' LCMScheduler with our timesteps."""
    from diffusers import LCMScheduler

    process, prediction = denoiser.process, denoiser.prediction
    assert isinstance(process, DiscreteDDPM)
    if prediction not in _DDPM_PREDICTIONS:
        raise ValueError(
            f"Cannot export a consistency student predicting {prediction!r}: LCMScheduler takes "
            f"{sorted(_DDPM_PREDICTIONS)}."
        )
    times = {n: _lcm_times(process, sampler.with_steps(n)) for n in steps}
    every = sorted({t for ts in times.values() for t in ts})
    boundary = Boundary.of(denoiser)
    scheduler = LCMScheduler(
        num_train_timesteps=process.num_train_timesteps,
        prediction_type=_DDPM_PREDICTIONS[prediction],
        original_inference_steps=_origin_steps(process, every),
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_scaling=boundary.lcm_timestep_scaling,
        **_beta_config(process),
    )
    mismatch = lcm_boundary_mismatch(scheduler, boundary, process, every)
    _warn_boundary(mismatch)
    binning = pipeline_call_kwargs(scheduler, process, None, sample_size)
    calls = {
        n: {**binning, **_lcm_walk(scheduler, n, ts), "guidance_scale": 1.0}
        for n, ts in times.items()
    }
    notes = {
        "boundary": {
            "kind": boundary.kind,
            "sigma_data": boundary.sigma_data,
            "timestep_scaling": boundary.timestep_scaling,
            "lcm_timestep_scaling": boundary.lcm_timestep_scaling,
            "mismatch": mismatch,
        },
        "noise": "multistep LCM re-noises between steps from the pipeline's generator: the same "
        "seed as StudentModule.student_latents(generator=) gives the same samples",
    }
    return StudentSchedule(scheduler, calls, notes)


def _default_walk(scheduler: Any, n: int) -> Any:
    """The scheduler after ``set_timesteps(n)`` with no custom grid (what a plain call walks)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(n)
    return probe


def _lcm_walk(scheduler: Any, n: int, times: list[int]) -> dict[str, Any]:
    """``num_inference_steps`` alone when LCMScheduler's own n-step picks are ``times``, else
    the explicit ``timesteps`` too."""
    same = _default_walk(scheduler, n).timesteps.tolist() == times
    return {"num_inference_steps": n} if same else {"timesteps": times}


def _warn_boundary(mismatch: dict[int, float]) -> None:
    """Warn where diffusers' boundary scalings (Δ from t) differ from ours (Δ from t + 1)."""
    bad = {t: g for t, g in mismatch.items() if g > BOUNDARY_TOLERANCE}
    if bad:
        warnings.warn(
            f"Export: LCMScheduler's boundary scalings use Δ ∝ t where fewstep uses t + 1; at "
            f"timesteps {sorted(bad)} |Δc_skip| + |Δc_out| reaches {max(bad.values()):.2g} "
            f"(> {BOUNDARY_TOLERANCE:g}): pipeline samples will differ from fewstep's there.",
            stacklevel=3,
        )


def _sampler_call(
    scheduler: Any, process: NoiseProcess, sampler: Sampler, sample_size: int
) -> dict[str, Any]:
    """Pipeline kwargs for one step count of a teacher-type sampler, without CFG; a flow grid
    is always given explicitly as sigmas (the scheduler shifts them)."""
    call = pipeline_call_kwargs(scheduler, process, sampler, sample_size)
    if isinstance(process, RectifiedFlow):  # the plain call when the default walk is ours
        ours = sampler.timesteps(process)[:-1]
        walked = _default_walk(scheduler, sampler.steps).sigmas[:-1].double().cpu()
        if not torch.allclose(walked, ours, atol=1e-6):
            call["sigmas"] = _unshift(ours, process.shift).tolist()
    return {**call, "guidance_scale": 1.0}


def _flow_consistency_schedule(
    denoiser: Denoiser, sampler: Sampler, sample_size: int
) -> StudentSchedule:
    """Consistency on a rectified flow with f = x - t v: exactly one Euler step to t = 0."""
    process = denoiser.process
    if not isinstance(process, RectifiedFlow) or Boundary.of(denoiser).kind != "x0":
        raise ValueError(
            f"Cannot export consistency sampling on {type(process).__name__} with the "
            f"{Boundary.of(denoiser).kind!r} boundary: diffusers has no such scheduler "
            "(a rectified-flow student with boundary x0 exports its 1-step sampling)."
        )
    warnings.warn(
        "Export: multistep consistency sampling on a rectified flow (fresh noise between steps) "
        "has no diffusers scheduler PixArtSigmaPipeline can run (FlowMatchLCMScheduler lacks "
        "scale_model_input); the folder reproduces the student's 1-step samples only "
        "(fewstep_export.json: pipeline_calls['1']).",
        stacklevel=3,
    )
    scheduler = _flow_scheduler(process, denoiser.prediction)
    one = sampler.with_steps(1)
    return StudentSchedule(scheduler, {1: _sampler_call(scheduler, process, one, sample_size)})


def student_schedule(
    denoiser: Denoiser, sampler: Sampler, steps: list[int], sample_size: int
) -> StudentSchedule:
    """The scheduler and pipeline calls reproducing ``sampler`` over ``denoiser`` (what the
    method's ``student_denoiser`` returns) at each step count in ``steps``: Consistency on
    DiscreteDDPM -> LCMScheduler with our timesteps; Consistency (f = x - t v) on RectifiedFlow ->
    flow Euler at 1 step; other samplers (Euler on a flow, DDIM...) -> the teacher mapping."""
    if isinstance(denoiser, TrigFlowDenoiser):  # sCM: the same consistency sampling in the
        denoiser = denoiser.base  # teacher's own time (tests/test_trigflow.py)
    check_student_exportable(denoiser)
    process = denoiser.process
    steps = sorted({int(n) for n in steps})
    if isinstance(sampler, Consistency):
        if isinstance(process, DiscreteDDPM):
            schedule = _lcm_schedule(denoiser, sampler, steps, sample_size)
        else:
            schedule = _flow_consistency_schedule(denoiser, sampler, sample_size)
    elif isinstance(denoiser, ConsistencyDenoiser):
        raise ValueError(
            f"Cannot export a consistency function sampled by {sampler!r}: diffusers schedulers "
            "would see the raw network, not f = c_skip x + c_out x̂0; sample it with Consistency."
        )
    else:
        scheduler = diffusers_scheduler(process, denoiser.prediction, sampler)
        walk = {n: sampler.with_steps(n) for n in steps}
        calls = {n: _sampler_call(scheduler, process, s, sample_size) for n, s in walk.items()}
        schedule = StudentSchedule(scheduler, calls)
    scale = embedded_scale(denoiser)
    if scale is None:
        schedule.notes.update(guidance=NO_CFG)
    else:  # the pipeline's guidance_scale feeds the embedding (GuidedPixArtSigmaPipeline)
        for call in schedule.calls.values():
            call["guidance_scale"] = scale
        schedule.notes.update(guidance=EMBEDDED_CFG)
    schedule.notes.update(exact_steps=sorted(schedule.calls))
    return schedule
