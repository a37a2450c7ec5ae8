"""Diffusion math as small pure functions: processes, parameterisations, losses, samplers, CFG."""

from fewstep.diffusion.denoiser import Conditioned, Denoised, Denoiser, SamplerDenoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance, batch_conditions
from fewstep.diffusion.losses import diffusion_loss, min_snr_weights
from fewstep.diffusion.parameterization import PredictionType, from_x0_eps, to_x0_eps
from fewstep.diffusion.samplers import (
    DDIM,
    DDPM,
    Consistency,
    DPMSolver2M,
    Euler,
    Heun,
    Sampler,
    consistency_sample,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    euler_sample,
    heun_sample,
)
from fewstep.diffusion.schedules import DiscreteDDPM, NoiseProcess, RectifiedFlow, shift_time
from fewstep.diffusion.timesteps import LogitNormal, TimestepSampler, Uniform, UniformDiscrete

__all__ = [
    "DDIM",
    "DDPM",
    "ClassifierFreeGuidance",
    "Conditioned",
    "Consistency",
    "DPMSolver2M",
    "Denoised",
    "Denoiser",
    "DiscreteDDPM",
    "Euler",
    "Heun",
    "LogitNormal",
    "NoiseProcess",
    "PredictionType",
    "RectifiedFlow",
    "Sampler",
    "SamplerDenoiser",
    "TimestepSampler",
    "Uniform",
    "UniformDiscrete",
    "batch_conditions",
    "consistency_sample",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_loss",
    "dpmpp_2m_sample",
    "euler_sample",
    "from_x0_eps",
    "heun_sample",
    "min_snr_weights",
    "shift_time",
    "to_x0_eps",
]
