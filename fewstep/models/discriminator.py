"""PatchGAN discriminator (Isola et al. 2017) and the hinge GAN losses (Lim & Ye 2017)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, Sec. 3.2.2): one real/fake logit per overlapping patch.

    ``num_layers`` stride-2 convolutions (channels doubling up to ``channels * max_mult``), one
    stride-1 convolution and a 1-channel stride-1 head, 4x4 kernels throughout. GroupNorm
    replaces the paper's BatchNorm so real and fake batches need not be mixed.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        num_layers: int = 3,
        max_mult: int = 8,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        mults = [min(2**i, max_mult) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            c_in, c_out = channels * mults[i - 1], channels * mults[i]
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(norm_num_groups, c_out), c_out),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mults[num_layers], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> Tensor:
        """Images [B,C,H,W] -> patch logits [B,1,h,w]."""
        return self.net(images)


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.02) conv weights and N(1, 0.02) norm scales, as in pix2pix (Isola et al. 2017)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss E[relu(1 - D(x))] + E[relu(1 + D(G(z)))] (Lim & Ye 2017)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss -E[D(G(z))] (Lim & Ye 2017)."""
    return -fake_logits.mean()
