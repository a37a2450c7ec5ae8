"""Distillation methods under FSDP on 2 CPU processes (gloo): LCM with its target network θ⁻
(a full and a LoRA student) and DMD2 (with and without its GAN head) fit, save, resume mid-run
and end bit-identical to the uninterrupted run. Plus single-process checks of θ⁻'s shadow
weights against a deep-copied reference network. The 2-process helpers and the CPU FSDP strategy
are those of tests/test_distributed.py."""

from __future__ import annotations

import copy
import importlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from student_fixtures import TinyTeacher, build_tiny_teacher
from test_distributed import CPUFSDPStrategy, assert_close, on_two_ranks
from test_flux_dev_recipe import STUDENT, cpu_args, flux_dev, teacher_copy  # noqa: F401  (fixture)
from torch import nn

from fewstep.cli import run
from fewstep.data.datamodule import CachedLatentDataModule
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.samplers import Consistency, Euler
from fewstep.diffusion.schedules import RectifiedFlow
from fewstep.distill.base import Models
from fewstep.distill.consistency import ConsistencyDistillation
from fewstep.distill.dmd2 import DMD2
from fewstep.distill.ladd import LADD
from fewstep.distill.scm import SCM
from fewstep.lightning.checkpoints import load_checkpoint
from fewstep.lightning.student_module import StudentModule
from fewstep.models.dit import DiT, PixArtBlock
from fewstep.models.lora import LoraSettings, add_lora, is_adapter
from fewstep.models.shadow_weights import ShadowWeights, trainable_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoraSettings(rank=2, target_modules=["attn.qkv", "mlp.fc1"])
TWO_OPTIMIZERS = Path(__file__).parents[1] / "configs/fsdp/pixart_xl_two_optimizers.yaml"


def overlay_units(path: Path) -> set[type]:
    """The classes an FSDP overlay's auto_wrap_policy names (the tests shard as it does)."""
    names = yaml.safe_load(path.read_text())["trainer"]["strategy"]["init_args"]
    split = (name.rpartition(".") for name in names["auto_wrap_policy"])
    return {getattr(importlib.import_module(module), cls) for module, _, cls in split}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> TinyTeacher:
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"), "flow", num_samples=16)


