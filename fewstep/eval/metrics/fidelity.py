"""Fréchet distance in the shapes feature space (torchmetrics' FrechetInceptionDistance with a
custom feature network; Heusel et al. 2017, eq. 6) and a per-prompt diversity measure."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from fewstep.models.shapes_features import ShapesFeatureNet


def shapes_fid(features: ShapesFeatureNet | None = None) -> FrechetInceptionDistance:
    """FID whose features are the shapes feature network's (the packaged one by default);
    update it with images in [-1, 1] and ``real=True/False``."""
    net = features if features is not None else ShapesFeatureNet.load()
    return FrechetInceptionDistance(feature=net, reset_real_features=True)


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """Mean Euclidean distance over the distinct pairs of rows of ``features`` [S, D]: the
    spread of S samples of one prompt (0 when every seed gives the same image)."""
    if len(features) < 2:
        raise ValueError(f"mean_pairwise_distance needs >= 2 samples, got {len(features)}")
    distances = torch.cdist(features.double(), features.double())  # [S, S]
    s = len(features)
    return distances.sum() / (s * (s - 1))
