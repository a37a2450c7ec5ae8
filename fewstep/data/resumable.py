"""A training sampler that resumes exactly, mid-epoch included: epoch e's order is a pure
function of (seed, e) (DistributedSampler's shuffle, sharded by rank), and an iteration that
starts after k batches of the epoch were trained skips them. Each drawn index carries its epoch
(a *draw key* ``epoch * n + index``) so per-sample randomness (CFG text dropout, posterior
noise) can depend on (seed, epoch, index) only, not on a generator that a restart resets."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
from torch.utils.data import Dataset, DistributedSampler

# (epoch, batches of this epoch already trained) at the moment an iteration starts.
Position = Callable[[], tuple[int, int]]


def trained_position(trainer: pl.Trainer) -> tuple[int, int]:
    """(current epoch, batches of it already trained) of ``trainer``'s fit loop (after a
    restore, the epoch and batch it resumes at)."""
    loop = trainer.fit_loop
    return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.ready


def resumable_sampler(
    dataset: Dataset,
    batch_size: int,
    trainer: pl.Trainer | None,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    draw_keys: bool = False,
) -> ResumableSampler:
    """A ResumableSampler for ``trainer``'s rank that follows its fit loop (or, without a
    trainer, a single-process sampler that moves one epoch per iteration)."""
    return ResumableSampler(
        dataset,
        batch_size,
        num_replicas=trainer.world_size if trainer else 1,
        rank=trainer.global_rank if trainer else 0,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        position=(lambda: trained_position(trainer)) if trainer else None,
        draw_keys=draw_keys,
    )


def split_key(key: int, n: int) -> tuple[int, int]:
    """A draw key -> (epoch, index) for a dataset of ``n`` items."""
    epoch, index = divmod(int(key), n)
    return epoch, index


class ResumableSampler(DistributedSampler):
    """DistributedSampler (rank shard of a (seed + epoch)-seeded permutation; Lightning keeps
    it as it is under DDP) starting after the batches ``position`` reports as trained; yields
    indices, or draw keys with ``draw_keys``. Without ``position`` each new iteration is the
    next epoch from its start."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        position: Position | None = None,
        draw_keys: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self.batch_size = batch_size
        self.position = position
        self.draw_keys = draw_keys
        self._iterations = 0

    def __iter__(self) -> Iterator[int]:
        """This rank's share of the epoch, after the batches already trained."""
        if self.position is not None:
            epoch, done = self.position()
        else:
            epoch, done = self._iterations, 0
        self._iterations += 1
        self.set_epoch(epoch)
        indices = list(super().__iter__())[done * self.batch_size :]
        offset = epoch * len(self.dataset) if self.draw_keys else 0  # type: ignore[arg-type]
        return iter([offset + i for i in indices])
