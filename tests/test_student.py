"""The StudentModule: frozen teacher (not in checkpoints, fingerprint checked on resume), student
initialised from the teacher's EMA weights, EMA of the student only, exact resume of a
two-optimiser (manual optimisation) method, and validation against the teacher."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from student_fixtures import build_tiny_teacher, quiet_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fewstep.data.datamodule import CachedLatentDataModule, collate
from fewstep.data.prompts import CATEGORIES
from fewstep.diffusion import Consistency, Euler
from fewstep.distill import DistillationMethod, DistillBatch, Models
from fewstep.lightning.ema import EMA
from fewstep.lightning.student_module import StudentModule, TeacherMismatchError
from fewstep.utils.fingerprint import weights_hash

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny rectified-flow teacher, its cache and VAE."""
    return build_tiny_teacher(tmp_path_factory.mktemp("student_teacher"))


class Regression(DistillationMethod):
    """A one-optimiser method: regress the student's x0 on the teacher's at random t."""

    def generator_loss(self, batch: DistillBatch, models: Models) -> tuple[Tensor, dict]:
        x0, g = batch.latents, batch.generator
        t = 0.1 + 0.8 * torch.rand(x0.shape[0], generator=g)
        x_t = models.process.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            ref = models.teacher(x_t, t, **batch.cond).x0
        loss = (models.student(x_t, t, **batch.cond).x0 - ref).pow(2).mean()
        return loss, {"t": t.mean()}


class FakeAdversarial(Regression):
    """A two-optimiser method: regression + a critic on channel means (LADD-shaped)."""

    num_optimizers = 2

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 1)
        self._fake: Tensor | None = None

    def _critic(self, x: Tensor) -> Tensor:
        return self.head(x.float().mean(dim=(2, 3)))  # [B, C, h, w] -> [B, C] -> [B, 1]

    def generator_loss(self, batch: DistillBatch, models: Models) -> tuple[Tensor, dict]:
        x0, g = batch.latents, batch.generator
        t = 0.1 + 0.8 * torch.rand(x0.shape[0], generator=g)
        x_t = models.process.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        fake = models.student(x_t, t, **batch.cond).x0
        with torch.no_grad():
            ref = models.teacher(x_t, t, **batch.cond).x0
        adv = -self._critic(fake).mean()
        self._fake = fake.detach()
        return (fake - ref).pow(2).mean() + 0.1 * adv, {"adv": adv.detach()}

    def discriminator_loss(self, batch: DistillBatch, models: Models) -> tuple[Tensor, dict]:
        real, fake = self._critic(batch.latents), self._critic(self._fake)
        return F.softplus(-real).mean() + F.softplus(fake).mean(), {}

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()


class OneBatchData(CachedLatentDataModule):
    """The tiny cache with one fixed training batch per epoch (each step ends an epoch, so that a
    checkpoint never falls mid-epoch: resume is exact)."""

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        batch = collate(self.train_dataset.__getitems__(list(range(4))))
        return DataLoader([batch], batch_size=None)


def data(teacher, one_batch: bool = False) -> CachedLatentDataModule:
    cls = OneBatchData if one_batch else CachedLatentDataModule
    return cls(str(teacher.cache), batch_size=4, val_fraction=0.25, text_dropout=0.0)


def student(teacher, method: DistillationMethod | None = None, **kwargs) -> StudentModule:
    torch.manual_seed(0)
    kwargs = {
        "sampler": Euler(steps=2),
        "eval_steps": [1, 2],
        "vae_path": str(teacher.vae),
        "val_num_samples": 3,
        "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3),
        **kwargs,
    }
    return StudentModule(str(teacher.config), str(teacher.ckpt), method or Regression(), **kwargs)


