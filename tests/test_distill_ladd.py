"""LADD (Sauer et al. 2024): hooks, gradient routing, hinge losses, re-noising distribution, config
errors (math/structure invariants on a tiny DiT), and a CPU fit/validate/resume through the CLI."""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from scipy import stats
from student_fixtures import (
    TinyTeacher,
    build_tiny_teacher,
    checkpoint_every,
    cpu_student_config,
)
from torch import nn

from fewstep.cli import run
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.samplers import Euler, Sampler
from fewstep.diffusion.schedules import DiscreteDDPM, RectifiedFlow, shift_time
from fewstep.diffusion.timesteps import LogitNormal, Uniform
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.ladd import LADD
from fewstep.models.discriminator import hinge_d_loss, hinge_g_loss
from fewstep.models.dit import DiT, text_attention_bias

B, C, HW, TEXT_DIM, WIDTH = 3, 4, 8, 16, 32


def tiny_models(process=None, seed: int = 0) -> Models:
    """A frozen tiny DiT teacher (perturbed off PixArt's zero init) and its trainable copy."""
    torch.manual_seed(seed)
    net = DiT(
        in_channels=C,
        patch_size=2,
        hidden_size=WIDTH,
        depth=3,
        num_heads=2,
        caption_channels=TEXT_DIM,
        learn_sigma=False,
        sample_size=HW,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student_net = copy.deepcopy(net)
    net.requires_grad_(False).eval()
    process = process or RectifiedFlow()
    return Models(
        student=Denoiser(student_net, process, "velocity"),
        teacher=Denoiser(net, process, "velocity"),
        process=process,
        student_sampler=Euler(steps=4),  # the StudentModule's grid: 4 trailing steps
    )


def tiny_batch(seed: int = 1, batch: int = B) -> DistillBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return DistillBatch(
        latents=torch.randn(batch, C, HW, HW, generator=g),
        text=torch.randn(batch, 5, TEXT_DIM, generator=g) * mask[..., None],
        text_mask=mask,
        null_text=torch.zeros(batch, 2, TEXT_DIM),
        null_mask=torch.ones(batch, 2, dtype=torch.bool),
        generator=torch.Generator().manual_seed(seed + 100),
    )


def ladd(models: Models, **kwargs) -> LADD:
    kwargs.setdefault("feature_blocks", [0, -1])
    method = LADD(head_hidden=16, head_cond_dim=16, **kwargs)
    method.setup(models)
    return method


def manual_block_output(net: DiT, x, t, text, mask, upto: int) -> torch.Tensor:
    """Tokens after block ``upto``, recomputed by hand from DiT.forward's steps."""
    b, _, h, w = x.shape
    gh, gw = h // net.patch_size, w // net.patch_size
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2) + net.pos_embed(gh, gw, x.device)
    emb = net.embed_timestep(t, b, tokens.dtype)
    t6, context = net.t_block(emb), net.y_embedder(text)
    bias = text_attention_bias(mask, tokens.dtype)
    for block in net.blocks[: upto + 1]:
        tokens = block(tokens, context, t6, bias)
    return tokens


def record_head_inputs(method: LADD) -> list:
    """Pre-hook on the heads recording the features they are given."""
    seen: list = []
    method.heads.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    return seen


def grads(module: nn.Module) -> list:
    return [p.grad for p in module.parameters()]


