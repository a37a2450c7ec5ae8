"""The teacher: training, shapes-world validation, guided sampling, CFG grids, exact resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from student_fixtures import config_args, quiet_trainer
from torch.utils.data import DataLoader

from fewstep.cli import run
from fewstep.data.prompts import CATEGORIES, caption_of
from fewstep.data.shapes import sample_spec
from fewstep.diffusion import DDIM, Denoiser, Euler, RectifiedFlow
from fewstep.lightning.cfg_eval import CFGEvalCallback
from fewstep.lightning.ema import EMA
from fewstep.lightning.sampling import generate
from fewstep.lightning.teacher_module import TeacherModule
from fewstep.models.dit import DiT
from fewstep.models.vae import VAE
from fewstep.utils.seeding import fixed_noise

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
TEXT_DIM, LENGTH = 16, 6


class FakeLatentData(pl.LightningDataModule):
    """CachedLatentDataModule's batch format from fixed random tables: one batch per epoch."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        lengths = torch.randint(2, LENGTH + 1, (n,), generator=g)
        mask = torch.arange(LENGTH)[None] < lengths[:, None]  # [n, L]
        ramp = torch.linspace(-1.0, 1.0, 64).reshape(1, 1, 8, 8)
        specs = [sample_spec(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(n)]
        self.batch = {
            "latents": 0.3 * torch.randn(n, 4, 8, 8, generator=g) + ramp,  # learnable structure
            "text": torch.randn(n, LENGTH, TEXT_DIM, generator=g) * mask[..., None],
            "text_mask": mask,
            "caption": [caption_of(s) for s in specs],
            "metadata": [{"spec": s} for s in specs],
            "index": torch.arange(n),
        }
        self.null = torch.randn(1, 2, TEXT_DIM, generator=g)

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-caption embedding [1, 2, D] and its mask."""
        return self.null, torch.ones(1, 2, dtype=torch.bool)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.batch], batch_size=None)


def tiny_dit(learn_sigma: bool = False) -> DiT:
    """A 2-block DiT on 4x8x8 latents and 16-wide text."""
    return DiT(
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        caption_channels=TEXT_DIM,
        learn_sigma=learn_sigma,
        sample_size=8,
    )


def teacher(**kwargs) -> TeacherModule:
    """A rectified-flow teacher on the tiny DiT with a cheap validation sampler."""
    torch.manual_seed(0)
    kwargs = {"sampler": Euler(steps=2), "guidance_scale": 2.0, **kwargs}
    return TeacherModule(tiny_dit(), RectifiedFlow(), prediction="velocity", **kwargs)


def make_trainer(max_steps: int, tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    """Quiet deterministic CPU trainer."""
    return quiet_trainer(max_steps, tmp_path, deterministic=True, **kwargs)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> str:
    """A tiny random VAE folder (factor 4: 8x8 latents -> 32 px images)."""
    torch.manual_seed(0)
    vae = VAE(block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=4)
    vae.set_latent_scale(1.0, 0.0)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return str(folder)


def eval_loss(module: TeacherModule, batch: dict) -> float:
    """Mean loss over fixed draws of (t, noise)."""
    with torch.no_grad():
        losses = [module._loss(batch, torch.Generator().manual_seed(s)) for s in range(8)]
    return float(torch.stack(losses).mean())


def test_fit_lowers_the_loss():
    data = FakeLatentData()
    module = teacher(optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    before = eval_loss(module, data.batch)
    make_trainer(30, gradient_clip_val=1.0).fit(module, data)
    after = eval_loss(module, data.batch)
    assert after < 0.6 * before, (before, after)


def test_compile_keeps_parameter_names_and_trains():
    data = FakeLatentData()
    module = teacher(compile=True, compile_kwargs={"backend": "eager"})  # inductor: GPU bench
    names = [n for n, _ in module.named_parameters()]
    make_trainer(2).fit(module, data)
    assert module.network._compiled_call_impl is not None
    assert [n for n, _ in module.named_parameters()] == names
    assert all("_orig_mod" not in k for k in module.state_dict())


def test_validation_logs_geneval_scores(vae_dir):
    module = teacher(vae_path=vae_dir, val_num_samples=6)
    metrics = make_trainer(1, limit_val_batches=1).validate(module, FakeLatentData(), verbose=False)
    logged = metrics[0]
    assert "val/loss" in logged and logged["val/nfe"] == 2 * 2  # 2 Euler steps, CFG: 2 passes
    keys = {k.removeprefix("val/geneval/") for k in logged if k.startswith("val/geneval/")}
    assert keys == {*CATEGORIES, "overall", "overall_se"}  # 6 samples cycle through the 6
    assert all(0.0 <= logged[f"val/geneval/{k}"] <= 1.0 for k in keys)
    assert module.val_geneval.total.sum() == 0  # reset after logging


def test_bad_vae_path_names_the_field(tmp_path):
    module = teacher(vae_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="vae_path"):
        make_trainer(1, limit_val_batches=1).validate(module, FakeLatentData(), verbose=False)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_generate_at_scale_one_is_the_unguided_sampler(learn_sigma):
    torch.manual_seed(0)
    net, process, data = tiny_dit(learn_sigma), RectifiedFlow(), FakeLatentData()
    for linear in (net.final_layer.linear, *(b.cross_attn.proj for b in net.blocks)):
        torch.nn.init.normal_(linear.weight, std=0.1)  # zero-initialised: text must matter
    text, mask = data.batch["text"][:3], data.batch["text_mask"][:3]
    noise = fixed_noise((4, 8, 8), [0, 1, 2], seed=5)
    sampler = Euler(steps=3)
    denoiser = Denoiser(net, process, "velocity", learn_sigma)
    with torch.no_grad():
        guided = generate(denoiser, sampler, text, mask, noise, 1.0, data.null_text())
        plain = sampler(denoiser.bind(text=text, text_mask=mask), noise)
        strong = generate(denoiser, sampler, text, mask, noise, 4.0, data.null_text())
    assert guided.shape == (3, 4, 8, 8)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)
    assert not torch.allclose(strong, plain)
    assert torch.equal(fixed_noise((4, 8, 8), [1], seed=5)[0], noise[1])  # per-index noise


def test_cfg_callback_logs_grids(tmp_path, vae_dir):
    logger = TensorBoardLogger(tmp_path, name="teacher", version="")
    grid_args = {"num_prompts": 4, "guidance_scales": [1.0, 3.0], "steps": [1, 2]}
    callback = CFGEvalCallback(every_n_steps=2, **grid_args)
    module = teacher(vae_path=vae_dir, val_num_samples=0, sampler=DDIM(steps=2))
    trainer = make_trainer(4, tmp_path, logger=logger, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, FakeLatentData())
    pngs = sorted(p.name for p in (tmp_path / "teacher" / "cfg_eval").glob("*.png"))
    assert len(pngs) == 2 * 4  # steps 2 and 4, each 2 scales x 2 step counts
    assert "step0000002_scale3_steps1.png" in pngs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "teacher"))
    events.Reload()
    assert "cfg/scale_3/steps_2" in events.Tags()["images"]


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of all parameters."""
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_interrupted_run_resumes_exactly(tmp_path, vae_dir):
    def run(steps: int, ckpt: Path | None = None) -> tuple[TeacherModule, EMA, pl.Trainer]:
        pl.seed_everything(0)
        ema = EMA(decay=0.9)
        module = teacher(vae_path=vae_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        trainer = make_trainer(steps, tmp_path, callbacks=[ema], gradient_clip_val=1.0)
        trainer.fit(module, FakeLatentData(), ckpt_path=ckpt)
        return module, ema, trainer

    straight, straight_ema, _ = run(6)
    _, _, first = run(3)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_ema, _ = run(6, tmp_path / "half.ckpt")

    a, b = snapshot(straight.network), snapshot(resumed.network)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed_ema.names == straight_ema.names and resumed_ema.num_updates == 6
    shadows = zip(straight_ema.shadow, resumed_ema.shadow, strict=True)
    assert all(torch.equal(x, y) for x, y in shadows)
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith("network.") for k in state)  # no VAE, no metric state


CONFIGS = sorted((ROOT / "configs/teacher").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_teacher_configs_parse(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *config_args(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "TeacherModule" in capsys.readouterr().out
