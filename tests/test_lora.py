"""LoRA students (peft) of a DiT and a Flux teacher: adapters and trainable parameters as
configured, only the adapters in the optimiser, the EMA and the checkpoint (base weights by
sha256), exact resume, merged export = the unmerged student, and the adapters loaded by diffusers
(FluxPipeline.load_lora_weights) / peft (PixArt-Σ transformer) reproduce the student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, PixArtTransformer2DModel
from peft import PeftModel
from student_fixtures import (
    CONFIGS,
    LATENT_CHANNELS,
    TEXT_DIM,
    TinyTeacher,
    build_tiny_cache,
    build_tiny_vae,
    checkpoint_every,
    cpu_student_config,
    teacher_yaml,
    train_flux_teacher,
    train_tiny_teacher,
)
from test_dit import NO_SIZE_COND
from test_flux import diffusers_out as flux_diffusers_out
from test_student import OneBatchData, Regression, trainer
from torch import nn

from fewstep.cli import run
from fewstep.diffusion.samplers import Euler
from fewstep.export.lora import DIFFUSERS_FILE, export_lora
from fewstep.lightning.checkpoints import load_trained
from fewstep.lightning.ema import EMA
from fewstep.lightning.student_module import StudentModule, TeacherMismatchError
from fewstep.models import dit_convert, flux_convert
from fewstep.models.lora import DIT_TARGETS, FLUX_TARGETS, LoraSettings, merged

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["dit", "flux"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, TinyTeacher]:
    """A tiny DiT and a tiny Flux rectified-flow teacher on one cache."""
    root = tmp_path_factory.mktemp("lora_teachers")
    vae = build_tiny_vae(root / "vae")
    cache = build_tiny_cache(root / "cache", vae, num_samples=16)
    config = root / "teacher_dit.yaml"
    config.write_text(yaml.safe_dump(teacher_yaml(cache, vae)))
    ckpt = train_tiny_teacher(config, root / "dit.ckpt", cache)
    dit = TinyTeacher(root, config, ckpt, cache, vae, "flow")
    flux = train_flux_teacher(root, cache, vae, guidance_embed=False)
    return {"dit": dit, "flux": flux}


def lora_student(teacher: TinyTeacher, lora: LoraSettings | None) -> StudentModule:
    torch.manual_seed(0)
    return StudentModule(
        str(teacher.config),
        str(teacher.ckpt),
        Regression(),
        sampler=Euler(steps=2),
        eval_steps=[1],
        val_num_samples=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        lora=lora,
    )


def data(teacher: TinyTeacher, family: str) -> OneBatchData:
    pooled = "mean_tokens" if family == "flux" else "none"
    return OneBatchData(str(teacher.cache), batch_size=4, val_fraction=0.25, pooled_text=pooled)


def expected_adapters(net: nn.Module, targets: list[str], rank: int) -> tuple[set[str], int]:
    """The linears whose names equal or end with ``.<target>``, and r (in + out) summed."""
    names, count = set(), 0
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            names.add(name)
            count += rank * (module.in_features + module.out_features)
    return names, count


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_and_trainable_parameters_are_as_configured(teachers, family):
    default = DIT_TARGETS if family == "dit" else FLUX_TARGETS
    custom = ["attn.qkv"] if family == "dit" else ["img_attn.qkv", "linear2"]
    for targets, rank in ((None, 4), (custom, 2)):
        module = lora_student(teachers[family], LoraSettings(rank=rank, target_modules=targets))
        names, count = expected_adapters(module.teacher, targets or default, rank)
        assert set(module.lora_modules) == names
        assert len(names) == (7 if family == "dit" else 10) or targets is not None
        trainable = [(n, p) for n, p in module.student.named_parameters() if p.requires_grad]
        assert sum(p.numel() for _, p in trainable) == count
        assert all(".lora_A." in n or ".lora_B." in n for n, _ in trainable)
        optimised = module.configure_optimizers()["optimizer"].param_groups[0]["params"]
        assert sum(p.numel() for p in optimised) == count
    with pytest.raises(ValueError, match="lora.target_modules"):
        lora_student(teachers[family], LoraSettings(target_modules=["no_such_layer"]))


def fit(module: StudentModule, teacher, family, root: Path, steps: int, ckpt=None) -> EMA:
    ema = EMA(decay=0.5)
    trainer(steps, root, callbacks=[ema]).fit(module, data(teacher, family), ckpt_path=ckpt)
    return ema


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_and_ema_hold_only_the_adapters_and_resume_exactly(teachers, family, tmp_path):
    teacher, lora = teachers[family], LoraSettings(rank=2, alpha=4.0)
    full = lora_student(teacher, lora)
    full_ema = fit(full, teacher, family, tmp_path / "full", 4)
    part = lora_student(teacher, lora)
    fit(part, teacher, family, tmp_path / "part", 2)
    halfway = {k: v.clone() for k, v in part.student.state_dict().items()}
    ckpt = tmp_path / "step2.ckpt"
    part.trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    state = saved["state_dict"]
    student_keys = {k.removeprefix("student.") for k in state if k.startswith("student.")}
    adapters = {n for n, p in part.student.named_parameters() if p.requires_grad}
    assert student_keys == adapters and all(".lora_" in k for k in adapters)
    assert not any(k.startswith("teacher.") for k in state)
    assert set(saved["callbacks"]["EMA"]["shadow"]) == adapters
    assert saved["student_base"]["sha256"] == saved["teacher"]["sha256"]
    resumed = lora_student(teacher, lora)
    resumed_ema = fit(resumed, teacher, family, tmp_path / "resumed", 4, ckpt)
    final, again = full.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert any(not torch.equal(final[k], halfway[k]) for k in adapters)  # steps 3-4 trained
    assert full_ema.names == resumed_ema.names
    assert all(torch.equal(a, b) for a, b in zip(full_ema.shadow, resumed_ema.shadow, strict=True))
    with pytest.raises(TeacherMismatchError, match="LoRA"):
        lora_student(teacher, None).on_load_checkpoint(saved)


def random_adapters(module: StudentModule) -> None:
    """Non-zero adapters (B starts at zero), as after training."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in module.student.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.2)