def trainer(max_steps: int, root: Path, **kwargs) -> pl.Trainer:
    """Quiet deterministic CPU trainer."""
    return quiet_trainer(max_steps, root, deterministic=True, **kwargs)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_student_starts_from_the_teacher_ema_weights(teacher):
    module = student(teacher)
    saved = torch.load(teacher.ckpt, weights_only=False)
    shadow = saved["callbacks"]["EMA"]["shadow"]
    raw = {k.removeprefix("network."): v for k, v in saved["state_dict"].items()}
    s, t = snapshot(module.student), snapshot(module.teacher)
    assert all(torch.equal(s[n], shadow[n]) and torch.equal(t[n], shadow[n]) for n in shadow)
    assert any(not torch.equal(shadow[n], raw[n]) for n in shadow)  # EMA != raw weights
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.student.parameters())
    module.train()
    assert not module.teacher.training and module.student.training


def test_checkpoint_drops_the_teacher_and_resume_checks_its_fingerprint(teacher, tmp_path):
    sampler = Consistency(timesteps=[1.0, 0.6, 0.3])
    module = student(teacher, sampler=sampler)
    fit = trainer(1, tmp_path)
    fit.fit(module, data(teacher))
    fit.save_checkpoint(tmp_path / "student.ckpt")
    ckpt = torch.load(tmp_path / "student.ckpt", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert any(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["teacher"] == {
        "config": str(teacher.config),
        "ckpt": str(teacher.ckpt),
        "sha256": weights_hash(module.teacher),
        "use_ema": True,
    }
    record = ckpt["student_sampler"]
    assert record["class_path"] == "fewstep.diffusion.samplers.Consistency"
    assert record["init_args"]["timesteps"] == [1.0, 0.6, 0.3]
    assert record["timesteps"][1] == [1.0, 0.0] and record["timesteps"][3] == [1.0, 0.6, 0.3, 0.0]

    resumed = student(teacher, sampler=sampler)  # the same teacher: strict load succeeds
    resumed.on_load_checkpoint(ckpt)
    resumed.load_state_dict(ckpt["state_dict"], strict=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(resumed.student.parameters(), module.student.parameters(), strict=True)
    )

    changed = torch.load(teacher.ckpt, weights_only=False)
    name = next(iter(changed["callbacks"]["EMA"]["shadow"]))
    changed["callbacks"]["EMA"]["shadow"][name] += 1e-3
    torch.save(changed, tmp_path / "teacher_changed.ckpt")
    other = StudentModule(
        str(teacher.config),
        str(tmp_path / "teacher_changed.ckpt"),
        Regression(),
        Euler(steps=2),
        vae_path=str(teacher.vae),
    )
    with pytest.raises(TeacherMismatchError, match="teacher_changed.ckpt"):
        trainer(2, tmp_path).fit(other, data(teacher), ckpt_path=tmp_path / "student.ckpt")


def test_ema_averages_only_the_student_and_the_teacher_stays_frozen(teacher, tmp_path):
    module = student(teacher)
    before = snapshot(module.teacher)
    ema = EMA(decay=0.5)
    trainer(2, tmp_path, callbacks=[ema]).fit(module, data(teacher))
    assert ema.names == [n for n, _ in module.student.named_parameters()]
    assert all(torch.equal(before[n], p) for n, p in module.teacher.named_parameters())
    changed = [n for n, p in module.student.named_parameters() if not torch.equal(before[n], p)]
    assert changed  # the student trained
    optimised = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in module.teacher.parameters()}


def test_interrupted_two_optimiser_run_resumes_exactly(teacher, tmp_path):
    def run(batches: int, ckpt: Path | None = None):
        pl.seed_everything(0)
        ema = EMA(decay=0.9)
        module = student(
            teacher,
            FakeAdversarial(),
            gradient_clip_val=0.5,
            disc_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.9),
            disc_lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.8),
        )
        assert not module.automatic_optimization
        fit = trainer(2 * batches, tmp_path, callbacks=[ema])  # 2 optimiser steps per batch
        fit.fit(module, data(teacher, one_batch=True), ckpt_path=ckpt)
        return module, ema, fit

    straight, straight_ema, fit = run(4)
    assert [c.scheduler.last_epoch for c in fit.lr_scheduler_configs] == [4, 4]
    assert fit.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.8**4)
    _, _, first = run(2)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_ema, _ = run(4, tmp_path / "half.ckpt")

    for a, b in ((straight.student, resumed.student), (straight.method, resumed.method)):
        sa, sb = snapshot(a), snapshot(b)
        assert sa and all(torch.equal(sa[n], sb[n]) for n in sa)
    torch.manual_seed(0)  # pl.seed_everything(0) then FakeAdversarial(), as in run()
    initial = FakeAdversarial()
    assert not torch.equal(straight.method.head.weight, initial.head.weight)  # critic trained
    assert resumed_ema.num_updates == straight_ema.num_updates
    assert all(
        torch.equal(x, y) for x, y in zip(straight_ema.shadow, resumed_ema.shadow, strict=True)
    )


