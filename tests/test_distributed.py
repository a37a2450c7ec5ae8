"""Two-process CPU training (gloo): DDP equals one process on the whole batch; FSDP with EMA
saves, resumes exactly and exports the average a single process computes; a NaN on one rank
makes every rank skip (or every rank stop). Each test forks 2 workers running a tiny DiT
teacher; its noise and t are drawn per sample (seed, step, index), so a batch split over ranks
sees the noise the whole batch sees in one process."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from torch import Tensor
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    OptimStateKeyType,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader, Dataset

from fewstep.data.resumable import resumable_sampler
from fewstep.diffusion.losses import diffusion_loss
from fewstep.diffusion.schedules import RectifiedFlow
from fewstep.lightning.checkpoints import apply_ema, ema_state, load_checkpoint
from fewstep.lightning.ema import EMA
from fewstep.lightning.interrupt import GracefulStop
from fewstep.lightning.nonfinite import NonFiniteError, NonFiniteGuard
from fewstep.lightning.teacher_module import TeacherModule
from fewstep.models.dit import DiT, PixArtBlock
from fewstep.utils.seeding import mix_seed

WORLD, SAMPLES, STEPS, GLOBAL_BATCH = 2, 16, 4, 4  # 4 steps = one epoch of 16 samples


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on CPU (tests only). Lightning refuses FSDPStrategy with accelerator='cpu'
    (AcceleratorConnector checks ``type(strategy) is FSDPStrategy``), and torch's FSDP refuses a
    CPU module unless ``device_id`` is the CPU device (Lightning passes the device index, None).
    The full optimizer state is gathered without CPU offload: with ``offload_to_cpu=True`` and a
    CPU compute device, torch 2.14's FSDP1 ``optim_state_dict`` returns every state of a parameter
    as views of one reused all-gather buffer (``_allgather_orig_param_states`` skips the clone
    and relies on ``.cpu()`` copying), so Adam's exp_avg comes back equal to exp_avg_sq."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        full = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        optim = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, full, optim):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:  # Lightning's "full" format: keyed by parameter index
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state


class RandomLatents(Dataset):
    """Fixed random latents [4, 8, 8] and 3-token texts [3, 16]."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(SAMPLES, 4, 8, 8, generator=g)
        self.text = torch.randn(SAMPLES, 3, 16, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        mask = torch.ones(3, dtype=torch.bool)
        return {"latents": self.latents[i], "text": self.text[i], "text_mask": mask, "index": i}


class Latents(pl.LightningDataModule):
    """Shuffled, rank-sharded, mid-epoch-resumable batches (fewstep's ResumableSampler)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        data = RandomLatents()
        sampler = resumable_sampler(data, self.batch_size, self.trainer, seed=3)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class PerSampleTeacher(TeacherModule):
    """The teacher with noise and t from (seed, step, sample index) instead of (seed, step,
    rank); ``nan_at=(rank, step)`` turns that rank's loss at that step into NaN."""

    def __init__(self, nan_at: tuple[int, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_at = nan_at

    def _loss(self, batch: dict[str, Any], generator: torch.Generator) -> Tensor:
        x0 = batch["latents"]
        gens = [
            torch.Generator().manual_seed(mix_seed(0, self.global_step, int(i)))
            for i in batch["index"]
        ]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        t = torch.cat([self.timestep_sampler(1, device=x0.device, generator=g) for g in gens])
        cond = {"text": batch["text"], "text_mask": batch["text_mask"]}
        loss = diffusion_loss(self.denoiser, x0, noise, t, **cond)
        if self.nan_at == (self.global_rank, self.global_step):
            loss = loss * float("nan")
        return loss


def tiny_teacher(nan_at: tuple[int, int] | None = None) -> PerSampleTeacher:
    """A 2-block DiT (two FSDP units plus the root) on rectified flow, AdamW."""
    pl.seed_everything(0, verbose=False)
    network = DiT(
        4,
        2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        caption_channels=16,
        learn_sigma=False,
        sample_size=8,
    )
    with torch.no_grad():  # the PixArt init zeroes the output layer: make every weight move
        for p in network.parameters():
            p.normal_(0.0, 0.1)
    return PerSampleTeacher(
        nan_at=nan_at,
        network=network,
        process=RectifiedFlow(),
        prediction="velocity",
        # eps 1e-4: Adam turns the rounding noise of a zero gradient (the attention key bias)
        # into full lr-sized steps; a larger eps keeps a reordered sum from being amplified.
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-4, weight_decay=0.01),
        val_num_samples=0,
    )


def strategy(name: str) -> Any:
    if name == "fsdp":
        return CPUFSDPStrategy(auto_wrap_policy={PixArtBlock}, state_dict_type="full")
    return name


def fit(
    name: str,
    steps: int,
    devices: int,
    module: PerSampleTeacher | None = None,
    ckpt_path: Path | None = None,
    callbacks: list[pl.Callback] | None = None,
    max_skipped: int = 20,
    clip: float | None = None,
) -> tuple[pl.Trainer, PerSampleTeacher]:
    """Train the tiny teacher with an EMA (decay 0.8) and a NonFiniteGuard, batch 4 in all."""
    module = module or tiny_teacher()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy(name),
        max_steps=steps,
        callbacks=[EMA(decay=0.8), NonFiniteGuard(max_skipped), *(callbacks or [])],
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=clip,
    )
    trainer.fit(module, Latents(GLOBAL_BATCH // devices), ckpt_path=ckpt_path)
    return trainer, module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )  # LOCAL_RANK set: Lightning treats the processes as launched externally
    fn(rank, *args)


def on_two_ranks(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, *args)`` in 2 forked processes joined by gloo (errors re-raised here)."""
    mp.start_processes(_worker, (free_port(), fn, args), nprocs=WORLD, start_method="fork")


def weights(module: PerSampleTeacher) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.network.named_parameters()}


def assert_close(a: dict[str, Tensor], b: dict[str, Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


# --- DDP ----------------------------------------------------------------------------------------


def _ddp(rank: int, out: Path) -> None:
    _, module = fit("ddp", 3, WORLD)
    torch.save(weights(module), out / f"ddp{rank}.pt")


def test_ddp_batch_two_per_rank_equals_one_process_on_batch_four(tmp_path):
    on_two_ranks(_ddp, tmp_path)
    _, single = fit("auto", 3, 1)
    ranks = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    assert_close(ranks[0], ranks[1], rtol=0, atol=0)  # DDP keeps replicas identical
    assert_close(ranks[0], weights(single), rtol=1e-5, atol=5e-6)
    assert not all(torch.equal(v, weights(tiny_teacher())[n]) for n, v in ranks[0].items())


# --- FSDP + EMA ---------------------------------------------------------------------------------


def _fsdp_resume(rank: int, out: Path) -> None:
    every_two = ModelCheckpoint(out, "{step}", every_n_train_steps=2, save_top_k=-1)
    trainer, module = fit("fsdp", STEPS, WORLD, callbacks=[every_two])
    names = [n for n, _ in module.network.named_parameters()]
    assert any("_fsdp_wrapped_module" in n for n in names)  # really sharded...
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    assert "blocks.0.attn.qkv.weight" in ema.names  # ...yet the average has the full names
    # resumed mid-epoch (step 2 of 4) by a fresh module and trainer
    trainer, _ = fit("fsdp", STEPS, WORLD, tiny_teacher(), out / "step=2.ckpt")
    trainer.save_checkpoint(out / "resumed.ckpt")


def test_fsdp_with_ema_resumes_exactly_and_exports_the_single_process_average(tmp_path):
    on_two_ranks(_fsdp_resume, tmp_path)
    straight, resumed = (load_checkpoint(tmp_path / f"{k}.ckpt") for k in ("step=4", "resumed"))
    assert_close(straight["state_dict"], resumed["state_dict"], rtol=0, atol=0)
    ema_straight, ema_resumed = ema_state(straight), ema_state(resumed)
    assert ema_straight["num_updates"] == ema_resumed["num_updates"] == STEPS
    assert_close(ema_straight["shadow"], ema_resumed["shadow"], rtol=0, atol=0)

    trainer, single = fit("auto", STEPS, 1)  # one process, batch 4, the same samples and noise
    ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
    exported = tiny_teacher()
    apply_ema(exported, ema_resumed)  # the export path: checkpoint -> network
    reference = dict(zip(ema.names, ema.shadow, strict=True))
    assert_close(weights(exported), reference, rtol=1e-5, atol=5e-6)
    assert_close(
        {k.removeprefix("network."): v for k, v in straight["state_dict"].items()},
        weights(single),
        rtol=1e-5,
        atol=1e-6,
    )


# --- NaN on one rank ----------------------------------------------------------------------------


class ShardRecorder(pl.Callback):
    """This rank's parameter shards after every training batch."""

    def __init__(self) -> None:
        self.steps: list[list[Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self.steps.append([p.detach().clone() for p in pl_module.network.parameters()])


def _nan(rank: int, out: Path, name: str) -> None:
    recorder = ShardRecorder()
    trainer, _ = fit(name, 3, WORLD, tiny_teacher(nan_at=(1, 1)), callbacks=[recorder])
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    unchanged = [torch.equal(a, b) for a, b in zip(*recorder.steps[:2], strict=True)]
    moved = [torch.equal(a, b) for a, b in zip(*recorder.steps[1:], strict=True)]
    stopped = None
    try:
        fit(name, 3, WORLD, tiny_teacher(nan_at=(1, 1)), max_skipped=0)
    except NonFiniteError as err:
        stopped = str(err)
    torch.save(
        {
            "skipped": guard.skipped,
            "unchanged": all(unchanged),
            "moved": not all(moved),
            "stopped": stopped,
        },
        out / f"{name}{rank}.pt",
    )


def _assert_all_ranks_skipped_then_stopped(out: Path, name: str) -> None:
    for rank in range(WORLD):
        result = torch.load(out / f"{name}{rank}.pt")
        assert result["skipped"] == 1 and result["unchanged"] and result["moved"], (rank, result)
        assert "1 optimiser steps had non-finite gradients" in result["stopped"], (rank, result)


def test_nan_on_one_rank_skips_on_every_rank_ddp(tmp_path):
    on_two_ranks(_nan, tmp_path, "ddp")
    _assert_all_ranks_skipped_then_stopped(tmp_path, "ddp")


def test_nan_on_one_rank_skips_on_every_rank_fsdp(tmp_path):
    on_two_ranks(_nan, tmp_path, "fsdp")
    _assert_all_ranks_skipped_then_stopped(tmp_path, "fsdp")


# --- a signal on one rank -------------------------------------------------------------------------


class SignalRankAt(pl.Callback):
    """Sends SIGTERM to this process on ``rank`` at the end of training batch ``step``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _signal_one_rank(rank: int, out: Path) -> None:
    ddp = DDPStrategy(timeout=timedelta(seconds=60))  # a rank left waiting fails, not hangs
    module = tiny_teacher()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ddp,
        max_steps=50,
        callbacks=[SignalRankAt(1, 3), GracefulStop()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, Latents(GLOBAL_BATCH // WORLD))
    torch.save({"step": trainer.global_step, **weights(module)}, out / f"stop{rank}.pt")


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_batch(tmp_path):
    on_two_ranks(_signal_one_rank, tmp_path)
    ranks = [torch.load(tmp_path / f"stop{r}.pt") for r in range(WORLD)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert_close(ranks[0], ranks[1], rtol=0, atol=0)


# --- gradient clipping under FSDP ---------------------------------------------------------------


def _fsdp_clipped(rank: int, out: Path) -> None:
    trainer, _ = fit("fsdp", 3, WORLD, clip=0.01)
    trainer.save_checkpoint(out / "clipped.ckpt")  # full state dict, gathered (collective)


def test_norm_clipping_under_fsdp_equals_one_process(tmp_path):
    """Trainer.gradient_clip_val under FSDP clips the norm over every rank's shards (Lightning's
    FSDP precision plugin alone refuses norm clipping)."""
    on_two_ranks(_fsdp_clipped, tmp_path)
    state = load_checkpoint(tmp_path / "clipped.ckpt")["state_dict"]
    sharded = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
    _, single = fit("auto", 3, 1, clip=0.01)
    _, unclipped = fit("auto", 3, 1)
    assert_close(sharded, weights(single), rtol=1e-5, atol=5e-6)
    clipped_moved = [torch.allclose(a, b) for a, b in zip(
        weights(single).values(), weights(unclipped).values(), strict=True)]  # fmt: skip
    assert not all(clipped_moved)  # the clip was active
