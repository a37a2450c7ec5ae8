"""Guided sampling shared by the teacher, the CFG evaluation callback and the student."""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance, GuidanceEmbedded
from fewstep.diffusion.samplers import Sampler


class NullText(NamedTuple):
    """The empty-caption CFG input: text [1, L0, D] float32, mask [1, L0] bool and, for networks
    that take a pooled text vector (FLUX.1), its pooled vector ``cond`` [1, Dv] float32."""

    text: Tensor
    mask: Tensor
    cond: Tensor | None = None


def _tensor(value: Any) -> Tensor:
    """A tensor from a tensor or an array-like."""
    return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))


def as_null_text(value: Any) -> NullText:
    """The empty-caption embedding as a NullText from a (text, mask) pair, a (text, mask, pooled)
    triple or an array/tensor [L0, D] or [1, L0, D] of valid tokens."""
    cond = None
    if isinstance(value, tuple | list):
        text, mask = (_tensor(v) for v in value[:2])
        if len(value) > 2 and value[2] is not None:
            cond = _tensor(value[2]).float().reshape(1, -1)  # [Dv] or [1, Dv] -> [1, Dv]
    else:
        text = _tensor(value)
        mask = torch.ones(text.shape[:-1], dtype=torch.bool)
    if text.ndim == 2:
        text, mask = text[None], mask.reshape(1, -1)  # [L0, D] -> [1, L0, D]
    return NullText(text.float(), mask.bool(), cond)


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
    null_text: NullText | tuple | None = None,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
) -> Tensor:
    """Latents [B, C, h, w] sampled from ``noise`` with classifier-free guidance (Ho & Salimans
    2022); scale 1 is the plain conditional sampler, and a guidance-embedded denoiser (FLUX.1-dev)
    takes the scale as its ``guidance`` input, one pass per step. ``cond`` [B, Dv] is the pooled
    text vector of networks that take one (the null text's goes with the unconditional pass).
    ``noise`` has the network's *input* channels: with learned sigma the extra output channels
    are dropped."""
    in_channels = getattr(denoiser.net, "in_channels", noise.shape[1])
    if noise.shape[1] != in_channels:
        raise ValueError(
            f"generate: noise has {noise.shape[1]} channels but the network takes {in_channels} "
            "(with learn_sigma the network outputs twice that; sample with the input count)."
        )
    conds = {"text": text, "text_mask": text_mask.bool()}
    if cond is not None:
        conds["cond"] = cond
    if guidance_scale == 1.0 and not isinstance(denoiser, GuidanceEmbedded):
        return sampler(denoiser.bind(**conds), noise, generator)
    uncond = (
        {} if isinstance(denoiser, GuidanceEmbedded) else _uncond(null_text, conds, guidance_scale)
    )
    guided = ClassifierFreeGuidance(denoiser, guidance_scale, conds, uncond)
    return sampler(guided, noise, generator)


def _uncond(
    null_text: NullText | tuple | None, conds: dict[str, Tensor], scale: float
) -> dict[str, Tensor]:
    """The unconditional inputs of CFG from the null text (and its pooled vector if ``conds``
    has one), on the conditional inputs' device and dtype."""
    if null_text is None:
        raise ValueError(
            f"generate: guidance_scale={scale} needs the null (empty-caption) text embedding; "
            "give the datamodule a null_text() or use guidance_scale 1.0."
        )
    null = as_null_text(null_text)
    text = conds["text"]
    uncond = {"text": null.text.to(text.device, text.dtype), "text_mask": null.mask.to(text.device)}
    if "cond" in conds:
        if null.cond is None:
            raise ValueError(
                "generate: the network takes a pooled text vector (cond) but the null text has "
                "none; build the cache with a text encoder that has pooled() (FluxTextEncoder) or "
                "set the datamodule's pooled_text."
            )
        uncond["cond"] = null.cond.to(text.device, conds["cond"].dtype)
    return uncond


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
