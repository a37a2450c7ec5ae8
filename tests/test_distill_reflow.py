"""Rectified flow (Liu et al. 2022; InstaFlow): coupling caches, the reflow/distill losses on
oracle students, the flow view of a DDPM-eps teacher, and the student configs through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from student_fixtures import (
    TinyTeacher,
    build_tiny_teacher,
    checkpoint_every,
    couplings_args,
    cpu_student_config,
    quiet_trainer,
    teacher_yaml,
    train_tiny_teacher,
)
from torch import Tensor, nn

import fewstep.tools.couplings as couplings_tool
from fewstep.cli import run
from fewstep.data.cache import CacheError, read_manifest
from fewstep.data.couplings import CouplingDataModule
from fewstep.data.datamodule import CachedLatentDataModule
from fewstep.diffusion import DDIM, Denoiser, DiscreteDDPM, Euler, RectifiedFlow, diffusion_loss
from fewstep.diffusion.flow_frame import (
    FlowFrameDenoiser,
    FlowTime,
    flow_time,
    frame_scale,
    process_time,
)
from fewstep.diffusion.losses import pseudo_huber
from fewstep.diffusion.parameterization import PredictionType, from_x0_eps, x0_error_scale
from fewstep.diffusion.schedules import NoiseProcess, broadcast
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.reflow import (
    Reflow,
    distill_loss,
    one_step_sample,
    reflow_loss,
    straight_path,
)
from fewstep.lightning.checkpoints import load_module, load_teacher
from fewstep.lightning.sampling import as_null_text, generate
from fewstep.lightning.student_module import StudentModule
from fewstep.utils.seeding import fixed_noise

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
SHAPE = (3, 2, 4, 4)  # [B, C, h, w]
CASES = [  # (process, prediction): a flow teacher and DDPM teachers in every parameterisation
    (RectifiedFlow(), "velocity"),
    (RectifiedFlow(), "x0"),
    (DiscreteDDPM(), "epsilon"),
    (DiscreteDDPM(), "v"),
    (DiscreteDDPM(), "x0"),
]
IDS = ["flow-velocity", "flow-x0", "ddpm-eps", "ddpm-v", "ddpm-x0"]


def unscale_time(process: NoiseProcess, model_t: Tensor) -> Tensor:
    """Process time from the network's timestep input (inverse of process.model_time)."""
    if isinstance(process, RectifiedFlow):
        return model_t.double() / process.num_train_timesteps
    return model_t.double()


class Oracle(nn.Module):
    """Knows the coupled x0: outputs, in its parameterisation, the prediction that decodes to x0
    at its input — the exact straight-line velocity in the flow frame."""

    def __init__(self, process: NoiseProcess, kind: PredictionType, x0: Tensor) -> None:
        super().__init__()
        self.process, self.kind, self.x0 = process, kind, x0
        self.calls = 0

    def forward(self, x: Tensor, model_t: Tensor, **cond: Tensor) -> Tensor:
        self.calls += 1
        alpha, sigma = self.process.alpha_sigma(unscale_time(self.process, model_t))
        alpha, sigma = broadcast(alpha, x), broadcast(sigma, x)
        eps = (x - alpha * self.x0) / sigma
        return from_x0_eps(self.x0, eps, alpha, sigma, self.kind)