def dit_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, LATENT_CHANNELS, 16, 16, generator=g)
    text, mask = torch.randn(2, 6, TEXT_DIM, generator=g), torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return {"x": x, "t": torch.tensor([700.0, 250.0]), "text": text, "text_mask": mask}


def flux_inputs():
    inp = dit_inputs()
    inp["cond"] = torch.randn(2, TEXT_DIM, generator=torch.Generator().manual_seed(6))
    inp["guidance"] = None
    return inp


def ours(net: nn.Module, inp: dict) -> torch.Tensor:
    extra = {"cond": inp["cond"]} if "cond" in inp else {}
    return net.eval()(inp["x"], inp["t"], inp["text"], inp["text_mask"], **extra)


@torch.no_grad()
def test_merged_and_diffusers_loaded_dit_lora_reproduce_the_student(teachers, tmp_path):
    module = lora_student(teachers["dit"], LoraSettings(rank=3, alpha=6.0))
    random_adapters(module)
    inp = dit_inputs()
    student = ours(module.student, inp)
    assert (student - ours(module.teacher, inp)).abs().max() > 1e-2  # the adapters matter
    assert (ours(merged(module.student), inp) - student).abs().max() <= 1e-5
    folder = export_lora(module.student, tmp_path / "lora")
    base = dit_convert.to_diffusers(module.teacher).eval()  # the base weights, as diffusers
    adapted = PeftModel.from_pretrained(base, folder).eval()
    theirs = adapted(
        inp["x"],
        encoder_hidden_states=inp["text"],
        encoder_attention_mask=inp["text_mask"].float(),
        timestep=inp["t"],
        added_cond_kwargs=NO_SIZE_COND,
    ).sample
    assert (theirs - student).abs().max() <= 1e-4
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3
    assert "transformer_blocks.0.attn1.to_q" in config["target_modules"]  # fused qkv, split


@torch.no_grad()
def test_merged_and_diffusers_loaded_flux_lora_reproduce_the_student(teachers, tmp_path):
    module = lora_student(teachers["flux"], LoraSettings(rank=3, alpha=1.5))
    random_adapters(module)
    inp = flux_inputs()
    student = ours(module.student, inp)
    assert (student - ours(module.teacher, inp)).abs().max() > 1e-2
    assert (ours(merged(module.student), inp) - student).abs().max() <= 1e-5
    folder = export_lora(module.student, tmp_path / "lora")
    base = flux_convert.to_diffusers(module.teacher).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=base,
    )
    pipe.load_lora_weights(folder, weight_name=DIFFUSERS_FILE)
    theirs = flux_diffusers_out(pipe.transformer.eval(), inp)
    assert (theirs - student).abs().max() <= 1e-4


def test_fewstep_fit_and_export_a_lora_student(teachers, tmp_path):
    """`fewstep fit` with lora options, then `fewstep export --lora_out`: the merged pipeline's
    transformer and the LoRA folder on the base both reproduce the checkpoint's EMA student."""
    teacher = teachers["dit"]
    config = cpu_student_config(CONFIGS / "student/progressive_shapes.yaml", teacher, tmp_path)
    checkpoint_every(config, 1, max_steps=2, limit_val_batches=0)
    lora = ["--model.init_args.lora.rank=2", "--model.init_args.lora.alpha=4"]
    lora.append("--model.init_args.optimizer.init_args.lr=1.0")  # adapters far from B = 0
    cli = run(["fit", "-c", str(config), *lora])
    assert cli.model.lora == LoraSettings(rank=2, alpha=4.0)
    (ckpt,) = tmp_path.rglob("last.ckpt")
    fit_yaml = next(tmp_path.rglob("config.yaml"))
    out = ["--out", str(tmp_path / "pipe"), "--lora_out", str(tmp_path / "lora")]
    result = run(["export", "--config", str(fit_yaml), "--ckpt_path", str(ckpt), *out])
    module, _, weights = load_trained(fit_yaml, ckpt)
    assert weights == "ema"
    inp = dit_inputs()
    with torch.no_grad():
        student = ours(module.student, inp)
        assert (student - ours(module.teacher, inp)).abs().max() > 1e-3
        exported = PixArtTransformer2DModel.from_pretrained(
            Path(result["pipeline"]) / "transformer"
        )
        base = dit_convert.to_diffusers(module.teacher).eval()
        adapted = PeftModel.from_pretrained(base, result["lora"]).eval()
        for transformer in (exported.eval(), adapted):
            theirs = transformer(
                inp["x"],
                encoder_hidden_states=inp["text"],
                encoder_attention_mask=inp["text_mask"].float(),
                timestep=inp["t"],
                added_cond_kwargs=NO_SIZE_COND,
            ).sample
            assert (theirs - student).abs().max() <= 1e-4
