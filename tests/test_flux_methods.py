"""LADD, DMD2's GAN head, sCM and reflow couplings with a Flux teacher: the discriminator features
LADD reads from Flux are the image tokens of its double and single blocks (checked against Flux's
forward replayed by hand); sCM's JVP tangent through Flux's joint attention and RoPE equals central
differences and a guidance-embedded (FLUX.1-dev style) teacher keeps its one-pass guidance in
TrigFlow; each method's YAML fits and validates on the tiny Flux teachers of test_flux_student;
`fewstep couplings` samples a Flux teacher with its pooled vector and the reflow student trains on
them."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from student_fixtures import (
    CONFIGS,
    checkpoint_every,
    couplings_args,
    cpu_student_config,
    flux_data,
)
from test_flux_cache import FakeVAE
from test_flux_student import teachers  # noqa: F401  (teachers: fixture)

from fewstep.cli import run
from fewstep.data.cache import LatentCache
from fewstep.data.cache_builder import build_cache
from fewstep.data.couplings import CouplingDataModule, build_couplings
from fewstep.data.datamodule import mean_tokens
from fewstep.data.shapes import ShapesWorld
from fewstep.diffusion.guidance import GuidanceEmbedded
from fewstep.diffusion.samplers import Consistency, Euler
from fewstep.diffusion.schedules import RectifiedFlow
from fewstep.diffusion.trigflow import TrigFlowDenoiser, trig_velocity
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.dmd2 import DMD2
from fewstep.distill.ladd import LADD
from fewstep.distill.scm import SCM
from fewstep.lightning.checkpoints import load_teacher
from fewstep.lightning.sampling import as_null_text, generate
from fewstep.lightning.teacher_module import network_denoiser
from fewstep.models.flux import Flux
from fewstep.models.flux_layers import joint_mask, pack_latents
from fewstep.utils.seeding import fixed_noise

pytestmark = pytest.mark.usefixtures("one_thread")

B, C, HW, L, TEXT, POOLED, WIDTH, SCALE = 3, 4, 8, 5, 16, 12, 32, 2.0
N_IMAGE = (HW // 2) ** 2  # 2x2 packing: 16 image tokens (L = 5 text tokens come first)


def tiny_flux_models(guidance_embed: bool = False, seed: int = 0) -> Models:
    """A frozen tiny Flux teacher (2 double + 2 single blocks, perturbed) and its trainable copy
    as the StudentModule builds them (guidance-embedded: fed ``guidance=SCALE`` by default)."""
    torch.manual_seed(seed)
    net = Flux(
        in_channels=C,
        hidden_size=WIDTH,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        context_in_dim=TEXT,
        vec_in_dim=POOLED,
        axes_dim=(4, 6, 6),
        guidance_embed=guidance_embed,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = copy.deepcopy(net)
    net.requires_grad_(False).eval()
    process = RectifiedFlow()
    return Models(
        student=network_denoiser(student, process, "velocity", SCALE),
        teacher=network_denoiser(net, process, "velocity", SCALE),
        process=process,
        student_sampler=Euler(steps=4),
        teacher_sampler=Euler(steps=2),
        guidance_scale=SCALE,
    )


def flux_batch(seed: int = 1) -> DistillBatch:
    """Padded text (first caption 3 of 5 tokens) with pooled vectors and the null ones."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return DistillBatch(
        latents=torch.randn(B, C, HW, HW, generator=g),
        text=torch.randn(B, L, TEXT, generator=g) * mask[..., None],
        text_mask=mask,
        null_text=torch.zeros(B, 2, TEXT),
        null_mask=torch.ones(B, 2, dtype=torch.bool),
        generator=torch.Generator().manual_seed(seed + 100),
        pooled=torch.randn(B, POOLED, generator=g),
        null_pooled=torch.zeros(B, POOLED),
    )


