"""The shapes feature network, its Fréchet distance and the diversity measure."""

import numpy as np
import pytest
import torch
from scipy import linalg

from fewstep.data.shapes import ShapesWorld
from fewstep.eval.metrics.fidelity import mean_pairwise_distance, shapes_fid
from fewstep.models.shapes_features import HEADS, ShapesFeatureNet, count_targets
from fewstep.tools.shapes_features import train
from fewstep.utils.manifest import ShippedModelError


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017, eq. 6, with scipy: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_with_the_feature_network_matches_scipy():
    torch.manual_seed(0)
    net = ShapesFeatureNet(width=16).eval()
    real, fake = torch.rand(40, 3, 64, 64) * 2 - 1, torch.rand(40, 3, 32, 32) * 1.5 - 1
    metric = shapes_fid(net)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        expected = _frechet(net(real).double().numpy(), net(fake).double().numpy())
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-4)


def test_pairwise_distance_is_zero_for_copies_and_matches_the_slow_formula():
    x = torch.randn(5, 7, dtype=torch.float64)
    slow = np.mean([float((x[i] - x[j]).norm()) for i in range(5) for j in range(5) if i != j])
    assert float(mean_pairwise_distance(x)) == pytest.approx(slow)
    assert float(mean_pairwise_distance(x[:1].repeat(8, 1))) == pytest.approx(0.0, abs=1e-6)


def test_count_targets_count_every_shape_and_colour():
    objects = [
        {"shape": "circle", "color": "red"},
        {"shape": "circle", "color": "blue"},
        {"shape": "square", "color": "red"},
    ]
    counts = dict(zip(HEADS, count_targets(objects).tolist(), strict=True))
    assert counts["circle"] == 2 and counts["square"] == 1 and counts["triangle"] == 0
    assert counts["red"] == 2 and counts["blue"] == 1 and counts["green"] == 0


def test_training_learns_counts_and_writes_a_checked_folder(tmp_path):
    out = tmp_path / "features"
    result = train(out=str(out), steps=60, batch_size=16, width=32, eval_samples=50, progress=False)
    assert result["loss_last"] < 0.8 * result["loss_first"]
    net = ShapesFeatureNet.load(out)
    images = torch.stack([ShapesWorld(size=4, seed=3)[i]["image"] for i in range(4)])
    assert net(images).shape == (4, 32)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ShippedModelError, match="model.safetensors has sha256"):
        ShapesFeatureNet.load(out)


def test_missing_feature_network_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fewstep shapes-features"):
        ShapesFeatureNet.load(tmp_path)


def test_the_packaged_network_is_checked_and_counts_renders():
    from fewstep.tools.shapes_features import count_accuracy

    net = ShapesFeatureNet.load()  # fewstep/assets/shapes_features, sha256-checked
    assert net.num_features == 128 and not any(p.requires_grad for p in net.parameters())
    assert count_accuracy(net, ShapesWorld(size=None, seed=99), 100, degrade=True) >= 0.6
