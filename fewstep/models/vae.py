"""The VAE: a wrapper around diffusers' ``AutoencoderKL`` (Kingma & Welling 2014; Rombach et al.
2022) that carries the latent scale and shift used by every later stage."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from fewstep.utils.fingerprint import fingerprint
from fewstep.utils.manifest import verify_shipped


def config_folder(root: Path, subfolder: str) -> Path | None:
    """``root`` or ``root/subfolder``, whichever holds a ``config.json`` first (diffusers
    model folder or pipeline layout), else None."""
    for folder in (root, root / subfolder):
        if (folder / "config.json").is_file():
            return folder
    return None


def resolve_vae_folder(path: str | Path) -> Path:
    """The folder holding the AutoencoderKL ``config.json``: ``path`` itself or ``path/vae``."""
    root = Path(path).expanduser()
    found = config_folder(root, "vae")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"VAE pretrained_path '{root}' is not a diffusers AutoencoderKL folder: neither "
        f"'{root / 'config.json'}' nor '{root / 'vae' / 'config.json'}' exists. Point "
        "pretrained_path at a local folder written by VAE.save_pretrained / "
        "AutoencoderKL.save_pretrained, or at a pipeline folder with a vae/ subfolder."
    )


def gaussian_kl(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, 1)) summed per sample (Kingma & Welling 2014, App. B) -> [B]."""
    var = std.pow(2)
    return 0.5 * (mean.pow(2) + var - 1.0 - torch.log(var)).flatten(1).sum(dim=1)