def replayed_block_images(net: Flux, x, model_t, text, mask, cond) -> list[torch.Tensor]:
    """The image tokens after every block, from Flux.forward's steps replayed by hand: the image
    stream of each double block, then the image part [L:] of each single block's joint sequence."""
    b, _, h, w = x.shape
    img, txt = net.img_in(pack_latents(x)), net.txt_in(text)
    vec = net.vector(model_t, cond, None, b, img.dtype)
    rope, key_mask = net.rope(txt.shape[1], h // 2, w // 2, x.device), joint_mask(mask, N_IMAGE)
    out = []
    for block in net.double_blocks:
        img, txt = block(img, txt, vec, rope, key_mask)
        out.append(img)
    joint = torch.cat([txt, img], dim=1)  # [B, L + N, D]
    for block in net.single_blocks:
        joint = block(joint, vec, rope, key_mask)
        out.append(joint[:, txt.shape[1] :])
    return out


# ------------------------------------------------------------------ LADD's features from Flux
def test_ladd_reads_the_image_tokens_of_flux_double_and_single_blocks():
    models = tiny_flux_models()
    method = LADD(feature_blocks=None, head_hidden=16, head_cond_dim=16)
    method.setup(models)
    assert method.block_indices == [0, 1, 2, 3]  # 2 double, then 2 single blocks
    heads = method.heads.heads
    assert heads[0].norm.normalized_shape == (WIDTH,)
    assert method.heads.condition.text.in_features == TEXT  # the T5 stream's width
    batch, t = flux_batch(), torch.tensor([0.3, 0.6, 0.9])
    x_t = models.process.add_noise(batch.latents, torch.randn_like(batch.latents), t)
    features = method.teacher_features(models.teacher, x_t, t, batch.cond)
    assert [f.shape for f in features] == [torch.Size([B, N_IMAGE, WIDTH])] * 4  # no text tokens
    with torch.no_grad():
        model_t = models.process.model_time(t).float()
        reference = replayed_block_images(
            models.teacher.net, x_t, model_t, batch.text, batch.text_mask, batch.pooled
        )
    for got, want in zip(features, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    logits = method.head_logits(features, t, (HW, HW), batch.cond, models)
    assert [lg.shape for lg in logits] == [torch.Size([B, N_IMAGE])] * 4  # the 4x4 token grid


def test_ladd_stops_flux_after_the_deepest_double_block():
    models = tiny_flux_models()
    method = LADD(feature_blocks=[1], head_hidden=16, head_cond_dim=16)
    method.setup(models)
    single_calls: list[int] = []
    models.teacher.net.single_blocks[0].register_forward_hook(lambda *a: single_calls.append(1))
    batch, t = flux_batch(), torch.full((B,), 0.5)
    (feature,) = method.teacher_features(models.teacher, batch.latents, t, batch.cond)
    assert feature.shape == (B, N_IMAGE, WIDTH) and single_calls == []


def test_ladd_trains_on_a_guidance_embedded_flux_teacher():
    models = tiny_flux_models(guidance_embed=True)
    method = LADD(feature_blocks=[0, -1], real="teacher", distill_weight=0.5, head_hidden=16)
    method.setup(models)
    guidance: list[torch.Tensor] = []
    models.teacher.net.register_forward_pre_hook(
        lambda m, args, kwargs: guidance.append(kwargs["guidance"]), with_kwargs=True
    )
    batch = flux_batch()
    g_loss, g_logs = method.generator_loss(batch, models)
    g_loss.backward()
    d_loss, d_logs = method.discriminator_loss(batch, models)
    d_loss.backward()
    assert torch.isfinite(g_loss) and torch.isfinite(d_loss) and "g_distill" in g_logs
    assert all(bool((s == SCALE).all()) for s in guidance)  # features and samples at the scale
    assert all(p.grad is not None for p in method.heads.parameters())


# ------------------------------------------------------------------ DMD2's GAN head on Flux
def test_dmd2_gan_head_reads_a_guidance_embedded_flux_fake_score():
    models = dataclasses.replace(
        tiny_flux_models(guidance_embed=True), student_sampler=Consistency(steps=4)
    )
    method = DMD2(gan_weight=0.5, gan_head_weight=1.0, gan_feature_blocks=[0, -1], head_hidden=16)
    method.setup(models)
    fake = method.fake_denoiser(models)
    assert isinstance(fake, GuidanceEmbedded) and fake.scale == SCALE  # the teacher's kind
    assert method.block_indices == [0, 3]  # the first double and the last single block
    seen: list = []
    method.heads.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = flux_batch()
    loss, logs = method.discriminator_loss(batch, models)
    loss.backward()
    assert [f.shape for f in seen[0]] == [torch.Size([2 * B, N_IMAGE, WIDTH])] * 2
    assert torch.isfinite(logs["d_gan"]) and method.heads.heads[1].out.weight.grad is not None


# ------------------------------------------------------------------ sCM through Flux
@pytest.mark.parametrize("guidance_embed", [False, True])
def test_scm_jvp_through_flux_equals_central_differences(guidance_embed):
    """The JVP tangent (math SDPA kernel, RoPE, QK-norm, padded text, pooled cond) against a
    central difference along the same line; in float64 apart from Flux's float32 RoPE."""
    models = tiny_flux_models(guidance_embed)
    models.student.net.double()
    method = SCM(tangent="jvp")
    batch = flux_batch()
    batch = dataclasses.replace(batch, text=batch.text.double(), pooled=batch.pooled.double())
    student = method.student_denoiser(models.student)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, HW, HW, generator=g, dtype=torch.float64)
    velocity = torch.randn(B, C, HW, HW, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 0.8, 1.2], dtype=torch.float64)
    jvp = method.student_tangent(student, x, t, velocity, batch)
    method.tangent, method.finite_difference_epsilon = "finite_difference", 1e-4
    central = method.student_tangent(student, x, t, velocity, batch)
    assert jvp.abs().mean() > 1e-3
    torch.testing.assert_close(jvp, central, rtol=0, atol=2e-3 * float(jvp.abs().max()))