class Random(nn.Module):
    """A fixed random conv + time modulation: some network, not an oracle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1).double()

    def forward(self, x: Tensor, model_t: Tensor, **cond: Tensor) -> Tensor:
        return self.conv(x) * (1.0 + 1e-3 * model_t.double()).reshape(-1, 1, 1, 1)


def coupling(seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random (x0, z) pair in float64 (exactness tests)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).double() + 0.5, torch.randn(SHAPE, generator=g).double()


def batch_of(x0: Tensor, z: Tensor | None, seed: int = 0) -> DistillBatch:
    """A DistillBatch with the coupled noise attached (as the StudentModule passes it)."""
    b = x0.shape[0]
    batch = DistillBatch(
        latents=x0,
        text=torch.zeros(b, 1, 4),
        text_mask=torch.ones(b, 1, dtype=torch.bool),
        null_text=torch.zeros(b, 1, 4),
        null_mask=torch.ones(b, 1, dtype=torch.bool),
        generator=torch.Generator().manual_seed(seed),
    )
    if z is not None:
        batch.noise = z
    return batch


# ----------------------------------------------------------------------------- the flow frame


def test_flow_time_inverts_and_is_identity_on_rectified_flow():
    ddpm = DiscreteDDPM()
    t = torch.tensor([-1.0, 0.0, 0.5, 10.25, 500.0, 998.5, 999.0], dtype=torch.float64)
    assert torch.allclose(process_time(ddpm, flow_time(ddpm, t)), t, atol=1e-9)
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(process_time(RectifiedFlow(), s), s)
    assert torch.equal(frame_scale(RectifiedFlow(), s), torch.ones_like(s))
    past = process_time(ddpm, torch.tensor([0.999, 1.0], dtype=torch.float64))
    assert torch.equal(past, torch.full((2,), ddpm.t_max, dtype=torch.float64))  # clamped
    s = flow_time(ddpm, t)
    bisected = process_time(Unnamed(ddpm), s)  # the generic path agrees with the closed form
    assert torch.allclose(bisected, process_time(ddpm, s), atol=1e-9)


class Unnamed(NoiseProcess):
    """A process the flow frame has no closed form for (delegates to another)."""

    def __init__(self, inner: NoiseProcess) -> None:
        self.inner, self.t_clean, self.t_max = inner, inner.t_clean, inner.t_max

    def alpha_sigma(self, t):
        return self.inner.alpha_sigma(t)

    def model_time(self, t):
        return self.inner.model_time(t)

    def timesteps(self, num_steps, spacing="trailing", final=None):
        return self.inner.timesteps(num_steps, spacing, final)


@pytest.mark.parametrize("kind", ["epsilon", "v"])
def test_ddpm_network_in_the_flow_frame_is_the_same_denoiser(kind):
    """x_t = (alpha + sigma) x_s at t(s): the flow view returns the DDPM view's (x0, eps)."""
    x0, z = coupling()
    base = Denoiser(Random(), DiscreteDDPM(), kind)
    flow = FlowFrameDenoiser.wrap(base)
    assert isinstance(flow.process, FlowTime) and flow.prediction == kind
    s = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    t = process_time(base.process, s)
    x_s = straight_path(x0, z, s)
    d_flow = flow(x_s, s)
    d_base = base(x_s * broadcast(frame_scale(base.process, t), x_s), t)
    assert torch.allclose(d_flow.x0, d_base.x0, atol=1e-10)
    assert torch.allclose(d_flow.eps, d_base.eps, atol=1e-9)
    assert Reflow().student_denoiser(base).process.base is base.process
    flow_student = Reflow().student_denoiser(Denoiser(Random(), RectifiedFlow(), "velocity"))
    assert isinstance(flow_student.process, RectifiedFlow)  # a flow teacher is used as is


# ----------------------------------------------------------------------------- oracle students


@pytest.mark.parametrize(("process", "kind"), CASES, ids=IDS)
@pytest.mark.parametrize("space", ["prediction", "velocity"])
def test_reflow_loss_is_zero_for_the_straight_line_oracle(process, kind, space):
    x0, z = coupling()
    student = Denoiser(Oracle(process, kind, x0), process, kind)
    s = torch.tensor([0.02, 0.5, 1.0], dtype=torch.float64)  # 1.0: past a DDPM's t_max
    loss = reflow_loss(student, x0, z, s, space)
    assert loss.shape == (3,) and loss.max() < 1e-9, loss  # the net sees float32 time
    wrong = reflow_loss(student, x0 + 0.1, z, s, space)  # eps space barely sees x0 at t_max:
    assert wrong.min() > 1e-7 and wrong.max() > 1e-3  # its error there is alpha/sigma * 0.1


@pytest.mark.parametrize(("process", "kind"), CASES, ids=IDS)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_of_the_oracle_student_maps_noise_to_its_coupled_sample(process, kind, steps):
    x0, z = coupling()
    net = Oracle(process, kind, x0)
    student = Reflow().student_denoiser(Denoiser(net, process, kind))
    sample = Euler(steps=steps)(student.bind(), z)
    assert torch.allclose(sample, x0, atol=1e-6), (sample - x0).abs().max()
    assert net.calls == steps
    one = one_step_sample(Denoiser(Oracle(process, kind, x0), process, kind), z)
    assert torch.allclose(one, x0, atol=1e-6)


