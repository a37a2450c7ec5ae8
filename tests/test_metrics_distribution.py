"""FID and KID over pluggable feature networks: the math against independent references
(scipy sqrtm; the polynomial-kernel unbiased MMD written out), the feature networks loaded
from tiny random weights laid out as real ones, DDP-style state merge, missing weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from tiny_metric_models import make_random_inception, make_tiny_clip, make_tiny_dinov2
from torch import nn
from transformers import AutoImageProcessor

from fewstep.eval.metrics import FID, KID, ImageTower, InceptionFeatures, ShapesFeatures
from fewstep.eval.metrics.features import INCEPTION_FILE
from fewstep.eval.metrics.weights import MissingWeightsError


class Projection(nn.Module):
    """Fixed features: a random linear map of the flattened image (no network to load)."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(1))
        self.register_buffer("w", w / 16)  # features of order 1: float32 kernels stay exact

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.w


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) * 2 - 1) * 0.8 + shift


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 sqrtm(S_r S_f)) (Heusel et al. 2017, eq. 6)."""
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(s_r @ s_f).real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(s_r + s_f - 2 * root))


def poly_mmd_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. 2018, KID), by loops."""
    d, m = x.shape[1], len(x)

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * m)
    return xx + yy - 2 * xy


def test_fid_matches_scipy_sqrtm_on_fixed_features() -> None:
    real, fake = images(40, 0), images(40, 1, shift=0.3)
    metric = FID(Projection())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    feats = Projection()
    expected = scipy_fid(feats(real).double().numpy(), feats(fake).double().numpy())
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-4)


def test_kid_matches_the_polynomial_kernel_formula() -> None:
    real, fake = images(12, 2), images(12, 3, shift=0.2)
    metric = KID(Projection(), subsets=3, subset_size=50)  # shrinks to 12: every sample, exact
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    feats = Projection()
    expected = poly_mmd_loops(feats(real).double().numpy(), feats(fake).double().numpy())
    assert float(mean) == pytest.approx(expected, rel=1e-4)
    assert float(std) < 1e-4 * abs(expected)  # every subset is the whole set


@pytest.mark.parametrize("make", [lambda: FID(Projection()), lambda: KID(Projection(), subsets=2)])
def test_state_merged_across_ranks_equals_one_process(make) -> None:
    real, fake = images(20, 4), images(20, 5, shift=0.1)
    single, rank0, rank1 = make(), make(), make()
    for metric, rows in ((single, slice(0, 20)), (rank0, slice(0, 10)), (rank1, slice(10, 20))):
        metric.update(real[rows], real=True)
        metric.update(fake[rows], real=False)
    rank0.merge_state(rank1)  # what the all-gather + reduction of DDP sync computes
    torch.manual_seed(0)  # KID draws subsets
    got = rank0.compute()
    torch.manual_seed(0)
    want = single.compute()
    got, want = (torch.stack(list(v)) if isinstance(v, tuple) else v for v in (got, want))
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def test_inception_features_load_the_fid_weights_file(tmp_path) -> None:
    make_random_inception(tmp_path / INCEPTION_FILE)
    net = InceptionFeatures(str(tmp_path))  # the folder, or the file itself
    assert net.num_features == 2048
    batch = images(2, 6).repeat(1, 1, 4, 4)  # 32 px, resized to 299 inside
    metric = FID(net)
    metric.update(batch, real=True)
    metric.update(batch.flip(-1), real=False)
    assert metric.real_features_sum.shape == (2048,)
    assert torch.isfinite(metric.compute())


def test_inception_refuses_a_pickled_object(tmp_path) -> None:
    torch.save({"state": torch.zeros(1), "code": Projection}, tmp_path / INCEPTION_FILE)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        InceptionFeatures(str(tmp_path / INCEPTION_FILE))


@pytest.mark.parametrize("make", [make_tiny_clip, make_tiny_dinov2])
def test_image_tower_preprocesses_as_the_hf_processor(tmp_path, make) -> None:
    folder = make(tmp_path / "tower")
    tower = ImageTower(str(folder))
    side = tower.shortest_edge  # no resize: geometry is the crop, values must agree exactly
    batch = images(3, 7).repeat(1, 1, 5, 5)[..., :side, :side]
    uint8 = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    reference = AutoImageProcessor.from_pretrained(folder)(images=list(uint8), return_tensors="pt")[
        "pixel_values"
    ]
    assert torch.allclose(tower.pixels(uint8.float() / 127.5 - 1), reference, atol=1e-5)
    features = tower(batch)
    assert features.shape == (3, tower.num_features)
    unit = ImageTower(str(folder), normalize=True)(batch)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_fid_in_shapes_features_is_zero_for_identical_sets() -> None:
    batch = images(8, 8).repeat(1, 1, 8, 8)  # 64 px
    metric = FID(ShapesFeatures())
    metric.update(batch, real=True)
    metric.update(batch, real=False)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-2)


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda p: InceptionFeatures(p), INCEPTION_FILE),
        (lambda p: ImageTower(p), "preprocessor_config.json"),
    ],
)
def test_missing_weights_is_one_clear_error(tmp_path, build, expected) -> None:
    missing = tmp_path / "no_weights_here"
    with pytest.raises(MissingWeightsError) as err:
        build(str(missing))
    assert str(missing) in str(err.value) and expected in str(err.value)