def test_scm_teacher_velocity_of_a_guidance_embedded_flux_is_one_pass_at_the_scale():
    models = tiny_flux_models(guidance_embed=True)
    calls: list[tuple[int, torch.Tensor]] = []
    models.teacher.net.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs["guidance"])),
        with_kwargs=True,
    )
    batch, t = flux_batch(), torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64)
    x = batch.latents
    got = SCM().teacher_velocity(x, t, batch, models)
    assert len(calls) == 1 and calls[0][0] == B and bool((calls[0][1] == SCALE).all())
    plain = TrigFlowDenoiser.wrap(models.teacher)  # drops the default: give it explicitly
    with torch.no_grad():
        guided = plain(x, t, guidance=torch.full((B,), SCALE), **batch.cond)
    torch.testing.assert_close(got, trig_velocity(guided, t).to(x.dtype), rtol=0, atol=0)


def test_scm_trains_a_guidance_embedded_flux_student_with_pooled_cond():
    models = dataclasses.replace(
        tiny_flux_models(guidance_embed=True), student_sampler=Consistency(steps=2)
    )
    conds: list[torch.Tensor] = []
    models.student.net.register_forward_pre_hook(
        lambda m, args, kwargs: conds.append(kwargs["cond"]), with_kwargs=True
    )
    method, batch = SCM(warmup_steps=0), flux_batch()
    loss, logs = method.generator_loss(batch, models)
    loss.backward()
    assert torch.isfinite(loss) and conds and all(torch.equal(c, batch.pooled) for c in conds)
    grads = [p.grad for p in models.student.net.parameters() if p.grad is not None]
    assert sum(float(g.abs().sum()) for g in grads) > 0
    sample = models.student_sampler(
        method.student_denoiser(models.student).bind(**batch.cond), torch.randn(B, C, HW, HW)
    )
    assert sample.shape == (B, C, HW, HW) and torch.isfinite(sample).all()


# ------------------------------------------------------------------ the YAMLs on Flux teachers
def fit_then_validate(config: Path, *extra: str) -> tuple[dict, dict]:
    """`fewstep fit` (3 batches) then `fewstep validate`: (fit metrics, validation metrics)."""
    args = ["-c", str(config), "--data.init_args.pooled_text=mean_tokens", *extra]
    fit = run(["fit", *args, "--trainer.fast_dev_run=3"]).trainer.callback_metrics
    val = run(["validate", *args, "--trainer.limit_val_batches=1"]).trainer.callback_metrics
    return as_floats(fit), as_floats(val)