def test_two_optimisers_train_under_bf16_mixed(teacher, tmp_path):
    module = student(teacher, FakeAdversarial(), gradient_clip_val=1.0)
    before = snapshot(module.student)
    trainer(2, tmp_path, precision="bf16-mixed").fit(module, data(teacher, one_batch=True))
    assert any(not torch.equal(before[n], p) for n, p in module.student.named_parameters())


def test_validation_logs_scores_fidelity_speed_and_writes_the_table(teacher, tmp_path):
    # Student = teacher copy, sampled like the teacher without CFG: n = 2 must match exactly.
    module = student(teacher, guidance_scale=1.0, teacher_sampler=Euler(steps=2))
    logger = TensorBoardLogger(tmp_path, name="student", version="")
    metrics = trainer(1, tmp_path, logger=logger, limit_val_batches=1).validate(
        module, data(teacher), verbose=False
    )[0]
    for key in ("teacher", "student_1", "student_2"):
        assert {f"val/{key}/{m}" for m in ("nfe", "ms_per_image", "geneval/overall")} <= set(
            metrics
        )
        cats = {k.split("/")[-1] for k in metrics if k.startswith(f"val/{key}/geneval/")}
        assert cats - {"overall", "overall_se"} <= set(CATEGORIES) and len(cats) >= 2
    for n in (1, 2):
        assert {f"val/student_{n}/{m}" for m in ("latent_mse", "psnr", "speedup")} <= set(metrics)
        assert metrics[f"val/student_{n}/nfe"] == n
    assert metrics["val/teacher/nfe"] == 2  # Euler(2) at CFG 1: no unconditional pass
    assert metrics["val/student_2/latent_mse"] == 0.0  # same net, noise and sampler
    assert metrics["val/student_1/latent_mse"] > 0.0
    table = (tmp_path / "student" / "eval_table.md").read_text()
    assert "| student_1 | Euler(1) | 1 |" in table and "| teacher | Euler(2) | 2 |" in table

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "student"))
    events.Reload()
    assert "val/student_2/teacher_vs_student" in events.Tags()["images"]
    assert (tmp_path / "student" / "teacher_vs_student" / "step0000000_2steps.png").is_file()


