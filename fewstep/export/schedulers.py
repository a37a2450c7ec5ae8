"""Diffusers schedulers equivalent to our (process, prediction, sampler), and the pipeline call
arguments that reproduce our sampler's step grid."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.diffusion.parameterization import PredictionType
from fewstep.diffusion.samplers import DDIM, DDPM, DPMSolver2M, Euler, Heun, Sampler
from fewstep.diffusion.schedules import DiscreteDDPM, NoiseProcess, RectifiedFlow
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
