"""The non-finite guard: NaN/inf steps are skipped and counted, the fit stops after N, and no
non-finite tensor reaches the weights, the EMA or a checkpoint."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fewstep.lightning.ema import EMA
from fewstep.lightning.nonfinite import NonFiniteError, NonFiniteGuard


class Regression(pl.LightningModule):
    """y = w x with a NaN injected into the loss at the given global steps."""

    def __init__(self, nan_steps: set[int], lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.ema_target = self.net
        self.nan_steps, self.lr = nan_steps, lr
        self.weights_before: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.weights_before[self.global_step] = self.net.weight.detach().clone()
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader() -> DataLoader:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(tmp_path, steps: int, *callbacks) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def test_nan_step_is_skipped_and_counted(tmp_path):
    model, guard, ema = Regression({2, 4}), NonFiniteGuard(max_skipped=5), EMA(decay=0.9)
    _trainer(tmp_path, 6, guard, ema).fit(model, _loader())
    assert guard.skipped == 2
    before = model.weights_before
    assert torch.equal(before[2], before[3]) and torch.equal(before[4], before[5])  # skipped
    assert not torch.equal(before[1], before[2])  # the finite steps did update
    assert all(torch.isfinite(s).all() for s in ema.shadow)
    assert torch.isfinite(model.net.weight).all()


def test_too_many_nan_steps_stop_the_fit_and_keep_the_last_good_checkpoint(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    model = Regression({3, 4})
    with pytest.raises(NonFiniteError, match="max_skipped=1"):
        _trainer(tmp_path, 8, NonFiniteGuard(max_skipped=1), ckpt).fit(model, _loader())
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # step 3 was skipped and saved (finite), step 4 stopped
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_exploding_weights_stop_the_fit_and_are_never_saved(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    model = Regression(set(), lr=1e38)  # finite gradients, overflowing update
    with pytest.raises(NonFiniteError, match="non-finite"):
        _trainer(tmp_path, 8, NonFiniteGuard(max_skipped=0), ckpt).fit(model, _loader())
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


def test_skip_count_survives_a_checkpoint():
    guard = NonFiniteGuard()
    guard.skipped = 3
    restored = NonFiniteGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped == 3


def test_all_finite_sees_nan_and_inf_but_not_large_finite_values():
    from fewstep.lightning.nonfinite import all_finite

    big = torch.tensor([1e30, -3e38])  # squares overflow float32: a 2-norm would say inf
    assert all_finite([torch.ones(3), big, torch.zeros(0)])
    assert not all_finite([torch.ones(3), torch.tensor([float("nan"), 1.0])])
    assert not all_finite([torch.tensor([float("-inf")])])
    assert all_finite([])