# --------------------------------------------------------------------------- hooks and structure
def test_hooks_capture_chosen_blocks_with_shapes_and_are_removed():
    models = tiny_models()
    method = ladd(models, feature_blocks=[0, -2])
    assert method.block_indices == [0, 1]
    batch = tiny_batch()
    x_t, t = batch.latents, torch.full((B,), 0.4)
    later_calls = []
    models.teacher.net.blocks[2].register_forward_hook(lambda *a: later_calls.append(1))
    feats = method.teacher_features(models.teacher, x_t, t, batch.cond)
    n_tokens = (HW // 2) ** 2
    assert [f.shape for f in feats] == [torch.Size([B, n_tokens, WIDTH])] * 2
    model_t = models.process.model_time(t)
    for f, i in zip(feats, [0, 1], strict=True):
        ref = manual_block_output(models.teacher.net, x_t, model_t, batch.text, batch.text_mask, i)
        torch.testing.assert_close(f, ref)
    assert later_calls == []  # the forward stopped after the deepest captured block
    assert all(
        len(blk._forward_hooks) == 1 - (i != 2) for i, blk in enumerate(models.teacher.net.blocks)
    )  # only the test's own hook is left
    method.stop_after_last_block = False
    full = method.teacher_features(models.teacher, x_t, t, batch.cond)
    assert later_calls == [1] and all(torch.equal(a, b) for a, b in zip(feats, full, strict=True))


def test_heads_are_registered_checkpointed_and_the_second_optimisers_parameters():
    models = tiny_models()
    method = ladd(models)
    assert LADD.num_optimizers == 2
    heads = {id(p) for p in method.heads.parameters()}
    assert {id(p) for p in method.discriminator_parameters()} == heads
    assert heads == {id(p) for p in method.parameters()}  # nothing else is trainable in the method
    keys = method.state_dict().keys()
    assert any(k.startswith("heads.heads.1.") for k in keys) and len(method.heads.heads) == 2
    fresh = ladd(models)
    fresh.load_state_dict(method.state_dict())  # strict: the same keys after setup


# --------------------------------------------------------------------------- gradient routing
def test_discriminator_loss_trains_only_the_heads_on_detached_features():
    models = tiny_models()
    method = ladd(models)
    seen = record_head_inputs(method)
    loss, logs = method.discriminator_loss(tiny_batch(), models)
    assert all(not f.requires_grad and f.grad_fn is None for f in seen[0])
    loss.backward()
    assert all(g is None for g in grads(models.student.net))
    assert all(g is None for g in grads(models.teacher.net))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(method.heads))
    assert set(logs) == {"d_hinge", "d_real", "d_fake"}


def test_generator_loss_trains_only_the_student_through_teacher_features():
    models = tiny_models()
    method = ladd(models)
    seen = record_head_inputs(method)
    batch = tiny_batch()
    loss, logs = method.generator_loss(batch, models)
    assert all(f.requires_grad and f.grad_fn is not None for f in seen[0])
    assert all(p.requires_grad for p in method.heads.parameters())  # flags restored
    loss.backward()
    assert all(g is None for g in grads(models.teacher.net))
    assert all(g is None for g in grads(method.heads))
    student_grads = [g for g in grads(models.student.net) if g is not None]
    assert student_grads and sum(float(g.abs().sum()) for g in student_grads) > 0
    assert set(logs) == {"g_adv", "student_t"}
    # the D step of the same batch reuses the G step's fake, detached, without a student call
    calls = []
    models.student.net.register_forward_hook(lambda *a: calls.append(1))
    method.discriminator_loss(batch, models)[0].backward()
    assert calls == [] and all(g is None for g in grads(models.teacher.net))


# --------------------------------------------------------------------------- hinge losses
class StubHeads(nn.Module):
    """Heads returning hand-made logits: `fake` for the first n_fake rows, `real` after."""

    def __init__(self, fake: list[float], real: list[float], n_fake: int) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.fake, self.real, self.n_fake = fake, real, n_fake

    def forward(self, features, grid, model_time, text, text_mask):
        n, tokens = features[0].shape[:2]
        out = []
        for f, r in zip(self.fake, self.real, strict=True):
            rows = torch.full((n, tokens), r)
            rows[: self.n_fake] = f
            out.append(rows + 0 * self.dummy)
        return out


def test_hinge_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    models = tiny_models()
    method = ladd(models, adv_weight=2.0)
    method.heads = StubHeads(fake=[-0.2, 0.4], real=[0.3, 1.5], n_fake=B)
    d_loss, logs = method.discriminator_loss(tiny_batch(), models)
    per_head = [(1 - 0.3) + (1 - 0.2), 0.0 + (1 + 0.4)]  # relu(1 - real) + relu(1 + fake)
    assert d_loss.item() == pytest.approx(sum(per_head) / 2)
    assert logs["d_real"].item() == pytest.approx(0.9)
    assert logs["d_fake"].item() == pytest.approx(0.1)
    g_loss, logs = method.generator_loss(tiny_batch(), models)
    assert g_loss.item() == pytest.approx(2.0 * -(-0.2 + 0.4) / 2)