@pytest.mark.parametrize(("process", "kind"), CASES, ids=IDS)
def test_method_losses_vanish_for_the_oracle_in_every_mode(process, kind):
    x0, z = coupling()
    models = Models(
        student=Denoiser(Oracle(process, kind, x0), process, kind),
        teacher=Denoiser(Random(), process, kind),
        process=process,
    )
    for mode in ("reflow", "distill", "both"):
        loss, logs = Reflow(mode=mode).generator_loss(batch_of(x0, z), models)
        assert loss < 1e-10
        assert ("reflow" in logs) == (mode != "distill")
        assert ("distill" in logs) == (mode != "reflow")


def test_reflow_on_a_velocity_flow_is_flow_matching_with_coupled_noise():
    """space="prediction" on RectifiedFlow + velocity is exactly diffusion_loss(x0, z, t) (Liu et
    al. 2022, eq. 1 = Lipman et al. 2023 with the coupling as the noise)."""
    x0, z = (v.float() for v in coupling())
    net = Random()
    student = Denoiser(lambda x, t, **c: net(x.double(), t).float(), RectifiedFlow(), "velocity")
    s = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    expected = diffusion_loss(student, x0, z, s)
    assert torch.allclose(reflow_loss(student, x0, z, s).mean(), expected, rtol=1e-6)
    velocity = reflow_loss(student, x0, z, s, "velocity")
    assert torch.allclose(velocity, reflow_loss(student, x0, z, s), rtol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0"])
def test_velocity_and_prediction_losses_differ_by_the_conversion_weight(kind):
    """||v error||^2 = ||pred error||^2 ((alpha+sigma)/sigma * dx0/dpred)^2 at every time."""
    x0, z = coupling()
    process = DiscreteDDPM()
    student = Denoiser(Random(), process, kind)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(process_time(process, s))
    weight = ((alpha + sigma) / sigma * x0_error_scale(alpha, sigma, kind)) ** 2
    pred_loss = reflow_loss(student, x0, z, s, "prediction")
    assert torch.allclose(reflow_loss(student, x0, z, s, "velocity"), pred_loss * weight)


def test_ddpm_eps_student_trains_toward_its_couplings():
    """A few SGD steps of an eps-prediction DDPM student on one coupling lower both losses."""
    x0, z = (v.float() for v in coupling(1))
    process = DiscreteDDPM()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))
    student = Denoiser(lambda x, t, **c: net(x), process, "epsilon")
    models = Models(student, student, process)
    method = Reflow(mode="both", distance="pseudo_huber")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for step in range(30):
        loss, logs = method.generator_loss(batch_of(x0, z, seed=step), models)
        first = first or {k: float(v) for k, v in logs.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(float(logs[k]) < 0.5 * first[k] for k in first), (first, logs)


def test_distill_distances():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    c = 0.00054 * 48**0.5
    assert torch.allclose(pseudo_huber(a, b), torch.full((2,), (48 + c * c) ** 0.5 - c))
    assert torch.equal(pseudo_huber(a, a), torch.zeros(2))
    x0, z = coupling()
    student = Denoiser(Oracle(RectifiedFlow(), "velocity", x0), RectifiedFlow(), "velocity")
    assert distill_loss(student, x0 + 1.0, z).allclose(torch.ones(3, dtype=torch.float64))


def test_bad_settings_and_missing_couplings_are_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        Reflow(mode="reflw")
    with pytest.raises(ValueError, match="distance"):
        Reflow(distance="lpips")
    x0, _ = coupling()
    models = Models(*(2 * [Denoiser(Random(), RectifiedFlow(), "velocity")]), RectifiedFlow())
    with pytest.raises(ValueError, match="fewstep couplings"):
        Reflow().generator_loss(batch_of(x0, None), models)


def test_ddim_teacher_sampler_is_untouched_by_the_flow_view():
    """The student's flow view needs Euler; the teacher keeps its own DDPM sampler (sanity)."""
    x0, z = coupling()
    teacher = Denoiser(Oracle(DiscreteDDPM(), "epsilon", x0), DiscreteDDPM(), "epsilon")
    assert torch.allclose(DDIM(steps=3)(teacher.bind(), z), x0, atol=1e-6)


# ----------------------------------------------------------------------------- coupling caches

N_COUPLINGS, SHARD = 12, 4  # 3 shards of one batch each
COUPLINGS_YAML = "configs/student/reflow_couplings_shapes.yaml"  # the demo's, built below


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyTeacher:
    """A tiny trained rectified-flow teacher, its VAE and its 24-sample shapes cache."""
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"), "flow")


@pytest.fixture(scope="module")
def couplings_dir(tiny, tmp_path_factory) -> Path:
    """Couplings of the tiny teacher, built through the CLI with the demo YAML."""
    out = tmp_path_factory.mktemp("couplings") / "couplings"
    result = run(couplings_args(tiny, out, config=COUPLINGS_YAML))
    assert result == {"couplings": str(out), "teacher_weights": "raw"}  # as the demo YAML says
    return out


def test_gpu_couplings_config_runs_on_the_tiny_teacher(tiny, tmp_path):
    """configs/student/reflow_couplings_shapes_gpu.yaml (the GPU recipe's couplings) runs."""
    out = tmp_path / "couplings"
    config = "configs/student/reflow_couplings_shapes_gpu.yaml"
    assert run(couplings_args(tiny, out, config=config))["couplings"] == str(out)
    assert read_manifest(out)["num_samples"] == N_COUPLINGS


def all_couplings(path: Path) -> dict:
    """Every coupling of a cache as one batch, in cache order."""
    data = CouplingDataModule(str(path), batch_size=N_COUPLINGS, verify="all")
    data.setup("fit")
    return data.train_dataset.__getitems__(list(range(N_COUPLINGS)))


def test_coupling_cache_reproduces_the_teachers_samples(tiny, couplings_dir):
    """Regenerating from the stored noise with the teacher (the demo YAML's raw weights, its
    sampler and CFG scale)
    gives the stored x0; the noise is fixed_noise(seed, index); text is the source's."""
    batch = all_couplings(couplings_dir)
    manifest = read_manifest(couplings_dir)
    info = manifest["couplings"]
    assert info["guidance_scale"] == 2.0 and info["seed"] == 0 and info["sampler"]["steps"] == 2
    assert info["teacher"]["weights"] == "raw" and len(info["teacher"]["weights_sha256"]) == 64
    assert all("noise.npy" in shard["files"] for shard in manifest["shards"])
    assert torch.equal(batch["noise"], fixed_noise((8, 16, 16), range(N_COUPLINGS), seed=0))
    source = CachedLatentDataModule(str(tiny.cache), text_dropout=0.0)
    source.setup("fit")
    src = source.train_dataset.cache
    assert batch["caption"] == [r["caption"] for r in src.read_records(range(N_COUPLINGS))]
    teacher = load_teacher(str(tiny.config), str(tiny.ckpt), use_ema=False)
    null = as_null_text(src.null_text())
    with torch.no_grad():
        x0 = generate(
            teacher.denoiser,
            teacher.sampler,
            batch["text"],
            batch["text_mask"],
            batch["noise"],
            2.0,
            null,
        )
    assert x0.abs().mean() > 0.1
    assert torch.allclose(batch["latents"], x0, atol=1e-5), (batch["latents"] - x0).abs().max()


def test_interrupted_coupling_build_resumes_to_an_identical_cache(
    tiny, couplings_dir, tmp_path, monkeypatch
):
    out = tmp_path / "couplings"
    calls = {"n": 0}

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return generate(*args, **kwargs)

    monkeypatch.setattr(couplings_tool, "generate", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(couplings_args(tiny, out))
    assert (out / "shard-00000").is_dir() and not (out / "manifest.json").exists()
    calls["n"] = 10  # no more crashes; count the resumed batches
    run(couplings_args(tiny, out))
    assert calls["n"] == 10 + 2  # shard 0 was kept, shards 1 and 2 were built
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(couplings_dir) for p in couplings_dir.rglob("*") if p.is_file()
    )
    for name in files:
        assert (out / name).read_bytes() == (couplings_dir / name).read_bytes(), name


def test_coupling_build_refuses_other_settings_and_plain_caches(tiny, couplings_dir):
    with pytest.raises(CacheError, match="couplings"):
        run(couplings_args(tiny, couplings_dir, "--guidance_scale=4.0"))
    with pytest.raises(CacheError, match="fewstep couplings"):
        CouplingDataModule(str(tiny.cache)).setup("fit")


def test_ddpm_eps_teacher_dit_reads_as_a_flow(tiny, couplings_dir, tmp_path):
    """The conversions on a real eps-prediction DDPM DiT with learned sigma: its flow view gives
    the DDPM (x0, eps) at matched points, and 1-step Euler of it is x0 at (c z, t_max)."""
    config = tmp_path / "ddpm.yaml"
    config.write_text(yaml.safe_dump(teacher_yaml(tiny.cache, tiny.vae, "ddpm")))
    module = load_module(config)
    with torch.no_grad():
        for p in module.network.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    base = module.denoiser
    assert base.prediction == "epsilon" and base.learned_sigma
    batch = all_couplings(couplings_dir)
    cond = {"text": batch["text"][:3], "text_mask": batch["text_mask"][:3]}
    x0, z = batch["latents"][:3], batch["noise"][:3]
    flow = Reflow().student_denoiser(base)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    t = process_time(base.process, s)
    with torch.no_grad():
        d_flow = flow(straight_path(x0, z, s), s, **cond)
        x_t = straight_path(x0, z, s) * broadcast(frame_scale(base.process, t), x0)
        d_base = base(x_t, t, **cond)
        assert torch.allclose(d_flow.x0, d_base.x0, atol=1e-4)
        assert torch.allclose(d_flow.eps, d_base.eps, atol=1e-4)
        one = Euler(steps=1)(flow.bind(**cond), z)
        c = frame_scale(base.process, base.process.t_max)
        assert torch.allclose(one, base(z * float(c), base.process.t_max, **cond).x0, atol=1e-5)
        assert torch.isfinite(Euler(steps=4)(flow.bind(**cond), z)).all()


# ----------------------------------------------------------------------------- the student config


@pytest.mark.parametrize("suffix", ["", "_gpu"])
def test_reflow_student_config_fits_and_validates(suffix, tiny, tmp_path):
    """configs/student/reflow_shapes.yaml and reflow_shapes_gpu.yaml through the CLI on the tiny
    couplings of reflow_couplings_shapes{,_gpu}.yaml (so each pair must agree on the teacher's
    weights): 2 steps of fit (checkpointed), then validate that checkpoint at 1 and 2 steps."""
    couplings_dir = tmp_path / "couplings"
    couplings_yaml = f"configs/student/reflow_couplings_shapes{suffix}.yaml"
    run(couplings_args(tiny, couplings_dir, config=couplings_yaml))
    name = f"reflow_shapes{suffix}.yaml"
    config = cpu_student_config(ROOT / "configs/student" / name, tiny, tmp_path)
    checkpoint_every(config, 2)
    common = ["-c", str(config), "--data.init_args.path", str(couplings_dir)]
    run(["fit", *common, "--trainer.max_steps=2"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    made_by = read_manifest(couplings_dir)["couplings"]["teacher"]["weights_sha256"]
    assert saved["teacher"]["sha256"] == made_by  # couplings of the teacher being distilled
    run(["validate", *common, "--ckpt_path", str(ckpt)])
    table = next(tmp_path.rglob("eval_table.md")).read_text()
    assert "student_1" in table and "student_2" in table
    assert "(step 2)" in table  # the checkpoint's step, although `validate` starts at 0


def test_ddpm_eps_teacher_distils_end_to_end(tiny, tmp_path, monkeypatch):
    """A DDPM eps-prediction teacher (learned sigma, DDIM): couplings, one reflow+distill step of
    the StudentModule and validation with 1/2-step Euler through the flow view, all finite."""
    config = tmp_path / "ddpm.yaml"
    config.write_text(yaml.safe_dump(teacher_yaml(tiny.cache, tiny.vae, "ddpm")))
    ckpt = train_tiny_teacher(config, tmp_path / "ddpm.ckpt", tiny.cache, steps=1)
    out = tmp_path / "couplings"
    couplings_tool.couplings(
        str(config),
        str(ckpt),
        str(out),
        num_samples=8,
        shard_size=8,
        batch_size=8,
        device="cpu",
        progress=False,
    )
    assert read_manifest(out)["couplings"]["sampler"]["class"].endswith("DDIM")
    module = StudentModule(
        str(config),
        str(ckpt),
        Reflow(mode="both"),
        Euler(steps=2),
        eval_steps=[1, 2],
        val_num_samples=2,
    )
    data = CouplingDataModule(str(out), batch_size=4, val_fraction=0.25, drop_last=False)
    trainer = quiet_trainer(1, tmp_path, limit_val_batches=1)
    trainer.fit(module, data)
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert np.isfinite(metrics["val/student_1/latent_mse"])
    assert metrics["val/student_2/nfe"] == 2
