"""The EMA callback: the average itself, frozen parameters, validation swap, checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from fewstep.lightning.ema import EMA, warmup_decay


class Tiny(pl.LightningModule):
    """Two linear layers averaged by EMA, behind a frozen projection that is not."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        self.net[0].bias.requires_grad_(False)  # frozen inside the averaged network
        self.val_weights: list[torch.Tensor] = []

    @property
    def ema_target(self) -> nn.Module:
        return self.net

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.net(self.frozen(batch)) - 1.0).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_weights.append(self.net[0].weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def data() -> DataLoader:
    """One fixed batch per epoch."""
    g = torch.Generator().manual_seed(1)
    return DataLoader(list(torch.randn(4, 4, generator=g)), batch_size=4)


def trainer(max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    """Quiet CPU trainer."""
    kwargs = {"logger": False, "enable_checkpointing": False, "limit_val_batches": 0, **kwargs}
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of all parameters."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Recorder(pl.Callback):
    """Snapshots the averaged network and the EMA shadow after each training batch."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.params, self.shadows = ema, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append(snapshot(pl_module.net))
        self.shadows.append(
            dict(zip(self.ema.names, [t.clone() for t in self.ema.shadow], strict=True))
        )


def test_average_matches_hand_computation_and_skips_frozen():
    module = Tiny()
    initial, frozen = snapshot(module.net), snapshot(module.frozen)
    ema = EMA(decay=0.75, update_every=2, warmup=False)
    recorder = Recorder(ema)
    trainer(5, [ema, recorder]).fit(module, data())
    assert ema.names == ["0.weight", "2.weight", "2.bias"]  # net[0].bias is frozen
    expected = {n: initial[n].clone() for n in ema.names}
    for step in (1, 3):  # updates after the 2nd and 4th optimiser steps
        for n in ema.names:
            expected[n] = 0.75 * expected[n] + 0.25 * recorder.params[step][n]
    for n, value in zip(ema.names, ema.shadow, strict=True):
        torch.testing.assert_close(value, expected[n])
    assert ema.num_updates == 2
    assert torch.equal(module.net[0].bias, initial["0.bias"])
    assert all(torch.equal(p, frozen[n]) for n, p in module.frozen.named_parameters())


def test_warmup_ramps_the_decay_from_the_first_update():
    module = Tiny()
    initial = snapshot(module.net)
    ema = EMA(decay=0.999)
    recorder = Recorder(ema)
    trainer(3, [ema, recorder]).fit(module, data())
    expected = {n: initial[n].clone() for n in ema.names}
    for step, decay in enumerate((1 / 10, 2 / 11, 3 / 12)):  # (1 + n) / (10 + n) < 0.999
        for n in ema.names:
            expected[n] = decay * expected[n] + (1 - decay) * recorder.params[step][n]
    for n, value in zip(ema.names, ema.shadow, strict=True):
        torch.testing.assert_close(value, expected[n])
    assert warmup_decay(0.999, 10**6) == 0.999
    assert EMA(decay=0.9, warmup=False).current_decay() == 0.9


def test_validation_uses_average_and_restores_training_weights():
    module = Tiny()
    ema = EMA(decay=0.5)
    recorder = Recorder(ema)
    trainer(3, [ema, recorder], limit_val_batches=1).fit(module, data(), data())
    assert len(module.val_weights) == 3  # one validation per one-batch epoch
    for seen, shadow in zip(module.val_weights, recorder.shadows, strict=True):
        assert torch.equal(seen, shadow["0.weight"])
        assert not torch.equal(seen, recorder.params[0]["0.weight"])
    final = snapshot(module.net)
    assert all(torch.equal(final[n], recorder.params[-1][n]) for n in final)


def test_copy_to_exports_the_average():
    module = Tiny()
    ema = EMA(decay=0.5)
    trainer(2, [ema]).fit(module, data())
    export = Tiny(seed=3).net
    ema.copy_to(export)
    for n, value in zip(ema.names, ema.shadow, strict=True):
        assert torch.equal(dict(export.named_parameters())[n], value)


def test_state_survives_checkpoint_resume(tmp_path):
    straight = EMA(decay=0.9)
    trainer(4, [straight]).fit(Tiny(), data())

    first = EMA(decay=0.9)
    run = trainer(2, [first])
    run.fit(Tiny(), data())
    run.save_checkpoint(tmp_path / "half.ckpt")
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["callbacks"]["EMA"]
    assert state["num_updates"] == 2 and set(state["shadow"]) == set(first.names)

    resumed = EMA(decay=0.9)
    trainer(4, [resumed]).fit(Tiny(seed=7), data(), ckpt_path=tmp_path / "half.ckpt")
    assert resumed.num_updates == 4
    for a, b in zip(resumed.shadow, straight.shadow, strict=True):
        torch.testing.assert_close(a, b)


def test_validate_without_average_leaves_weights_alone():
    module = Tiny()
    before = snapshot(module.net)
    trainer(1, [EMA()], limit_val_batches=1).validate(module, data(), verbose=False)
    assert all(torch.equal(p, before[n]) for n, p in module.net.named_parameters())


def test_a_bf16_network_is_averaged_in_float32():
    """At decay 0.999 each update moves the average by 1e-3 of the gap: below bf16's
    resolution, so a bf16 average would not move. It is kept (and exported) in float32."""
    module = Tiny()
    module.net.to(torch.bfloat16)
    module.frozen.to(torch.bfloat16)
    initial = {n: p.float() for n, p in snapshot(module.net).items()}
    ema = EMA(decay=0.999, warmup=False)
    recorder = Recorder(ema)
    bf16_data = DataLoader([x.to(torch.bfloat16) for x in data().dataset], batch_size=4)
    trainer(3, [ema, recorder]).fit(module, bf16_data)
    assert all(t.dtype == torch.float32 for t in ema.shadow)
    expected = {n: initial[n].clone() for n in ema.names}
    for step in range(3):
        for n in ema.names:
            expected[n] = 0.999 * expected[n] + 0.001 * recorder.params[step][n].float()
    for n, value in zip(ema.names, ema.shadow, strict=True):
        torch.testing.assert_close(value, expected[n], rtol=0, atol=1e-6)
        assert not torch.equal(value, initial[n])  # it moved
    ema.copy_to(module.net)  # export: the float32 average rounded into the bf16 weights
    assert module.net[0].weight.dtype == torch.bfloat16
