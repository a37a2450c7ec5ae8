"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): the MMD between CLIP image embeddings of
generated and reference images with a Gaussian RBF kernel, sigma = 10, scaled by 1000, exactly
as google-research/cmmd ``distance.py`` (its minimum-variance estimator, Gretton et al. 2012
eq. 5; ``unbiased=True`` gives the U-statistic, eq. 3, instead)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fewstep.eval.metrics.features import ImageTower

SIGMA = 10.0  # cmmd distance.py _SIGMA: the RBF bandwidth
SCALE = 1000.0  # cmmd distance.py _SCALE: makes the numbers readable


def rbf_kernel(x: Tensor, y: Tensor, sigma: float = SIGMA) -> Tensor:
    """exp(-||x_i - y_j||^2 / (2 sigma^2)) [N, M], the squared distance expanded as in cmmd."""
    gamma = 1.0 / (2 * sigma**2)
    sq = -2 * x @ y.T + (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :]  # [N, M]
    return torch.exp(-gamma * sq)


def mmd(x: Tensor, y: Tensor, sigma: float = SIGMA, unbiased: bool = False) -> Tensor:
    """SCALE * MMD^2 between the rows of x [N, D] and y [M, D] (float64 inside)."""
    x, y = x.double(), y.double()
    k_xx, k_yy, k_xy = rbf_kernel(x, x, sigma), rbf_kernel(y, y, sigma), rbf_kernel(x, y, sigma)
    if not unbiased:  # distance.py: means over all pairs, diagonals included
        return SCALE * (k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())
    n, m = len(x), len(y)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return SCALE * (xx + yy - 2 * k_xy.mean())


class CMMD(Metric):
    """CMMD over the L2-normalised image embeddings of an HF CLIP folder (ViT-L/14-336 in the
    paper); ``update(images, real)`` with images in [-1, 1]. Embeddings are kept (list states,
    concatenated across ranks), so ``compute`` is exact at any world size."""

    inputs = ("reference",)
    full_state_update = False

    def __init__(self, path: str, unbiased: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tower = ImageTower(path, normalize=True)
        self.unbiased = unbiased
        self.add_state("real_embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("fake_embeddings", default=[], dist_reduce_fx="cat")

    def update(self, images: Tensor, real: bool) -> None:
        """Embed a batch of images in [-1, 1] as reference (``real``) or generated."""
        embeddings = self.tower(images).double()
        (self.real_embeddings if real else self.fake_embeddings).append(embeddings)

    def compute(self) -> Tensor:
        """SCALE * MMD^2(reference, generated)."""
        real, fake = dim_zero_cat(self.real_embeddings), dim_zero_cat(self.fake_embeddings)
        if len(real) < 2 or len(fake) < 2:
            raise RuntimeError("CMMD needs at least 2 reference and 2 generated images")
        return mmd(real, fake, SIGMA, self.unbiased).float()
