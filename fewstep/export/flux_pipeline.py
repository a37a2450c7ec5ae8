"""Diffusers ``FluxPipeline`` folders out: a Flux network (teacher or Euler-sampled student) as
its transformer, the VAE with its latent scaling and shift factors, a
``FlowMatchEulerDiscreteScheduler`` walking our Euler grid, optionally FLUX.1's two text
encoders, plus ``fewstep_export.json`` with the pipeline call that reproduces our sampling and a
model card; written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.diffusion.parameterization import PredictionType
from fewstep.diffusion.samplers import Euler, Sampler
from fewstep.diffusion.schedules import NoiseProcess, RectifiedFlow
from fewstep.export.pixart_pipeline import check_out_dir, save_pipeline
from fewstep.export.schedulers import process_record
from fewstep.models.flux import Flux
from fewstep.models.flux_convert import to_diffusers
from fewstep.models.vae import VAE

EXPORT_FORMAT = "fewstep-flux-export/1"
PROMPT_CALL = "prompt=[...]  # or prompt_embeds=..., pooled_prompt_embeds=..."
# FluxPipeline.from_pretrained requires its text components; an export without them loads with:
NO_TEXT_LOAD = ", text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None"
TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def flux_scheduler(process: RectifiedFlow) -> Any:
    """Euler on the flow ODE with ``process``'s shift and no resolution-dependent (dynamic)
    shift, so FluxPipeline's default grid linspace(1, 1/N, N) is our trailing grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=process.num_train_timesteps,
        shift=process.shift,
        use_dynamic_shifting=False,
    )


def _check(process: NoiseProcess, prediction: PredictionType, sampler: Sampler) -> None:
    """FluxPipeline runs Euler on a rectified flow predicting the velocity, nothing else."""
    if not isinstance(process, RectifiedFlow) or prediction != "velocity":
        raise ValueError(
            f"Cannot export a Flux network on {type(process).__name__} predicting {prediction!r}: "
            "FluxPipeline samples a RectifiedFlow velocity (process: RectifiedFlow, prediction: "
            "velocity)."
        )
    if type(sampler) is not Euler:
        raise ValueError(
            f"Cannot export {sampler!r} to FluxPipeline: its FlowMatchEulerDiscreteScheduler "
            "reproduces the Euler sampler only; use fewstep.diffusion.samplers.Euler."
        )


def unshifted_sigmas(times: torch.Tensor, shift: float) -> list[float]:
    """The sigmas FluxPipeline must be given so that the scheduler's shift s' = k s / (1 + (k-1) s)
    (SD3 eq. 23) lands on ``times``: s = s' / (k - (k - 1) s')."""
    return (times / (shift - (shift - 1.0) * times)).tolist()


def pipeline_call(
    process: RectifiedFlow,
    sampler: Sampler,
    latent_size: tuple[int, int],
    vae_scale_factor: int,
    guidance_scale: float,
    guidance_embedded: bool,
) -> dict[str, Any]:
    """FluxPipeline keyword arguments that reproduce ``sampler`` at ``guidance_scale``: the
    guidance input of a guidance-embedded transformer (one pass), else true CFG against the
    empty caption (two passes; without text encoders pass its negative_prompt_embeds and
    negative_pooled_prompt_embeds instead of negative_prompt)."""
    h, w = latent_size
    times = sampler.timesteps(process)  # [N + 1] descending, ending at 0
    n = len(times) - 1
    call: dict[str, Any] = {
        "num_inference_steps": n,
        "height": h * vae_scale_factor,
        "width": w * vae_scale_factor,
    }
    if not torch.allclose(times, process.timesteps(n, "trailing"), rtol=0, atol=1e-7):
        call["sigmas"] = unshifted_sigmas(times[:-1], process.shift)
    if guidance_embedded:
        call["guidance_scale"] = float(guidance_scale)
    elif guidance_scale != 1.0:
        call.update(true_cfg_scale=float(guidance_scale), negative_prompt="")
    return call


def flux_autoencoder(vae: VAE | str | Path) -> Any:
    """The AutoencoderKL of a VAE (or VAE folder) with its scaling and shift factors in the
    config: FluxPipeline decodes latents / scaling_factor + shift_factor."""
    vae = vae if isinstance(vae, VAE) else VAE.from_pretrained(vae)
    vae.autoencoder.register_to_config(
        scaling_factor=_shortest(vae.scaling_factor), shift_factor=_shortest(vae.shift_factor)
    )
    return vae.autoencoder.to("cpu", torch.float32)


def _shortest(value: Any) -> float:
    """A float32 factor as the shortest decimal that rounds to it (0.3611, not 0.36109998...)."""
    return float(str(np.float32(float(value))))


def _text_parts(path: str | None) -> dict[str, Any]:
    """FLUX.1's CLIP + T5 encoders and tokenizers from a local pipeline folder, or Nones."""
    if path is None:
        return dict.fromkeys(TEXT_PARTS)
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = Path(path).expanduser()
    missing = [name for name in TEXT_PARTS if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"text_encoder_path '{root}' is not a FLUX.1 pipeline folder: no {', '.join(missing)}/."
        )
    load = {"local_files_only": True}
    return {
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", **load),
        "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer", **load),
        "text_encoder_2": T5EncoderModel.from_pretrained(root / "text_encoder_2", **load),
        "tokenizer_2": AutoTokenizer.from_pretrained(root / "tokenizer_2", **load),
    }


def export_flux_pipeline(
    net: Flux,
    vae: VAE | str | Path,
    out_dir: str | Path,
    process: NoiseProcess,
    prediction: PredictionType,
    sampler: Sampler,
    latent_size: tuple[int, int],
    guidance_scale: float = 1.0,
    steps: list[int] | None = None,
    text_encoder_path: str | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a diffusers ``FluxPipeline`` folder for ``net`` sampled by ``sampler`` (Euler) at
    ``guidance_scale`` on latents of ``latent_size`` (h, w), recording the pipeline call per step
    count in ``steps`` (default: the sampler's) in fewstep_export.json, with a model card."""
    from diffusers import FluxPipeline

    out = check_out_dir(out_dir, overwrite)
    _check(process, prediction, sampler)
    autoencoder = flux_autoencoder(vae)
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    embedded = bool(net.config()["guidance_embed"])
    calls = {
        n: pipeline_call(
            process, sampler.with_steps(n), latent_size, factor, guidance_scale, embedded
        )
        for n in (steps or [sampler.steps])
    }
    record = {
        "format": EXPORT_FORMAT,
        "pipeline_class": "diffusers.FluxPipeline",
        "family": "flux",
        "prompt_call": PROMPT_CALL,
        "load_kwargs": "" if text_encoder_path else NO_TEXT_LOAD,
        "process": process_record(process),
        "prediction": prediction,
        "sampler": repr(sampler),
        "vae": {
            "scaling_factor": autoencoder.config.scaling_factor,
            "shift_factor": autoencoder.config.shift_factor,
        },
        "pipeline_call": calls.get(sampler.steps, next(iter(calls.values()))),
        "pipeline_calls": {str(n): call for n, call in calls.items()},
        **(metadata or {}),
    }
    pipe = FluxPipeline(
        scheduler=flux_scheduler(process),
        vae=autoencoder,
        transformer=to_diffusers(net).to("cpu", torch.float32).eval(),
        **_text_parts(text_encoder_path),
    )
    return save_pipeline(pipe, record, out, overwrite)
