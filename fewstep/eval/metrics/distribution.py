"""Distribution distances between generated and reference images over a pluggable feature
network (features.py): FID (Heusel et al. 2017, eq. 6) and KID (Bińkowski et al. 2018, the
unbiased MMD^2 with the cubic polynomial kernel), as torchmetrics computes them, with states
synced across ranks. Update with images in [-1, 1] and ``real=True`` for the reference."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class FID(FrechetInceptionDistance):
    """torchmetrics FID over ``feature`` (InceptionFeatures, ImageTower or ShapesFeatures)."""

    inputs = ("reference",)  # fed generated images and their reference images

    def __init__(self, feature: nn.Module, reset_real_features: bool = True, **kwargs: Any):
        super().__init__(feature=feature, reset_real_features=reset_real_features, **kwargs)


class KID(KernelInceptionDistance):
    """torchmetrics KID over ``feature``; ``compute()`` returns (mean, std) over subsets of
    ``subset_size`` (at most the number of samples of either side)."""

    inputs = ("reference",)

    def __init__(
        self,
        feature: nn.Module,
        subsets: int = 100,
        subset_size: int = 1000,
        degree: int = 3,
        gamma: float | None = None,
        coef: float = 1.0,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            feature=feature,
            subsets=subsets,
            subset_size=subset_size,
            degree=degree,
            gamma=gamma,
            coef=coef,
            reset_real_features=reset_real_features,
            **kwargs,
        )

    def compute(self) -> Any:
        """(KID mean, std); subsets shrink to the smaller sample count when needed."""
        n = min(sum(len(f) for f in self.real_features), sum(len(f) for f in self.fake_features))
        wanted = self.subset_size
        self.subset_size = min(wanted, n)
        try:
            return super().compute()
        finally:
            self.subset_size = wanted