def as_floats(metrics: dict) -> dict[str, float]:
    """Logged metrics as floats, each checked finite."""
    out = {k: float(v) for k, v in metrics.items()}
    assert all(math.isfinite(v) for v in out.values()), out
    return out


def assert_student_validated(val: dict[str, float], teacher_nfe: int) -> None:
    """1- and 2-step students were compared with the teacher's reference samples."""
    assert val["val/teacher/nfe"] == teacher_nfe
    assert val["val/student_1/nfe"] == 1 and val["val/student_2/nfe"] == 2
    assert val["val/student_1/latent_mse"] > 0


def test_ladd_config_distils_a_guidance_embedded_flux_teacher(teachers, tmp_path):  # noqa: F811
    config = cpu_student_config(CONFIGS / "student/ladd_shapes.yaml", teachers[True], tmp_path)
    fit, val = fit_then_validate(config)
    assert {"train/disc_d_hinge", "train/g_adv"} <= set(fit)
    assert_student_validated(val, teacher_nfe=2)  # 2 Euler steps, one pass each


def test_dmd2_config_with_gan_head_distils_a_flux_teacher(teachers, tmp_path):  # noqa: F811
    config = cpu_student_config(CONFIGS / "student/dmd2_shapes.yaml", teachers[False], tmp_path)
    method = "--model.init_args.method.init_args"
    fit, val = fit_then_validate(
        config, f"{method}.gan_weight=0.1", f"{method}.gan_feature_blocks=[0,-1]"
    )
    assert {"train/disc_d_gan", "train/g_gan"} <= set(fit)
    assert_student_validated(val, teacher_nfe=4)  # 2 Euler steps of two-pass CFG


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_scm_config_distils_a_flux_teacher(teachers, tmp_path, guidance_embed):  # noqa: F811
    config = cpu_student_config(
        CONFIGS / "student/scm_shapes.yaml", teachers[guidance_embed], tmp_path
    )
    fit, val = fit_then_validate(config)
    assert "train/scm_error" in fit
    assert_student_validated(val, teacher_nfe=2 if guidance_embed else 4)


# ------------------------------------------------------------------ reflow couplings of Flux
@pytest.fixture(scope="module")
def flux_couplings(teachers, tmp_path_factory) -> Path:  # noqa: F811
    """`fewstep couplings` (the demo YAML) of the two-pass-CFG Flux teacher: 12 couplings."""
    out = tmp_path_factory.mktemp("flux_couplings") / "couplings"
    run(couplings_args(teachers[False], out))
    return out


