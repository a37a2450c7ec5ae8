"""Guided sampling shared by the teacher, the CFG evaluation callback and the student."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance
from fewstep.diffusion.samplers import Sampler

NullText = tuple[Tensor, Tensor]


def _tensor(value: Any) -> Tensor:
    """A tensor from a tensor or an array-like."""
    return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))


def as_null_text(value: Any) -> NullText:
    """The empty-caption embedding as (text [1, L0, D] float32, mask [1, L0] bool) from a
    (text, mask) pair or an array/tensor [L0, D] or [1, L0, D] of valid tokens."""
    if isinstance(value, tuple | list):
        text, mask = (_tensor(v) for v in value)
    else:
        text = _tensor(value)
        mask = torch.ones(text.shape[:-1], dtype=torch.bool)
    if text.ndim == 2:
        text, mask = text[None], mask.reshape(1, -1)  # [L0, D] -> [1, L0, D]
    return text.float(), mask.bool()


def datamodule_null_text(datamodule: Any) -> NullText | None:
    """The datamodule's ``null_text()`` (the CFG unconditional input), or None if it has none."""
    getter = getattr(datamodule, "null_text", None)
    return None if getter is None else as_null_text(getter())


def generate(
    denoiser: Denoiser,
    sampler: Sampler,
    text: Tensor,
    text_mask: Tensor,
    noise: Tensor,
    guidance_scale: float = 1.0,
    null_text: NullText | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latents [B, C, h, w] sampled from ``noise`` with classifier-free guidance (Ho & Salimans
    2022); scale 1 is the plain conditional sampler. ``noise`` has the network's *input*
    channels: with learned sigma the extra output channels are dropped."""
    in_channels = getattr(denoiser.net, "in_channels", noise.shape[1])
    if noise.shape[1] != in_channels:
        raise ValueError(
            f"generate: noise has {noise.shape[1]} channels but the network takes {in_channels} "
            "(with learn_sigma the network outputs twice that; sample with the input count)."
        )
    cond = {"text": text, "text_mask": text_mask.bool()}
    if guidance_scale == 1.0:
        return sampler(denoiser.bind(**cond), noise, generator)
    if null_text is None:
        raise ValueError(
            f"generate: guidance_scale={guidance_scale} needs the null (empty-caption) text "
            "embedding; give the datamodule a null_text() or use guidance_scale 1.0."
        )
    null, null_mask = null_text
    uncond = {"text": null.to(text.device, text.dtype), "text_mask": null_mask.to(text.device)}
    guided = ClassifierFreeGuidance(denoiser, guidance_scale, cond, uncond)
    return sampler(guided, noise, generator)


def call_wrapped(
    trainer: pl.Trainer, pl_module: pl.LightningModule, method: str, *args: Any
) -> Any:
    """Call ``pl_module.<method>(*args)`` as Lightning calls validation_step: in the precision
    context and, under DDP/FSDP, through the wrapper's forward (FSDP gathers its shards there)."""
    strategy = trainer.strategy
    with strategy.precision_plugin.val_step_context():
        if strategy.model is not None and strategy.model is not pl_module:
            return strategy._forward_redirection(strategy.model, pl_module, method, *args)
        return getattr(pl_module, method)(*args)


def frozen_vae(store: dict[str, Any], path: str | None, owner: str, device: Any) -> Any:
    """The VAE folder at ``path`` loaded once into ``store`` (an unregistered dict: never saved,
    optimised or EMA-averaged), frozen, on ``device``; None without a path."""
    from fewstep.models.vae import VAE

    if path is None:
        return None
    if "vae" not in store:
        try:
            vae = VAE.from_pretrained(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{owner} vae_path: {err}") from None
        store["vae"] = vae.requires_grad_(False).eval()
    return store["vae"].to(device)
