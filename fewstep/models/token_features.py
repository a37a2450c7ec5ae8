"""Where a transformer's image-token features live: its blocks in forward order and how a block's
output gives the image tokens on the latent token grid. Each network family (DiT, Flux) describes
itself with ``token_features()``; discriminator heads read them without knowing the family (LADD,
Sauer et al. 2024, arXiv:2403.12015, §3; DMD2's GAN head, Yin et al. 2024, §4.3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

# (a block's output, image-token count N) -> image tokens [B, N, D]
ImageTokens = Callable[[Any, int], Tensor]


def all_tokens(output: Tensor, num_image: int) -> Tensor:
    """A block whose output [B, N, D] is image tokens only (DiT): the output itself."""
    return output


@dataclass(frozen=True, eq=False)
class TokenFeatures:
    """A network's feature blocks (forward order), their token width D, the text width it reads,
    the latent pixels per token side, and the reader of a block output's image tokens."""

    blocks: Sequence[nn.Module]
    width: int
    text_dim: int
    patch: int
    image_tokens: ImageTokens = all_tokens

    def grid(self, latent_hw: Sequence[int]) -> tuple[int, int]:
        """Latent size (H, W) -> the token grid (H / patch, W / patch)."""
        return int(latent_hw[0]) // self.patch, int(latent_hw[1]) // self.patch
