"""Tests for CachedLatentDataModule: batches, padding, CFG dropout, shuffling, DDP splits."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from test_cache import FakeText, FakeVAE, build
from torch.utils.data import DataLoader, DistributedSampler

from fewstep.data.cache import CacheError, LatentCache
from fewstep.data.datamodule import CachedLatentDataModule, collate

N = 32


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build(tmp_path_factory.mktemp("dm") / "c", n=N))


def datamodule(path: str, **kwargs) -> CachedLatentDataModule:
    args = {"batch_size": 8, "text_dropout": 0.0, "verify": "none"}
    dm = CachedLatentDataModule(path, **{**args, **kwargs})
    dm.setup("fit")
    return dm


def batches(dm: CachedLatentDataModule) -> list[dict]:
    return list(dm.train_dataloader())


def test_batch_shapes_and_types(path: str) -> None:
    batch = batches(datamodule(path))[0]
    assert batch["latents"].shape == (8, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["text"].shape[0] == 8 and batch["text"].shape[2] == 8
    assert batch["text"].dtype == torch.float32 and batch["text_mask"].dtype == torch.bool
    assert batch["text_mask"].shape == batch["text"].shape[:2]
    assert batch["index"].dtype == torch.long and len(batch["caption"]) == 8


def test_padding_mask_captions_and_normalisation(path: str) -> None:
    cache = LatentCache(path)
    for batch in batches(datamodule(path)):
        lengths = batch["text_mask"].sum(1)
        assert batch["text"].shape[1] == int(lengths.max())
        for b, i in enumerate(batch["index"].tolist()):
            stored, n = cache[i], int(lengths[b])
            assert batch["text_mask"][b, :n].all() and not batch["text_mask"][b, n:].any()
            assert torch.equal(batch["text"][b, :n], stored["text"].float())
            assert not batch["text"][b, n:].any()
            expected = (stored["latent_mean"].float() - 0.25) * 0.5  # (z - shift) * scale
            torch.testing.assert_close(batch["latents"][b], expected)
            assert batch["caption"][b] == stored["caption"]
            assert batch["metadata"][b] == stored["metadata"]
            assert batch["metadata"][b]["spec"]["category"]


def test_batched_and_per_item_paths_agree(path: str) -> None:
    dataset = datamodule(path).train_dataset
    fast = dataset.__getitems__([5, 0, 17])
    slow = collate([dataset[5], dataset[0], dataset[17]])
    for key in ("latents", "text", "text_mask", "index"):
        assert torch.equal(fast[key], slow[key]), key
    assert fast["caption"] == slow["caption"] and fast["metadata"] == slow["metadata"]


def test_text_dropout_all_and_none(path: str) -> None:
    dm = datamodule(path, text_dropout=1.0)
    null, null_mask = dm.null_text()
    assert null.shape == (1, 1, 8) and null_mask.all()
    for batch in batches(dm):
        assert batch["text"].shape[1] == 1 and batch["text_mask"].all()
        assert torch.equal(batch["text"], null.expand(8, -1, -1))
    for batch in batches(datamodule(path, text_dropout=0.0)):
        assert batch["text_mask"].sum(1).min() > 1  # every caption has words + end token


def test_partial_dropout_hits_some_samples(path: str) -> None:
    drops = [b["text_mask"].sum(1) == 1 for b in batches(datamodule(path, text_dropout=0.5))]
    assert 0 < int(torch.cat(drops).sum()) < N


def test_shuffling_changes_order_and_covers_all(path: str) -> None:
    loader = datamodule(path, seed=3).train_dataloader()
    epochs = [torch.cat([b["index"] for b in loader]).tolist() for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    assert epochs[0] != epochs[1]
    again = datamodule(path, seed=3).train_dataloader()
    assert torch.cat([b["index"] for b in again]).tolist() == epochs[0]  # seeded


def test_distributed_sampler_partitions(path: str) -> None:
    dm = datamodule(path)
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, seed=0)
        ddp_loader = _update_dataloader(loader, sampler)  # what Lightning does under DDP
        assert ddp_loader.collate_fn is collate
        seen.append(torch.cat([b["index"] for b in ddp_loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(N))


def test_sample_posterior_uses_std(path: str) -> None:
    cache = LatentCache(path)
    mean, std = (torch.from_numpy(a).float() for a in cache.read_latents(range(N)))
    torch.manual_seed(0)
    batch = next(
        iter(
            DataLoader(
                datamodule(path, sample_posterior=True).train_dataset,
                batch_size=N,
                collate_fn=collate,
            )
        )
    )
    z = batch["latents"] / 0.5 + 0.25
    eps = (z - mean[batch["index"]]) / std[batch["index"]]
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05


def test_val_split_and_val_path(path: str) -> None:
    dm = datamodule(path, val_fraction=0.25, text_dropout=1.0)
    train = torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()
    val_batches = list(dm.val_dataloader())
    val = torch.cat([b["index"] for b in val_batches]).tolist()
    assert len(val) == 8 and not set(train) & set(val) and len(set(train)) == N - 8
    assert all(b["text_mask"].sum(1).min() > 1 for b in val_batches)  # no dropout on val
    assert datamodule(path).val_dataloader() == []
    dm = datamodule(path, val_path=path)
    assert len(dm.val_dataset) == N
    with pytest.raises(ValueError, match="val_fraction or val_path, not both"):
        CachedLatentDataModule(path, val_fraction=0.1, val_path=path)


def test_fingerprint_mismatch_on_setup(path: str) -> None:
    with pytest.raises(CacheError, match="different VAE.*seed0.*seed1"):
        datamodule(path, expect_vae=FakeVAE(seed=1).fingerprint())
    with pytest.raises(CacheError, match="different text encoder"):
        datamodule(path, expect_text=FakeText(seed=1).fingerprint())
    dm = datamodule(path, expect_vae=FakeVAE().fingerprint())
    with pytest.raises(CacheError, match="different text encoder"):
        dm.check_encoders(text=FakeText(seed=2).fingerprint())


def test_max_text_length_and_workers(path: str) -> None:
    dm = datamodule(path, max_text_length=3, num_workers=2, verify="first")
    seen = []
    for batch in dm.train_dataloader():
        assert batch["text"].shape[1] == 3 and batch["text_mask"].all()
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(N))


def test_bad_arguments_name_the_field(path: str) -> None:
    with pytest.raises(ValueError, match="text_dropout"):
        CachedLatentDataModule(path, text_dropout=1.5)
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 32 training samples"):
        datamodule(path, batch_size=64).train_dataloader()


class _Probe(pl.LightningModule):
    """Consumes batches; checks they carry what a teacher needs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, _: int) -> torch.Tensor:
        assert batch["latents"].shape[1:] == (4, 8, 8) and batch["text_mask"].any(1).all()
        return (batch["latents"].mean() - self.w) ** 2

    def validation_step(self, batch: dict, _: int) -> None:
        self.log("val", batch["latents"].mean(), batch_size=len(batch["index"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_trainer_fit(path: str, tmp_path: Path, val_fraction: float) -> None:
    dm = CachedLatentDataModule(path, batch_size=4, val_fraction=val_fraction)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Probe(), datamodule=dm)
    assert trainer.global_step == 3
    assert np.isfinite(float(trainer.callback_metrics.get("val", 0.0)))


def test_batch_transfer_moves_tensors_and_keeps_captions(path: str) -> None:
    """Only tensors travel: captions and metadata are the same host objects (Lightning's default
    walk rebuilt every metadata dict, ~0.2 s per batch of 1,024)."""
    dm = datamodule(path)
    batch = batches(dm)[0]
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert set(moved) == set(batch)
    for key in ("latents", "text", "text_mask", "index"):
        assert moved[key].device.type == "meta" and moved[key].shape == batch[key].shape
        assert moved[key].dtype == batch[key].dtype
    assert moved["caption"] is batch["caption"] and moved["metadata"] is batch["metadata"]
    pair = [batch["latents"], batch["index"]]  # a batch that is not a dict: Lightning's walk
    assert all(t.device.type == "meta" for t in dm.transfer_batch_to_device(pair, "meta", 0))
