"""The base of the teacher and student LightningModules: what a latent diffusion module needs
around its networks — the frozen VAE and ``decode``, the datamodule's null text for CFG, the
per-step random generator (resume-exact) and the network the EMA callback averages."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from fewstep.lightning.fsdp_params import fsdp_root
from fewstep.lightning.sampling import NullText, datamodule_null_text, frozen_vae
from fewstep.models.vae import VAE
from fewstep.utils.seeding import mix_seed


class LatentDiffusionModule(pl.LightningModule):
    """Subclasses set ``vae_path`` and ``seed`` and define ``ema_target``; the VAE is loaded
    once, kept unregistered (never saved, optimised or EMA-averaged) and frozen."""

    vae_path: str | None = None
    seed: int = 0

    def __init__(self) -> None:
        super().__init__()
        self._frozen: dict[str, VAE] = {}  # unregistered: never saved, optimised or EMA'd
        self._null_text: NullText | None = None

    @property
    def ema_target(self) -> nn.Module:
        """The network the EMA callback averages."""
        raise NotImplementedError

    @property
    def vae(self) -> VAE | None:
        """The frozen VAE from ``vae_path`` (loaded once, on this module's device), or None."""
        return frozen_vae(self._frozen, self.vae_path, type(self).__name__, self.device)

    def setup(self, stage: str) -> None:
        """Load the VAE early so a bad ``vae_path`` fails before training starts."""
        _ = self.vae

    def decode(self, latents: Tensor) -> Tensor | None:
        """Normalised latents -> images [B, 3, H, W] in [-1, 1], or None without a VAE."""
        vae = self.vae
        if vae is None:
            return None
        dtype = next(vae.parameters()).dtype
        return vae.decode(latents.to(dtype)).float().clamp(-1, 1)

    def null_text(self) -> NullText | None:
        """The empty-caption embedding for CFG, from the datamodule (cached)."""
        if self._null_text is None and self._trainer is not None:
            self._null_text = datamodule_null_text(self.trainer.datamodule)
        return self._null_text

    def step_generator(self, batch_idx: int, device: Any) -> torch.Generator:
        """RNG of this step from (seed, global_step, rank, micro-batch): resume-exact."""
        micro = batch_idx % max(self.trainer.accumulate_grad_batches, 1)
        seed = mix_seed(self.seed, self.global_step, self.global_rank, micro)
        return torch.Generator(device=device).manual_seed(seed)

    def clip_all_gradients(
        self, optimizer: torch.optim.Optimizer, value: float, algorithm: str | None
    ) -> None:
        """Clip like ``clip_gradients``; under FSDP by the root's ``clip_grad_norm_`` (the norm
        over every rank's shards; Lightning's FSDP precision plugin refuses norm clipping)."""
        root = fsdp_root(self.trainer.strategy.model) if self._trainer is not None else None
        if root is not None and (algorithm or "norm") == "norm":
            root.clip_grad_norm_(value)
        else:
            self.clip_gradients(optimizer, value, algorithm)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Trainer.gradient_clip_val clipping, FSDP included (``clip_all_gradients``)."""
        if gradient_clip_val:
            self.clip_all_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