# --------------------------------------------------------------------------- noise levels
def test_renoise_times_follow_the_configured_distribution():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    flow = RectifiedFlow()
    t = LADD(renoise=LogitNormal(mean=1.0, std=0.5)).renoise_times(n, flow, g)
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 1.0) < 0.02 and abs(logit.std().item() - 0.5) < 0.02
    assert stats.kstest(logit.numpy(), "norm", args=(1.0, 0.5)).pvalue > 1e-3
    shifted = LADD(renoise=Uniform(shift=3.0)).renoise_times(n, flow, g).double()
    unshifted = shifted / (3.0 - 2.0 * shifted)  # inverse of shift_time with s = 3 (SD3 eq. 23)
    torch.testing.assert_close(shift_time(unshifted, 3.0), shifted)
    assert stats.kstest(unshifted.numpy(), "uniform").pvalue > 1e-3
    ddpm = DiscreteDDPM()
    t_ddpm = LADD(renoise=Uniform()).renoise_times(n, ddpm, g)
    assert stats.kstest(((t_ddpm + 1) / 1000).numpy(), "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="renoise"):
        LADD(renoise=_OutOfRange()).renoise_times(4, ddpm, g)


class _OutOfRange(Uniform):
    def __call__(self, batch, *, device=None, generator=None):
        return torch.full((batch,), 500.0)


def test_losses_feed_the_teacher_the_renoise_times_and_student_inputs_follow_the_grid():
    models = tiny_models()
    method = ladd(models, renoise=LogitNormal(mean=0.5, std=1.0))
    drawn, fed = [], []
    original_times, original_feats = method.renoise_times, method.teacher_features
    method.renoise_times = lambda *a: drawn.append(original_times(*a)) or drawn[-1]
    method.teacher_features = lambda teacher, x, t, cond: (
        fed.append(t) or original_feats(teacher, x, t, cond)
    )
    batch = tiny_batch()
    method.generator_loss(batch, models)
    method.discriminator_loss(batch, models)
    assert len(drawn) == len(fed) == 2 and all(
        torch.equal(a, b) for a, b in zip(drawn, fed, strict=True)
    )
    assert fed[1].shape == (2 * B,)  # real and fake in one teacher pass
    # student inputs: trailing 4-step grid; the first timestep starts from pure noise
    assert method.student_times.tolist() == [1.0, 0.75, 0.5, 0.25]
    big = tiny_batch(batch=64)
    big.latents.fill_(100.0)
    first = ladd(models, student_timestep_weights=[1.0, 0.0, 0.0, 0.0])
    x_t, t = first.student_inputs(big, models.process)
    assert t.eq(1.0).all() and x_t.abs().mean() < 2.0
    second = ladd(models, student_timestep_weights=[0.0, 1.0, 0.0, 0.0])
    gen_state = big.generator.get_state()
    x_t, t = second.student_inputs(big, models.process)
    big.generator.set_state(gen_state)
    weights = second.student_timestep_weights
    torch.multinomial(weights, 64, replacement=True, generator=big.generator)
    noise = torch.randn(big.latents.shape, generator=big.generator)
    assert t.eq(0.75).all()
    torch.testing.assert_close(x_t, 0.25 * big.latents + 0.75 * noise)


# --------------------------------------------------------------------------- teacher samples
class CountingEuler(Sampler):
    """Euler that counts its calls."""

    def __init__(self, steps: int = 2) -> None:
        super().__init__(steps)
        self.calls = 0
        self.inner = Euler(steps)

    def sample(self, denoiser, noise, timesteps, generator=None):
        self.calls += 1
        return self.inner.sample(denoiser, noise, timesteps, generator)


def test_distill_term_and_teacher_reals_share_one_teacher_sampling_per_batch():
    sampler = CountingEuler(2)  # the StudentModule's reference teacher setting, via Models
    models = dataclasses.replace(tiny_models(), teacher_sampler=sampler, guidance_scale=2.0)
    method = ladd(models, real="teacher", distill_weight=0.5, teacher_samples_per_step=2)
    batch = tiny_batch()
    seen = record_head_inputs(method)
    loss, logs = method.generator_loss(batch, models)
    assert "g_distill" in logs and logs["g_distill"] > 0
    loss.backward()
    assert all(g is None for g in grads(models.teacher.net))
    method.discriminator_loss(batch, models)
    assert sampler.calls == 1
    assert seen[1][0].shape[0] == B + 2  # B fakes + 2 teacher reals
    # the distill target is the guided teacher sample from the same noise the student starts at
    noise, target = method.teacher_samples(batch, models)
    from fewstep.diffusion.guidance import ClassifierFreeGuidance

    guided = ClassifierFreeGuidance(
        models.teacher,
        2.0,
        {k: v[:2] for k, v in batch.cond.items()},
        {k: v[:2] for k, v in batch.uncond.items()},
    )
    with torch.no_grad():
        torch.testing.assert_close(Euler(2)(guided, noise), target)
    # zero when the student's one-step x0 is the target (oracle student)
    oracle = Denoiser(
        lambda x, t, **c: x - target if x.shape[0] == 2 else x, models.process, "velocity"
    )
    assert method.distill_loss(batch, Models(oracle, models.teacher, models.process)).item() < 1e-10


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(student_timestep_weights=[1.0, -1.0]), "student_timestep_weights"),
        (dict(real="fake"), "real"),
        (dict(teacher_samples_per_step=0), "teacher_samples_per_step"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LADD(**kwargs)


def test_weights_must_match_the_students_grid():
    with pytest.raises(ValueError, match="student_timestep_weights has 2 entries.*walks 4"):
        ladd(tiny_models(), student_timestep_weights=[1.0, 1.0])


def test_bad_feature_block_names_the_field():
    with pytest.raises(ValueError, match="feature_blocks.*3 blocks"):
        ladd(tiny_models(), feature_blocks=[5])


def test_unit_time_mapping_on_ddpm_is_finite():
    models = tiny_models(DiscreteDDPM())
    models = Models(
        Denoiser(models.student.net, models.process, "epsilon"),
        Denoiser(models.teacher.net, models.process, "epsilon"),
        models.process,
        student_sampler=Euler(steps=4),
    )
    method = ladd(models)
    assert method.student_times.tolist() == [999.0, 749.0, 499.0, 249.0]
    explicit = dataclasses.replace(models, student_sampler=Euler(timesteps=[999, 759, 499, 259]))
    lcm = ladd(explicit, student_timestep_weights=[1] * 4)
    assert lcm.student_times.tolist() == [999.0, 759.0, 499.0, 259.0]
    with pytest.raises(ValueError, match="Models.student_sampler"):
        ladd(dataclasses.replace(models, student_sampler=None))
    loss, _ = method.generator_loss(tiny_batch(), models)
    assert math.isfinite(loss.item())


# ------------------------------------------------------------------ CLI: fit, validate, resume
CONFIG = Path(__file__).parents[1] / "configs/student/ladd_shapes.yaml"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> TinyTeacher:
    return build_tiny_teacher(tmp_path_factory.mktemp("ladd_teacher"), "flow")


def cli_config(tiny: TinyTeacher, out: Path) -> Path:
    """configs/student/ladd_shapes.yaml on the tiny teacher, checkpointing every step."""
    path = cpu_student_config(CONFIG, tiny, out)
    return checkpoint_every(path, 1, val_check_interval=2, log_every_n_steps=1)


def test_ladd_config_fits_validates_and_resumes_with_two_optimisers(tiny_teacher, tmp_path):
    config = cli_config(tiny_teacher, tmp_path)
    last = tmp_path / "student_ladd" / "checkpoints" / "last.ckpt"  # as runs/demo/student_ladd
    fit = ["fit", "-c", str(config), "--trainer.limit_val_batches=0"]  # validated once, below
    run([*fit, "--trainer.max_steps=4"])
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert len(first["optimizer_states"]) == 2
    heads = {k: v for k, v in first["state_dict"].items() if k.startswith("method.heads.")}
    assert heads and not any(k.startswith("teacher.") for k in first["state_dict"])
    run(["validate", "-c", str(config), "--ckpt_path", str(last)])
    assert (tmp_path / "student_ladd" / "eval_table.md").exists()
    run([*fit, "--trainer.max_steps=8", "--ckpt_path", str(last)])
    second = torch.load(last, map_location="cpu", weights_only=False)
    assert second["global_step"] > first["global_step"]
    steps = [[s["step"] for s in opt["state"].values()] for opt in second["optimizer_states"]]
    before = [[s["step"] for s in opt["state"].values()] for opt in first["optimizer_states"]]
    assert all(float(a[0]) > float(b[0]) for a, b in zip(steps, before, strict=True))
    moved = [not torch.equal(second["state_dict"][k], v) for k, v in heads.items()]
    assert any(moved)  # the heads kept training after the resume
