"""bench/graft_without.py: a checkpoint's EMA network weights minus named tensors, which a new
fit's ``init_weights`` then leaves at their fresh initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench
from test_text_refiner import KW as REFINER_KW

from fewstep.lightning.checkpoints import graft_weights
from fewstep.models.dit import DiT

ROOT = Path(__file__).resolve().parents[1]
KW = {**REFINER_KW, "depth": 1, "text_refiner_depth": 1, "text_refiner_max_tokens": 16}


@pytest.fixture(scope="module")
def tool():
    return load_bench("graft_without")


def test_dropped_positions_restart_at_the_new_scale(tool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = DiT(**KW)
    raw = {f"network.{k}": v for k, v in trained.state_dict().items()}
    shadow = {k: v + 1.0 for k, v in trained.state_dict().items()}  # the EMA differs from raw
    torch.save({"state_dict": raw, "callbacks": {"EMA": {"shadow": shadow}}}, tmp_path / "a.ckpt")
    dropped = tool.graft_without(
        tmp_path / "a.ckpt", tmp_path / "b.ckpt", ["text_refiner.positions"]
    )
    assert dropped == ["text_refiner.positions"]
    fresh = DiT(**KW, text_refiner_position_std=1.0)
    missing = graft_weights(fresh, tmp_path / "b.ckpt", ema=False)
    assert missing == ["text_refiner.positions"]
    assert fresh.text_refiner.positions.std().item() == pytest.approx(1.0, rel=0.2)
    torch.testing.assert_close(fresh.y_embedder.fc1.weight, shadow["y_embedder.fc1.weight"])
    with pytest.raises(ValueError, match="no network tensors"):
        tool.graft_without(tmp_path / "a.ckpt", tmp_path / "c.ckpt", ["text_refiner.nothing"])