def test_flux_couplings_are_the_teachers_samples_with_pooled_vectors(teachers, flux_couplings):  # noqa: F811
    """Regenerated with the datamodule's pooled vectors (mean_tokens) and its null caption's for
    CFG, the stored x0 come back; the couplings record the pooled source and their batches carry
    it as ``cond``."""
    teacher = teachers[False]
    info = json.loads((flux_couplings / "manifest.json").read_text())["couplings"]
    assert info["pooled_text"] == "mean_tokens"
    data = CouplingDataModule(str(flux_couplings), batch_size=12, verify="all")
    data.setup("fit")
    batch = data.train_dataset.__getitems__(list(range(12)))
    valid = batch["text_mask"][..., None].float()
    expected_cond = (batch["text"] * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(batch["cond"], expected_cond, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch["noise"], fixed_noise(batch["noise"].shape[1:], range(12), seed=0))
    module = load_teacher(str(teacher.config), str(teacher.ckpt), use_ema=False)
    null = as_null_text(flux_data(teacher.cache).null_text())  # (text, mask, pooled)
    assert null.cond is not None
    with torch.no_grad():
        x0 = generate(
            module.denoiser,
            module.sampler,
            batch["text"],
            batch["text_mask"],
            batch["noise"],
            module.guidance_scale,
            null,
            cond=batch["cond"],
        )
    assert x0.abs().mean() > 0.01
    torch.testing.assert_close(batch["latents"], x0, rtol=0, atol=1e-5)


def test_couplings_without_a_pooled_record_still_load(flux_couplings, tmp_path):
    """Couplings made before ``pooled_text`` was recorded read as "cache": none for a cache
    without stored pooled vectors (the old behaviour), and a given pooled_text still applies."""
    old = tmp_path / "old"
    old.mkdir()
    for item in flux_couplings.iterdir():
        (old / item.name).symlink_to(item)
    manifest = json.loads((flux_couplings / "manifest.json").read_text())
    del manifest["couplings"]["pooled_text"]
    (old / "manifest.json").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = CouplingDataModule(str(old), batch_size=4)
    data.setup("fit")
    assert data.pooled_dim is None and "cond" not in data.train_dataset.__getitems__([0, 1])
    given = CouplingDataModule(str(old), batch_size=4, pooled_text="mean_tokens")
    given.setup("fit")
    batch = given.train_dataset.__getitems__([0, 1])
    texts = [t.numpy()[m.numpy()] for t, m in zip(batch["text"], batch["text_mask"], strict=True)]
    torch.testing.assert_close(
        batch["cond"], torch.from_numpy(mean_tokens(texts, texts[0].shape[1]))
    )


def test_reflow_student_of_a_flux_teacher_fits_and_validates(teachers, flux_couplings, tmp_path):  # noqa: F811
    config = cpu_student_config(CONFIGS / "student/reflow_shapes.yaml", teachers[False], tmp_path)
    checkpoint_every(config, 2)
    common = ["-c", str(config), "--data.init_args.path", str(flux_couplings)]
    run(["fit", *common, "--trainer.max_steps=2"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    metrics = run(["validate", *common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    assert float(metrics["val/student_1/nfe"]) == 1 and float(metrics["val/teacher/nfe"]) == 4
    assert torch.isfinite(metrics["val/student_1/latent_mse"])


class PooledTextEncoder:
    """A stand-in for FluxTextEncoder: 3 tokens and a pooled vector per caption, functions of its
    characters (distinct for distinct captions)."""

    dim, pooled_dim = 6, 5

    def _codes(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([[float(sum(map(ord, c)) % 97), float(len(c))] for c in captions])

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self._codes(captions)  # [B, 2]
        tokens = codes[:, :1, None] * torch.linspace(0.01, 0.1, 3 * self.dim).reshape(1, 3, -1)
        return tokens, torch.ones(len(captions), 3, dtype=torch.bool)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self([""])

    def pooled(self, captions: list[str]) -> torch.Tensor:
        codes = self._codes(captions)
        return codes[:, 1:] * torch.linspace(0.1, 0.5, self.pooled_dim) + codes[:, :1] / 100

    def null_pooled(self) -> torch.Tensor:
        return self.pooled([""])

    def fingerprint(self) -> dict[str, str]:
        return {"config": "pooled-stand-in", "weights": "none"}


def test_couplings_of_a_flux_cache_give_the_teacher_and_the_student_its_pooled_vectors(tmp_path):
    """From a cache storing pooled vectors (FLUX.1's CLIP one; pooled_text "cache") the teacher
    samples with them, the couplings store a copy, and the student's batches carry them."""
    encoder = PooledTextEncoder()
    source_dir = build_cache(
        ShapesWorld(size=6, resolution=32, seed=0),
        FakeVAE(),
        encoder,
        tmp_path / "cache",
        shard_size=4,
        batch_size=3,
        progress=False,
    )
    source = LatentCache(source_dir)
    given: list[torch.Tensor] = []

    def sample(text, mask, noise, cond):
        given.append(cond)
        return 0.5 * noise

    out = build_couplings(
        source, sample, tmp_path / "couplings", {}, 5, shard_size=4, batch_size=2, pooled="cache"
    )
    expected = torch.from_numpy(source.read_pooled(range(5)))
    assert len(given) == 3 and torch.equal(torch.cat(given), expected)  # shards [4, 1], batches 2
    data = CouplingDataModule(str(out), batch_size=5, verify="all")
    data.setup("fit")
    assert data.pooled_text == "cache" and data.pooled_dim == encoder.pooled_dim
    batch = data.train_dataset.__getitems__(list(range(5)))
    assert torch.equal(batch["cond"], expected)
    null_pooled = data.null_text()[2]
    torch.testing.assert_close(null_pooled, torch.from_numpy(source.null_pooled())[None])