# --- θ⁻ on one process ----------------------------------------------------------------------


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    net = DiT(4, 2, 32, 1, 2, caption_channels=16, learn_sigma=False, sample_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net.requires_grad_(True)


def models_of(student: nn.Module) -> Models:
    process = RectifiedFlow()
    teacher = Denoiser(tiny_dit(), process, "velocity")
    return Models(Denoiser(student, process, "velocity"), teacher, process)


def step_student(net: nn.Module, seed: int) -> None:
    """A stand-in optimiser step: every trainable weight moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(net).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("lora", [False, True])
def test_target_prediction_equals_a_deep_copied_target_network(lora):
    """θ⁻ = shadow copies swapped into the student equals the deep-copied θ⁻ network the method
    kept before (updated by lerp over matching names); the student comes back bit for bit."""
    student = tiny_dit()
    if lora:
        add_lora(student, LORA)
        step_student(student, 0)  # LoRA B starts at 0: make the adapters matter
    models = models_of(student)
    method = ConsistencyDistillation(target_decay=0.7)
    method.setup(models)
    reference = copy.deepcopy(student).requires_grad_(False).eval()
    for seed in (1, 2):
        step_student(student, seed)
        method.after_student_step(models)
        with torch.no_grad():
            ref = dict(reference.named_parameters())
            for name, p in student.named_parameters():
                if p.requires_grad:
                    ref[name].lerp_(p, 1.0 - 0.7)
    shadows = method.target_parameter_names
    assert shadows == [n for n, p in student.named_parameters() if p.requires_grad]
    assert all(is_adapter(n) for n in shadows) == lora  # a LoRA θ⁻ shadows the adapters only
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    text, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    f = method.consistency_function(models.student)
    with torch.no_grad():
        target = Denoiser(reference, models.process, "velocity")
        expected = method.consistency_function(target)(x, t, text=text, text_mask=mask).x0
        with method.target_weights(student):
            got = f(x, t, text=text, text_mask=mask).x0
        own = f(x, t, text=text, text_mask=mask).x0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(own, expected)  # θ ≠ θ⁻, and the student is back to θ
    assert_close(before, {n: p.detach() for n, p in student.named_parameters()}, rtol=0, atol=0)
    assert student.training  # eval mode only inside the swap
    assert_close(
        dict(method.target_network.named_parameters()),
        dict(reference.named_parameters()),
        rtol=0,
        atol=0,
    )


def test_old_checkpoints_whole_target_network_still_loads():
    """The old θ⁻ state (the deep copy's whole state dict) restores the shadows."""
    models = models_of(tiny_dit())
    method = ConsistencyDistillation()
    method.setup(models)
    old = copy.deepcopy(models.student.net)
    step_student(old, 3)
    method.set_extra_state({"target": old.state_dict()})
    assert_close(
        dict(method.target_network.named_parameters()),
        dict(old.named_parameters()),
        rtol=0,
        atol=0,
    )


def test_shadow_shards_swap_in_place_and_restore_bit_for_bit():
    """The in-place path (FSDP shards) and the replacing path (full tensors) both compute with the
    shadows and leave the network's own values, identities and autograd untouched."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    own = [p.detach().clone() for p in params]
    values = [torch.randn_like(p) for p in params]
    reference = copy.deepcopy(net)
    with torch.no_grad():
        for p, v in zip(reference.parameters(), values, strict=True):
            p.copy_(v)
    x = torch.randn(5, 3)
    for full in ([True] * 4, [False] * 4, [True, False, False, True]):
        shadow = ShadowWeights(names, values, full)
        with torch.no_grad(), shadow.swapped_into(net):
            torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
        assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
        assert all(torch.equal(p, o) for p, o in zip(params, own, strict=True))
        net(x).sum().backward()  # still differentiable after the swap
        assert all(p.grad is not None for p in params)


# --- 2 processes ------------------------------------------------------------------------------


def student(teacher: TinyTeacher, method: nn.Module, lora: LoraSettings | None) -> StudentModule:
    pl.seed_everything(0, verbose=False)
    return StudentModule(
        str(teacher.config),
        str(teacher.ckpt),
        method,
        Consistency(steps=2),
        eval_steps=[1],
        teacher_sampler=Euler(steps=2),
        val_num_samples=0,
        lora=lora,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        disc_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )


def fit(
    module: StudentModule,
    teacher: TinyTeacher,
    steps: int,
    out: Path,
    every: int,
    ckpt_path: Path | None = None,
) -> pl.Trainer:
    """FSDP over 2 processes, batch 2 per rank, a checkpoint every ``every`` optimiser steps.
    FSDP units: one per PixArtBlock, the rest in the root (LCM), or those of
    configs/fsdp/pixart_xl_two_optimizers.yaml, also one per network and head set (two
    optimisers: FSDP1 keeps an optimiser's state per unit, so no unit may mix the student's
    parameters with those the second optimiser steps)."""
    two = module.method.num_optimizers == 2
    units = overlay_units(TWO_OPTIMIZERS) if two else {PixArtBlock}
    fsdp = CPUFSDPStrategy(
        auto_wrap_policy=units,
        state_dict_type="full",
        timeout=timedelta(seconds=120),  # a rank left waiting fails the test, not hangs it
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=fsdp,
        max_steps=steps,
        callbacks=[ModelCheckpoint(out, "{step}", every_n_train_steps=every, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = CachedLatentDataModule(str(teacher.cache), batch_size=2, val_fraction=0.25)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def _resume(rank: int, teacher: TinyTeacher, out: Path, make: Any, steps: int, every: int) -> None:
    """Fit ``steps`` steps; then a fresh module and trainer resume from step ``every`` to the
    same end and save ``resumed.ckpt``."""
    trainer = fit(make(), teacher, steps, out, every)
    names = [n for n, _ in trainer.lightning_module.student.named_parameters()]
    assert any("_fsdp_wrapped_module" in n for n in names)  # really sharded
    trainer = fit(make(), teacher, steps, out / "again", every, out / f"step={every}.ckpt")
    trainer.save_checkpoint(out / "resumed.ckpt")  # every rank: a collective


def run_and_resume(tmp_path: Path, teacher: TinyTeacher, make: Any, steps: int, every: int):
    """(uninterrupted, resumed) checkpoints of a 2-process FSDP fit."""
    on_two_ranks(_resume, teacher, tmp_path, make, steps, every)
    straight = load_checkpoint(tmp_path / f"step={steps}.ckpt")
    resumed = load_checkpoint(tmp_path / "resumed.ckpt")
    assert straight["global_step"] == resumed["global_step"] == steps
    return straight, resumed


class LCM:
    """Builds the LCM student (picklable for the forked workers)."""

    def __init__(self, teacher: TinyTeacher, lora: LoraSettings | None, decay: float) -> None:
        self.teacher, self.lora, self.decay = teacher, lora, decay

    def __call__(self) -> StudentModule:
        method = ConsistencyDistillation(num_solver_steps=10, target_decay=self.decay)
        return student(self.teacher, method, self.lora)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_lcm_under_fsdp_resumes_exactly_with_a_sharded_target(teacher, tmp_path, lora):
    """θ⁻ is sharded like the student and saved gathered, by full names; a run resumed at step 2
    of 4 ends bit-identical (student and θ⁻). A LoRA θ⁻ holds the adapters only; with decay 0
    θ⁻ is θ after every step, with decay 0.5 it lags behind."""
    decay = 0.0 if lora else 0.5
    straight, resumed = run_and_resume(tmp_path, teacher, LCM(teacher, lora, decay), 4, 2)
    assert_close(straight["state_dict"], resumed["state_dict"], rtol=0, atol=0)
    target = straight["state_dict"]["method._extra_state"]["target"]
    weights = {k.removeprefix("student."): v for k, v in straight["state_dict"].items()}
    reference = LCM(teacher, lora, decay)().student  # one process: the full parameter shapes
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert {n: tuple(t.shape) for n, t in target.items()} == {
        n: tuple(p.shape) for n, p in trainable.items()
    }
    assert all(is_adapter(n) for n in target) == (lora is not None)
    moved = [not torch.equal(target[n], trainable[n].detach()) for n in target]
    assert any(moved)  # θ⁻ follows the trained student
    if decay == 0.0:
        assert_close(target, {n: weights[n] for n in target}, rtol=0, atol=0)
    else:  # every weight the student moved, θ⁻ follows only halfway
        trained = [n for n in target if not torch.equal(weights[n], trainable[n].detach())]
        assert trained and not any(torch.equal(target[n], weights[n]) for n in trained)


class DMD2Student:
    """Builds the DMD2 student: 2 fake-score steps per student step, backward simulation."""

    def __init__(self, teacher: TinyTeacher, gan_weight: float) -> None:
        self.teacher, self.gan_weight = teacher, gan_weight

    def __call__(self) -> StudentModule:
        method = DMD2(
            fake_steps_per_generator_step=2,
            gan_weight=self.gan_weight,
            head_hidden=8,
            head_cond_dim=8,
        )
        return student(self.teacher, method, None)


@pytest.mark.parametrize("gan_weight", [0.0, 0.5], ids=["dmd", "gan"])
def test_dmd2_under_fsdp_resumes_exactly(teacher, tmp_path, gan_weight):
    """DMD2's manual student and fake-score steps run under FSDP (each loss a root forward of its
    own); 4 batches = 6 optimiser steps (student steps at 0 and 3), resumed at step 3, end
    bit-identical: student, fake score and GAN heads."""
    straight, resumed = run_and_resume(tmp_path, teacher, DMD2Student(teacher, gan_weight), 6, 3)
    state = straight["state_dict"]
    assert_close(state, resumed["state_dict"], rtol=0, atol=0)
    initial = DMD2Student(teacher, gan_weight)().state_dict()
    for prefix in ("student.", "method.fake_score.", *(["method.heads."] if gan_weight else [])):
        keys = [k for k in state if k.startswith(prefix)]
        assert keys and any(not torch.equal(state[k], initial[k]) for k in keys), prefix


class LADDStudent:
    """Builds the LADD student: heads on both teacher blocks (the teacher's forward runs whole
    under FSDP), the optional distillation regression to CFG teacher samples."""

    def __init__(self, teacher: TinyTeacher) -> None:
        self.teacher = teacher

    def __call__(self) -> StudentModule:
        method = LADD(
            head_hidden=8, head_cond_dim=8, distill_weight=0.5, teacher_samples_per_step=1
        )
        return student(self.teacher, method, None)


def test_ladd_under_fsdp_resumes_exactly(teacher, tmp_path):
    """LADD's student and head steps run under FSDP with the two-optimiser overlay's units (the
    frozen teacher a unit of its own, its features read from a whole forward); 3 batches = 6
    optimiser steps, resumed at step 2, end bit-identical: student and heads, both trained."""
    straight, resumed = run_and_resume(tmp_path, teacher, LADDStudent(teacher), 6, 2)
    state = straight["state_dict"]
    assert_close(state, resumed["state_dict"], rtol=0, atol=0)
    initial = LADDStudent(teacher)().state_dict()
    for prefix in ("student.", "method.heads."):
        keys = [k for k in state if k.startswith(prefix)]
        assert keys and any(not torch.equal(state[k], initial[k]) for k in keys), prefix


class SCMStudent:
    """Builds the sCM student (finite-difference tangent, adaptive weight w_φ, LADD heads)."""

    def __init__(self, teacher: TinyTeacher, ladd: bool, tangent: str = "finite_difference"):
        self.teacher, self.ladd, self.tangent = teacher, ladd, tangent

    def __call__(self) -> StudentModule:
        heads = LADD(feature_blocks=[-1], head_hidden=8, head_cond_dim=8) if self.ladd else None
        method = SCM(tangent=self.tangent, warmup_steps=2, weight_channels=8, ladd=heads)
        return student(self.teacher, method, None)


@pytest.mark.parametrize("ladd", [False, True], ids=["weight", "weight_ladd"])
def test_scm_under_fsdp_resumes_exactly(teacher, tmp_path, ladd):
    """sCM (finite-difference tangents: forwards only) with its learned weight w_φ, alone or with
    LADD's heads, as the second optimiser's units; 3 batches = 6 optimiser steps, resumed at
    step 2, end bit-identical: student, w_φ, heads and the tangent warm-up clock."""
    straight, resumed = run_and_resume(tmp_path, teacher, SCMStudent(teacher, ladd), 6, 2)
    state = straight["state_dict"]
    assert_close(state, resumed["state_dict"], rtol=0, atol=0)
    assert int(state["method.student_steps"]) == 3  # one student step per batch
    initial = SCMStudent(teacher, ladd)().state_dict()
    prefixes = ["student.", "method.weight_net.", *(["method.ladd.heads."] if ladd else [])]
    for prefix in prefixes:
        keys = [k for k in state if k.startswith(prefix)]
        assert keys and any(not torch.equal(state[k], initial[k]) for k in keys), prefix


# --- the FLUX.1-dev LCM-LoRA recipe ------------------------------------------------------------

FLUX_OVERLAY = TWO_OPTIMIZERS.with_name("flux.yaml")
FLUX_TWO_OPTIMIZERS = TWO_OPTIMIZERS.with_name("flux_two_optimizers.yaml")
# the recipe with DMD2 (GAN head on the last single block) instead of LCM: the issue's
# FLUX.1-dev LoRA DMD2 step, with the two-optimiser overlay's units
FLUX_DMD2 = [
    "--model.init_args.method=fewstep.distill.dmd2.DMD2",
    "--model.init_args.method.init_args.fake_steps_per_generator_step=1",
    "--model.init_args.method.init_args.gan_weight=0.5",
    "--model.init_args.method.init_args.head_hidden=8",
    "--model.init_args.method.init_args.head_cond_dim=8",
    "--model.init_args.disc_optimizer=torch.optim.AdamW",
    "--model.init_args.disc_optimizer.lr=0.001",
]


def wrap_policy_arg(path: Path) -> str:
    """The overlay's auto_wrap_policy as a command-line setting for the CPU FSDP strategy."""
    names = yaml.safe_load(path.read_text())["trainer"]["strategy"]["init_args"]
    return f"--trainer.strategy.auto_wrap_policy=[{', '.join(names['auto_wrap_policy'])}]"


def _flux_recipe(
    rank: int, flux: dict[str, Path], out: Path, steps: int, resume: str, extra: list[str]
) -> None:
    """configs/student/lcm_flux_dev_lora.yaml (rank-64 LoRA, θ⁻ at decay 0.95) on the tiny
    FLUX.1 folder, FSDP over the Flux overlay's units, ``steps`` steps into ``out`` (resumed from
    the run in ``resume``, if given); ``extra``: further settings (another method, its units)."""
    ckpt = [f"--ckpt_path={next((out.parent / resume).rglob('last.ckpt'))}"] if resume else []
    recipe = [
        "-c",
        str(STUDENT),
        *cpu_args(flux, out),
        "--model.init_args.teacher_config",
        str(teacher_copy(flux)),
        "--model.init_args.eval_steps=[1]",
        "--trainer.devices=2",
        "--trainer.strategy=test_distributed.CPUFSDPStrategy",
        wrap_policy_arg(FLUX_OVERLAY),
        "--trainer.strategy.state_dict_type=full",
        "--trainer.limit_val_batches=0",
        "--data.init_args.batch_size=2",
        f"--trainer.max_steps={steps}",
    ]
    run(["fit", *recipe, *extra, *ckpt])


def _flux_runs(
    rank: int, flux: dict[str, Path], out: Path, steps: int, every: int, extra: list[str]
) -> None:
    """The straight run, its first part and the resumed rest, in one pair of processes (three
    CLI fits after each other, as the CLI allows since every rank asks ``trainer.log_dir``)."""
    for name, n, resume in (
        ("straight", steps, ""),
        ("first", every, ""),
        ("resumed", steps, "first"),
    ):
        _flux_recipe(rank, flux, out / name, n, resume, extra)


def flux_run_and_resume(flux: dict[str, Path], out: Path, steps: int, every: int, *extra: str):
    """(uninterrupted, resumed) last checkpoints of the Flux recipe on 2 processes."""
    on_two_ranks(_flux_runs, flux, out, steps, every, list(extra))
    straight, resumed = (
        load_checkpoint(next((out / name).rglob("last.ckpt"))) for name in ("straight", "resumed")
    )
    assert straight["global_step"] == resumed["global_step"] == steps
    assert_close(straight["state_dict"], resumed["state_dict"], rtol=0, atol=0)
    return straight


def test_flux_dev_lcm_lora_recipe_under_fsdp_resumes_exactly(flux_dev, tmp_path):  # noqa: F811
    """The recipe's step 3 (docs/distributed.md) on 2 processes: θ⁻ holds the adapters only,
    gathered, and a run resumed at step 2 of 3 ends bit-identical (adapters and θ⁻)."""
    straight = flux_run_and_resume(flux_dev, tmp_path, 3, 2)
    state = straight["state_dict"]
    adapters = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    target = state["method._extra_state"]["target"]
    assert adapters and all(is_adapter(n) for n in adapters)
    assert {n: v.shape for n, v in target.items()} == {n: v.shape for n, v in adapters.items()}
    assert any(not torch.equal(target[n], adapters[n]) for n in target)  # θ⁻ lags (decay 0.95)


def test_flux_dev_dmd2_lora_under_fsdp_resumes_exactly(flux_dev, tmp_path):  # noqa: F811
    """The recipe with DMD2 and its GAN head (a rank-64 LoRA student, a full fake score, heads)
    under the units of configs/fsdp/flux_two_optimizers.yaml on 2 processes: a run resumed at
    step 2 of 4 (student and fake-score steps alternate) ends bit-identical, and adapters, fake
    score and heads all train; only the student's adapters are saved."""
    straight = flux_run_and_resume(
        flux_dev, tmp_path, 4, 2, *FLUX_DMD2, wrap_policy_arg(FLUX_TWO_OPTIMIZERS)
    )
    state = straight["state_dict"]
    student = [k for k in state if k.startswith("student.")]
    assert student and all(is_adapter(k) for k in student)
    halfway = load_checkpoint(next((tmp_path / "first").rglob("last.ckpt")))["state_dict"]
    for prefix in ("student.", "method.fake_score.", "method.heads."):  # steps 2 and 3 train all
        keys = [k for k in state if k.startswith(prefix)]
        assert keys and any(not torch.equal(state[k], halfway[k]) for k in keys), prefix


def _refused(rank: int, teacher: TinyTeacher, out: Path) -> None:
    """Three FSDP set-ups that cannot work, each refused on every rank with one clear error."""
    errors = {}
    for name, make, units, strategy in (
        ("two_optimisers_root", DMD2Student(teacher, 0.0), {PixArtBlock}, "FULL_SHARD"),
        ("shard_grad_op", LCM(teacher, None, 0.5), {PixArtBlock}, "SHARD_GRAD_OP"),
        ("scm_jvp", SCMStudent(teacher, False, "jvp"), overlay_units(TWO_OPTIMIZERS), "FULL_SHARD"),
    ):
        fsdp = CPUFSDPStrategy(
            auto_wrap_policy=units, sharding_strategy=strategy, timeout=timedelta(seconds=120)
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=fsdp,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        data = CachedLatentDataModule(str(teacher.cache), batch_size=2, val_fraction=0.25)
        try:
            trainer.fit(make(), data)
        except ValueError as err:
            errors[name] = str(err)
    torch.save(errors, out / f"refused{rank}.pt")


def test_fsdp_setups_that_cannot_work_are_refused_with_the_fix(teacher, tmp_path):
    """DMD2 with the student's and the fake score's embedders in one root unit (the block-only
    wrap policy) names the two-optimiser overlay; LCM under SHARD_GRAD_OP names the sharding fix;
    sCM's JVP tangent (torch.func.jvp crashes through FSDP units) names the finite-difference
    tangent. Each is raised at fit start, before any step."""
    on_two_ranks(_refused, teacher, tmp_path)
    for rank in range(2):
        errors = torch.load(tmp_path / f"refused{rank}.pt")
        assert "root FSDP unit holds trainable parameters" in errors["two_optimisers_root"]
        assert "fewstep.models.dit.DiT" in errors["two_optimisers_root"]
        assert "configs/fsdp/pixart_xl_two_optimizers.yaml" in errors["two_optimisers_root"]
        assert (
            "FULL_SHARD" in errors["shard_grad_op"] and "SHARD_GRAD_OP" in errors["shard_grad_op"]
        )
        assert "tangent: finite_difference" in errors["scm_jvp"]