class VAE(nn.Module):
    """Wraps diffusers AutoencoderKL; carries latent scaling_factor and shift_factor (as buffers,
    saved in state dict)."""

    def __init__(
        self,
        pretrained_path: str | None = None,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
    ) -> None:
        super().__init__()
        if pretrained_path is not None:
            verify_shipped(pretrained_path)  # a shipped VAE must match its sha256 manifest
            self.autoencoder, raw = self._load(pretrained_path)
            scaling_factor = raw.get("scaling_factor") if scaling_factor is None else scaling_factor
            shift_factor = raw.get("shift_factor") if shift_factor is None else shift_factor
        else:
            self.autoencoder = self._build(
                in_channels,
                latent_channels,
                tuple(block_out_channels),
                layers_per_block,
                norm_num_groups,
            )
        known = scaling_factor is not None
        # shape [1], not 0-d, so that fingerprint's byte view works
        self.register_buffer("scaling_factor", torch.tensor([float(scaling_factor or 1.0)]))
        self.register_buffer("shift_factor", torch.tensor([float(shift_factor or 0.0)]))
        self.register_buffer("latent_scale_known", torch.tensor([known]))

    @staticmethod
    def _build(
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
    ) -> AutoencoderKL:
        """A fresh AutoencoderKL; downsampling factor 2 ** (len(block_out_channels) - 1)."""
        if not block_out_channels:
            raise ValueError("VAE block_out_channels must list at least one channel count")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"VAE norm_num_groups={norm_num_groups} must divide every entry of "
                f"block_out_channels={block_out_channels} (not {bad})"
            )
        n = len(block_out_channels)
        return AutoencoderKL(
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
        )

    @staticmethod
    def _load(path: str | Path) -> tuple[AutoencoderKL, dict[str, Any]]:
        """Load a local AutoencoderKL (no downloads) and its raw config.json."""
        folder = resolve_vae_folder(path)
        raw = json.loads((folder / "config.json").read_text())
        try:
            autoencoder = AutoencoderKL.from_pretrained(
                folder, local_files_only=True, low_cpu_mem_usage=False
            )
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"Could not load the AutoencoderKL weights in '{folder}': {err}"
            ) from None
        return autoencoder, raw

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling factor from image to latent."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Number of latent channels."""
        return int(self.autoencoder.config.latent_channels)

    @property
    def has_latent_scale(self) -> bool:
        """Whether scaling/shift were given, loaded or measured (not the 1/0 placeholders)."""
        return bool(self.latent_scale_known)

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B,C,H,W] in [-1,1] -> posterior (mean, std) [B,Z,H/f,W/f] in raw latent space."""
        posterior = self.autoencoder.encode(images).latent_dist
        return posterior.mean, posterior.std

    def normalize(self, z: Tensor) -> Tensor:
        """Raw -> normalised latents: (z - shift) * scale (Rombach et al. 2022, Sec. 4.3.2)."""
        return (z - self.shift_factor.to(z.dtype)) * self.scaling_factor.to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalised -> raw latents: z / scale + shift."""
        return z / self.scaling_factor.to(z.dtype) + self.shift_factor.to(z.dtype)

    def encode(self, images: Tensor, sample: bool = False) -> Tensor:
        """Images in [-1,1] -> normalised latents (posterior mean, or a posterior sample)."""
        mean, std = self.encode_moments(images)
        z = mean + std * torch.randn_like(std) if sample else mean
        return self.normalize(z)

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents -> images in [-1,1] (not clamped)."""
        return self.autoencoder.decode(z).sample

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> images in [-1,1] (not clamped)."""
        return self.decode_raw(self.denormalize(latents))

    def set_latent_scale(self, scale: float, shift: float) -> None:
        """Store a latent scale and shift in the buffers and mark them as known."""
        self.scaling_factor.fill_(scale)
        self.shift_factor.fill_(shift)
        self.latent_scale_known.fill_(True)

    @torch.no_grad()
    def measure_latent_scale(
        self, batches: Iterable[Tensor], max_batches: int = 50, with_shift: bool = True
    ) -> tuple[float, float]:
        """Set shift = mean, scale = 1/std of posterior-mean latents over data (as SD's
        scaling_factor, Rombach et al. 2022, Sec. 4.3.2); returns (scale, shift)."""
        was_training = self.training
        self.eval()
        total, total_sq, count = 0.0, 0.0, 0
        device, dtype = self.scaling_factor.device, next(self.autoencoder.parameters()).dtype
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            images = batch["image"] if isinstance(batch, dict) else batch
            mean = self.encode_moments(images.to(device, dtype))[0].double()
            total += mean.sum().item()
            total_sq += mean.pow(2).sum().item()
            count += mean.numel()
        self.train(was_training)
        if count == 0:
            raise ValueError("measure_latent_scale got no batches: is the dataloader empty?")
        mu = total / count
        std = math.sqrt(max(total_sq / count - mu * mu, 0.0))
        if std == 0.0:
            raise ValueError("measure_latent_scale: latents have zero variance on the given data")
        scale, shift = 1.0 / std, (mu if with_shift else 0.0)
        self.set_latent_scale(scale, shift)
        return scale, shift

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers AutoencoderKL folder whose config carries scaling/shift factor."""
        if not self.has_latent_scale:
            warnings.warn(
                "VAE.save_pretrained: the latent scale was never measured; writing "
                "scaling_factor=1.0, shift_factor=0.0. Call measure_latent_scale first.",
                stacklevel=2,
            )
        shift = float(self.shift_factor)
        if shift != 0.0:
            warnings.warn(
                f"VAE.save_pretrained: shift_factor={shift:.4g} is non-zero; diffusers pipelines "
                "that ignore shift_factor (e.g. PixArtSigmaPipeline) will decode incorrectly.",
                stacklevel=2,
            )
        self.autoencoder.register_to_config(
            scaling_factor=float(self.scaling_factor), shift_factor=shift
        )
        self.autoencoder.save_pretrained(str(folder), safe_serialization=True)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VAE:
        """Load a VAE (weights, scaling and shift factor) from a local diffusers folder."""
        return cls(pretrained_path=str(folder))

    def fingerprint(self) -> dict[str, str]:
        """Config and weights hashes, including the latent scale and shift."""
        config = {k: v for k, v in self.autoencoder.config.items() if not k.startswith("_")}
        config.update(
            scaling_factor=float(self.scaling_factor), shift_factor=float(self.shift_factor)
        )
        return fingerprint(self, config)
