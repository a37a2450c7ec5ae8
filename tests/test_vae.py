"""The VAE wrapper, its discriminator/perceptual losses and the VAE LightningModule."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from fewstep.lightning.vae_module import VAEModule
from fewstep.models.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from fewstep.models.perceptual import FeaturePerceptualLoss
from fewstep.models.vae import VAE

TINY = {"block_out_channels": (8, 16, 16), "norm_num_groups": 4}
COLORS = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=torch.float32)


def squares(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` images [3,size,size] in [-1,1]: a coloured square on a grey background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), -0.2)
    for i in range(n):
        side = int(torch.randint(8, 16, (1,), generator=g))
        x, y = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, :, y : y + side, x : x + side] = COLORS[i % len(COLORS)].view(3, 1, 1)
    return images


class Squares(Dataset):
    """Fixed coloured-square images as {"image", "caption"} dicts."""

    def __init__(self, n: int = 8) -> None:
        self.images = squares(n)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": f"square {i}"}


def loader(n: int = 8, batch_size: int = 8) -> DataLoader:
    """Deterministic loader of coloured squares."""
    return DataLoader(Squares(n), batch_size=batch_size, shuffle=False)


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer without logger or checkpoints."""
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.mark.parametrize(("blocks", "factor"), [((8, 16, 16), 4), ((8, 16, 16, 16), 8)])
def test_encode_decode_shapes(blocks, factor):
    vae = VAE(block_out_channels=blocks, norm_num_groups=4, latent_channels=4)
    assert vae.downsample_factor == factor and vae.latent_channels == 4
    images = squares(2)
    with torch.no_grad():
        mean, std = vae.encode_moments(images)
        latents = vae.encode(images, sample=True)
        out = vae.decode(latents)
    assert mean.shape == std.shape == latents.shape == (2, 4, 32 // factor, 32 // factor)
    assert (std > 0).all() and out.shape == images.shape


def test_normalize_denormalize_round_trip():
    vae = VAE(**TINY, scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(vae.normalize(z), (z - 0.25) * 0.5)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-6)


def test_save_and_load_pretrained_round_trip(tmp_path):
    vae = VAE(**TINY, scaling_factor=0.37, shift_factor=-0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-zero shift warning
        vae.save_pretrained(tmp_path / "vae")
    loaded = VAE.from_pretrained(tmp_path / "vae").eval()
    vae.eval()  # diffusers loads in eval mode; train-mode decode differs by ~1e-6
    images = squares(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), vae.encode(images))
        assert torch.equal(
            loaded.decode(torch.ones(2, 4, 8, 8)), vae.decode(torch.ones(2, 4, 8, 8))
        )
    assert loaded.scaling_factor.item() == pytest.approx(0.37)
    assert loaded.shift_factor.item() == pytest.approx(-0.1)
    assert loaded.has_latent_scale and loaded.fingerprint() == vae.fingerprint()
    plain = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert plain.config.scaling_factor == pytest.approx(0.37)
    assert plain.config.shift_factor == pytest.approx(-0.1)
    # a pipeline folder with a vae/ subfolder also loads
    assert VAE(pretrained_path=str(tmp_path)).scaling_factor.item() == pytest.approx(0.37)


def test_imported_vae_without_scaling_factor_is_unmeasured(tmp_path):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor"', '"unused"'))
    vae = VAE(pretrained_path=str(tmp_path))
    assert not vae.has_latent_scale and vae.scaling_factor.item() == 1.0
    assert VAE(pretrained_path=str(tmp_path), scaling_factor=0.2).has_latent_scale


def test_missing_pretrained_path_names_the_path(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VAE(pretrained_path=str(missing))


def test_fingerprint_changes_with_scale():
    vae = VAE(**TINY)
    before = vae.fingerprint()
    vae.set_latent_scale(2.0, 0.0)
    assert vae.fingerprint()["config"] != before["config"]


def test_measure_latent_scale_normalises_the_data():
    vae = VAE(**TINY)
    images = squares(16)
    scale, shift = vae.measure_latent_scale([images[:8], images[8:]])
    assert vae.has_latent_scale and vae.scaling_factor.item() == pytest.approx(scale, rel=1e-6)
    with torch.no_grad():
        z = vae.encode(images)
    assert abs(z.mean().item()) < 1e-3 and z.std().item() == pytest.approx(1.0, rel=1e-2)
    assert shift != 0.0


def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_patch_discriminator_gives_patch_logits():
    disc = PatchDiscriminator(channels=8, num_layers=2, norm_num_groups=4)
    assert disc(squares(2)).shape == (2, 1, 6, 6)


def test_perceptual_loss_loads_local_weights_and_is_frozen(tmp_path):
    full = timm.create_model("test_resnet")  # weights file holds the classifier head too
    save_file(full.state_dict(), tmp_path / "w.safetensors")
    loss = FeaturePerceptualLoss("test_resnet", str(tmp_path / "w.safetensors"))
    for name, value in loss.net.state_dict().items():
        assert torch.equal(value, full.state_dict()[name])
    assert not any(p.requires_grad for p in loss.parameters())
    a, b = squares(2, seed=0), squares(2, seed=1).requires_grad_()
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    dist = loss(b, a)
    dist.backward()
    assert dist.item() > 0 and b.grad.abs().sum() > 0
    loss.train()
    assert not loss.net.training


def test_perceptual_loss_warns_without_weights_and_names_missing_file(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):
        FeaturePerceptualLoss("test_resnet")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        FeaturePerceptualLoss("test_resnet", str(tmp_path / "nope.pth"))


@torch.no_grad()
def recon_l1(vae: VAE, images: torch.Tensor) -> float:
    """L1 error of the posterior-mean reconstruction."""
    return (vae.decode_raw(vae.encode_moments(images)[0]) - images).abs().mean().item()


def test_training_reduces_reconstruction_loss_and_exports(tmp_path):
    torch.manual_seed(0)
    module = VAEModule(VAE(**TINY), measure_scale_batches=1, export_dir=str(tmp_path / "vae"))
    before = recon_l1(module.vae, squares(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-zero shift warning on export
        trainer(60).fit(module, loader(4, 4))
    after = recon_l1(module.vae, squares(4))
    assert after < before / 2.5, (before, after)
    assert module.generator_steps == 60 and module.vae.has_latent_scale  # measured at fit end
    exported = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert exported.config.scaling_factor == pytest.approx(module.vae.scaling_factor.item())
    assert exported.config.shift_factor == pytest.approx(module.vae.shift_factor.item())


class ParamRecorder(pl.Callback):
    """Snapshots the discriminator's parameters after every training batch."""

    def __init__(self) -> None:
        self.snapshots: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        vector = torch.nn.utils.parameters_to_vector(pl_module.discriminator.parameters())
        self.snapshots.append(vector.detach().clone())


def test_discriminator_trains_only_after_start_step(tmp_path):
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, num_layers=2, norm_num_groups=4)
    initial = torch.nn.utils.parameters_to_vector(disc.parameters()).detach().clone()
    module = VAEModule(VAE(**TINY), discriminator=disc, disc_start_step=2)
    recorder = ParamRecorder()
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    # manual optimisation: global_step counts both optimisers' steps (2 + 2 * 2 = 6)
    trainer(
        6,
        callbacks=[recorder],
        logger=logger,
        limit_val_batches=1,
        check_val_every_n_epoch=4,
        log_every_n_steps=1,
    ).fit(module, loader(), loader())
    assert len(recorder.snapshots) == 4 and module.generator_steps == 4
    assert torch.equal(recorder.snapshots[0], initial)
    assert torch.equal(recorder.snapshots[1], initial)
    assert not torch.equal(recorder.snapshots[2], initial)
    assert not torch.equal(recorder.snapshots[3], recorder.snapshots[2])
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")))).Reload()
    assert "val/inputs_vs_reconstructions" in events.Tags()["images"]
    assert {"train/g", "train/d", "train/kl", "val/psnr", "val/d"} <= set(events.Tags()["scalars"])


def test_perceptual_weights_are_not_checkpointed_and_checkpoint_reloads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = VAEModule(
            VAE(**TINY),
            perceptual=FeaturePerceptualLoss("test_resnet"),
            perceptual_weight=0.1,
            measure_scale_batches=1,
        )
    run = trainer(2, enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(module, loader())
    path = tmp_path / "vae.ckpt"
    run.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith("perceptual.") for k in state)
    assert "vae.scaling_factor" in state and "vae.latent_scale_known" in state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = VAEModule(VAE(**TINY), perceptual=FeaturePerceptualLoss("test_resnet"))
    fresh.on_load_checkpoint(ckpt := torch.load(path, weights_only=False))
    fresh.load_state_dict(ckpt["state_dict"])  # strict
    assert torch.equal(fresh.vae.scaling_factor, module.vae.scaling_factor)
    assert fresh.generator_steps == 2


def test_train_crop_is_a_step_seeded_window():
    module = VAEModule(VAE(**TINY), train_crop=16)
    images = squares(2)
    first = module._random_crop(images)
    assert first.shape == (2, 3, 16, 16)
    assert torch.equal(first, module._random_crop(images))  # same step, same window (resume)
    windows = set()
    for step in range(8):
        module.generator_steps = step
        crop = module._random_crop(images)
        matches = [
            (y, x)
            for y in range(17)
            for x in range(17)
            if torch.equal(crop, images[..., y : y + 16, x : x + 16])
        ]
        assert matches, "the crop is a window of the input"
        windows.add(matches[0])
    assert len(windows) > 1  # the window moves with the step
    assert VAEModule(VAE(**TINY), train_crop=64)._random_crop(images) is images


@pytest.mark.parametrize("sample_posterior", [True, False])
def test_posterior_sampling_switch(sample_posterior, monkeypatch):
    torch.manual_seed(0)
    module = VAEModule(VAE(**TINY), sample_posterior=sample_posterior)
    encoded: list[torch.Tensor] = []
    decoded: list[torch.Tensor] = []
    encode, decode = module.vae.encode_moments, module.vae.decode_raw
    monkeypatch.setattr(
        module.vae,
        "encode_moments",
        lambda x: encoded.append(encode(x)[0]) or (encoded[-1], torch.full_like(encoded[-1], 0.5)),
    )
    monkeypatch.setattr(module.vae, "decode_raw", lambda z: decoded.append(z) or decode(z))
    trainer(1).fit(module, loader(4, 4))
    assert len(decoded) == 1
    noise = (decoded[0] - encoded[0]) / 0.5
    if sample_posterior:
        assert 0.8 < noise.std().item() < 1.2  # z = mean + std * eps, eps ~ N(0, 1)
    else:
        assert torch.equal(decoded[0], encoded[0])  # z = mean


def test_fit_end_exports_the_ema_average(tmp_path):
    from fewstep.lightning.ema import EMA

    torch.manual_seed(0)
    module = VAEModule(VAE(**TINY), measure_scale_batches=1, export_dir=str(tmp_path / "vae"))
    ema = EMA(decay=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(5, callbacks=[ema]).fit(module, loader(4, 4))
    exported = VAE.from_pretrained(tmp_path / "vae")
    average = dict(zip(ema.names, ema.shadow, strict=True))
    for name, param in exported.named_parameters():
        if name in average:
            assert torch.equal(param, average[name]), name


def test_validation_scores_shapes_reconstructions_and_scheduler_steps():
    from fewstep.data.images import ImageDataModule
    from fewstep.data.shapes import ShapesWorld

    torch.manual_seed(0)
    world = ShapesWorld(size=8, resolution=32, seed=0)
    data = ImageDataModule(train=world, val=world, batch_size=4)
    module = VAEModule(
        VAE(**TINY),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s),
    )
    fit = trainer(3, limit_val_batches=2, val_check_interval=3, check_val_every_n_epoch=None)
    fit.fit(module, datamodule=data)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)
    metrics = fit.callback_metrics
    assert 0.0 <= float(metrics["val/geneval/overall"]) <= 1.0
    assert "val/geneval/single_object" in metrics or "val/geneval/colors" in metrics
