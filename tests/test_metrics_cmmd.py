"""CMMD: the estimator of google-research/cmmd distance.py and its unbiased variant against
explicit O(n^2) numpy sums, and the metric end to end on a tiny CLIP folder (normalised
embeddings, DDP-style state merge, missing weights)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_metric_models import make_tiny_clip

from fewstep.eval.metrics import CMMD, ImageTower
from fewstep.eval.metrics.cmmd import mmd
from fewstep.eval.metrics.weights import MissingWeightsError


def gaussian(a: np.ndarray, b: np.ndarray, sigma: float = 10.0) -> float:
    return float(np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)))


def mmd_loops(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """1000 * MMD^2 with the sigma = 10 Gaussian kernel, pair by pair (Gretton et al. 2012):
    V-statistic (all pairs, as cmmd distance.py) or U-statistic (distinct pairs only)."""

    def within(z: np.ndarray) -> list[float]:
        if unbiased:
            return [gaussian(z[i], z[j]) for i, j in itertools.permutations(range(len(z)), 2)]
        return [gaussian(a, b) for a in z for b in z]

    xx, yy = within(x), within(y)
    xy = [gaussian(a, b) for a in x for b in y]
    return 1000 * (np.mean(xx) + np.mean(yy) - 2 * np.mean(xy))


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_matches_explicit_pair_sums(unbiased: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(9, 5, generator=g), dim=-1) * 3
    y = F.normalize(torch.randn(7, 5, generator=g), dim=-1) * 3 + 0.5
    expected = mmd_loops(x.double().numpy(), y.double().numpy(), unbiased)
    assert float(mmd(x, y, unbiased=unbiased)) == pytest.approx(expected, rel=1e-9)


def test_cmmd_on_a_clip_folder_merges_like_ddp(tmp_path) -> None:
    folder = make_tiny_clip(tmp_path / "clip")
    g = torch.Generator().manual_seed(1)
    real = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    fake = (torch.rand(8, 3, 32, 32, generator=g) * 2 - 1) * 0.3
    single, rank0, rank1 = CMMD(str(folder)), CMMD(str(folder)), CMMD(str(folder))
    for metric, rows in ((single, slice(0, 8)), (rank0, slice(0, 4)), (rank1, slice(4, 8))):
        metric.update(real[rows], real=True)
        metric.update(fake[rows], real=False)
    rank0.merge_state(rank1)
    tower = ImageTower(str(folder), normalize=True)
    expected = mmd(tower(real), tower(fake))
    assert torch.allclose(single.compute().double(), expected.double(), rtol=1e-5)
    assert torch.allclose(rank0.compute(), single.compute(), rtol=1e-6)


def test_cmmd_missing_clip_folder(tmp_path) -> None:
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        CMMD(str(tmp_path / "absent"))