def test_grids_are_png_files_with_any_logger(teacher, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = student(teacher, guidance_scale=1.0, teacher_sampler=Euler(steps=2))
    logger = CSVLogger(tmp_path, name="student", version="")
    trainer(1, tmp_path, logger=logger, limit_val_batches=1).validate(module, data(teacher))
    grids = sorted(p.name for p in (tmp_path / "student" / "teacher_vs_student").glob("*.png"))
    assert grids == ["step0000000_1steps.png", "step0000000_2steps.png"]


def test_validation_measures_distances_and_diversity_with_the_feature_network(teacher, tmp_path):
    from fewstep.models.shapes_features import ShapesFeatureNet

    torch.manual_seed(0)
    features = ShapesFeatureNet(width=8)
    with torch.no_grad():  # a random net with larger weights: features that vary visibly
        for p in features.parameters():
            p.mul_(4.0)
    features.save(tmp_path / "features")
    module = student(
        teacher,
        guidance_scale=1.0,
        teacher_sampler=Euler(steps=2),
        val_num_samples=4,
        fidelity_features=str(tmp_path / "features"),
        diversity_prompts=2,
        diversity_seeds=3,
    )
    logger = TensorBoardLogger(tmp_path, name="student", version="")
    metrics = trainer(1, tmp_path, logger=logger, limit_val_batches=1).validate(
        module, data(teacher), verbose=False
    )[0]
    # student_2 is the teacher (same net, noise and sampler): zero distance, same diversity
    assert metrics["val/student_2/fd_teacher"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["val/student_1/fd_teacher"] > 1e3 * max(
        metrics["val/student_2/fd_teacher"], 1e-9
    )
    assert metrics["val/student_2/diversity"] == pytest.approx(metrics["val/teacher/diversity"])
    assert metrics["val/teacher/diversity"] > 0.0
    assert metrics["val/teacher/fd_data"] == pytest.approx(metrics["val/student_2/fd_data"])
    # KID (shapes features) for every key and reference (4 samples: too few to order them)
    for key in ("teacher", "student_1", "student_2"):
        refs = ("data",) if key == "teacher" else ("data", "teacher")
        assert all(math.isfinite(metrics[f"val/{key}/kid_{ref}"]) for ref in refs)
    assert not any(name.startswith("_features") for name, _ in module.named_modules())
    table = (tmp_path / "student" / "eval_table.md").read_text()
    assert "FD to teacher" in table and "KID to data" in table and " ± " in table


def test_students_above_110_percent_of_the_teacher_are_flagged():
    from fewstep.lightning.student_eval import unfaithful_notes

    table = {
        "teacher": {"geneval/overall": 0.5},
        "student_1": {"geneval/overall": 0.5, "score_ratio": 1.0},
        "student_4": {"geneval/overall": 0.6, "score_ratio": 1.2},
    }
    notes = "\n".join(unfaithful_notes(table))
    assert "student_4: not faithful to the teacher" in notes and "120 %" in notes
    assert "student_1" not in notes
    assert unfaithful_notes({"student_1": {"score_ratio": 1.1}}) == []


def test_teacher_reference_defaults_come_from_the_teacher_config(teacher):
    module = student(teacher, vae_path=None)
    assert module.guidance_scale == 2.0 and isinstance(module.teacher_sampler, Euler)
    assert module.teacher_nfe == 2 * module.teacher_sampler.nfe  # CFG doubles the passes
    assert module.vae_path == str(teacher.vae)


def test_bad_teacher_paths_name_the_file(teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        StudentModule(
            str(teacher.config), str(tmp_path / "missing.ckpt"), Regression(), Euler(steps=2)
        )
    raw = torch.load(teacher.ckpt, weights_only=False)
    raw["callbacks"] = {}
    torch.save(raw, tmp_path / "no_ema.ckpt")
    with pytest.raises(ValueError, match="use_teacher_ema=false"):
        StudentModule(
            str(teacher.config), str(tmp_path / "no_ema.ckpt"), Regression(), Euler(steps=2)
        )
    with pytest.raises(ValueError, match="eval_steps"):
        student(teacher, sampler=Euler(timesteps=[1.0, 0.5]), eval_steps=[1, 4])


def test_eval_table_names_a_shipped_teacher_by_its_config() -> None:
    """A shipped teacher has no checkpoint: the table names its teacher.yaml, not `None`."""
    from fewstep.lightning.student_eval import teacher_label

    shipped = {"config": "assets/ref/teacher.yaml", "ckpt": "None", "sha256": "ab"}
    trained = {"config": "runs/t/config.yaml", "ckpt": "runs/t/last.ckpt", "sha256": "ab"}
    assert teacher_label(shipped) == "assets/ref/teacher.yaml"
    assert teacher_label({**shipped, "ckpt": None}) == "assets/ref/teacher.yaml"
    assert teacher_label(trained) == "runs/t/last.ckpt"
