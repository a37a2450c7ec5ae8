"""Flux as teacher: the pooled text vector (``cond``) from the cache through the datamodule (text
dropout drawn once for both), rectified-flow training from YAML, one pass per step for a
guidance-embedded (FLUX.1-dev style) teacher, and FluxPipeline exports equal to our sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxPipeline
from torch import Tensor

from fewstep.cli import run
from fewstep.data.cache import LatentCache
from fewstep.data.cache_builder import build_cache
from fewstep.data.datamodule import CachedLatentDataModule, CachedLatentDataset, collate
from fewstep.data.shapes import ShapesWorld
from fewstep.diffusion.guidance import ClassifierFreeGuidance, GuidanceEmbedded
from fewstep.diffusion.samplers import Euler
from fewstep.diffusion.schedules import RectifiedFlow
from fewstep.diffusion.timesteps import LogitNormal
from fewstep.export.flux_pipeline import export_flux_pipeline
from fewstep.lightning.sampling import generate
from fewstep.lightning.teacher_module import TeacherModule, network_denoiser
from fewstep.models.flux import Flux, pack_latents, unpack_latents
from fewstep.models.vae import VAE
from fewstep.utils.seeding import mix_seed

CONFIG = Path(__file__).parents[1] / "configs/teacher/flux_shapes.yaml"
CHANNELS, TEXT_DIM, POOLED_DIM, TOKENS = 4, 16, 12, 6


class PooledText:
    """A text encoder with a pooled output, as FluxTextEncoder: fixed-length tokens (all valid)
    and a per-caption vector, both deterministic functions of the caption."""

    def _rows(self, captions: list[str], shape: tuple[int, ...]) -> Tensor:
        rows = [
            torch.randn(shape, generator=torch.Generator().manual_seed(len(c) * 7 + c.count("a")))
            for c in captions
        ]
        return torch.stack(rows)

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self._rows(captions, (TOKENS, TEXT_DIM)), torch.ones(
            len(captions), TOKENS, dtype=bool
        )

    def pooled(self, captions: list[str]) -> Tensor:
        return self._rows(captions, (POOLED_DIM,)) + 1.0

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        return self([""])

    def null_pooled(self) -> Tensor:
        return self.pooled([""])

    def fingerprint(self) -> dict[str, str]:
        return {"t5_weights": "fake", "clip_weights": "fake"}


class PoolVAE(torch.nn.Module):
    """Avg-pool by 4 and a fixed 1x1 projection to 4 channels: the posterior mean; small std."""

    scaling_factor, shift_factor = 0.5, 0.25

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, CHANNELS, 1)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.proj(torch.nn.functional.avg_pool2d(images, 4))  # [B,3,32,32] -> [B,4,8,8]
        return mean, torch.full_like(mean, 0.05)

    def fingerprint(self) -> dict[str, str]:
        return {"config": "pool", "weights": "seed0"}


@pytest.fixture(scope="module")
def flux_cache(tmp_path_factory) -> Path:
    """A 16-sample cache with T5-like tokens and a pooled vector per caption (two shards)."""
    out = tmp_path_factory.mktemp("flux_cache") / "cache"
    dataset = ShapesWorld(size=16, resolution=32, seed=0)
    with torch.inference_mode():
        build_cache(
            dataset, PoolVAE(), PooledText(), out, shard_size=8, batch_size=8, progress=False
        )
    return out


def tiny_flux(guidance_embed: bool, seed: int = 0, context: int = TEXT_DIM) -> Flux:
    """A 1+1-block Flux with random (non-zero) weights everywhere."""
    torch.manual_seed(seed)
    net = Flux(
        in_channels=CHANNELS,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        context_in_dim=context,
        vec_in_dim=POOLED_DIM,
        axes_dim=(4, 6, 6),
        guidance_embed=guidance_embed,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net.eval()


# ---------------------------------------------------------------------------- data


def test_cache_reads_the_pooled_vectors_and_their_null(flux_cache: Path) -> None:
    cache = LatentCache(flux_cache, verify="all")
    encoder = PooledText()
    captions = [r["caption"] for r in cache.read_records(range(len(cache)))]
    assert cache.pooled_dim == POOLED_DIM
    expected = encoder.pooled(captions).numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(cache.read_pooled(range(len(cache))), expected)
    null = encoder.null_pooled()[0].numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(cache.null_pooled(), null)


def test_dropped_rows_get_the_null_pooled_vector_from_the_text_draw(flux_cache: Path) -> None:
    cache = LatentCache(flux_cache)
    dataset = CachedLatentDataset(cache, text_dropout=0.5, seed=3)
    keys = [16 * 5 + k for k in (3, 0, 9, 14, 7, 2, 11, 5)]  # epoch 5's draw keys
    batch = dataset.__getitems__(keys)
    # the dropout draw, recomputed: seeded by (seed, first draw key), one uniform per row
    gen = torch.Generator().manual_seed(mix_seed(3, keys[0]))
    drop = (torch.rand(len(keys), generator=gen) < 0.5).numpy()
    assert 0 < drop.sum() < len(keys)
    indices = np.asarray(keys) % 16
    stored_text = np.stack(cache.read_texts(indices)).astype(np.float32)
    stored_pooled = cache.read_pooled(indices)
    null_text = cache.null_text().astype(np.float32)
    for row, dropped in enumerate(drop):
        text = null_text if dropped else stored_text[row]
        pooled = cache.null_pooled() if dropped else stored_pooled[row]
        np.testing.assert_array_equal(batch["text"][row].numpy(), text)
        np.testing.assert_array_equal(batch["cond"][row].numpy(), pooled)
    assert batch["cond"].dtype == torch.float32 and batch["cond"].shape == (8, POOLED_DIM)
    again = dataset.__getitems__(keys)  # a resumed read of the same keys is identical
    torch.testing.assert_close(again["cond"], batch["cond"], rtol=0, atol=0)
    undropped = CachedLatentDataset(cache, seed=3)  # per-sample reads collate to the same
    singles = collate([undropped[k] for k in keys])
    torch.testing.assert_close(singles["cond"], undropped.__getitems__(keys)["cond"])


def test_datamodule_null_text_adds_the_null_pooled_vector(flux_cache: Path, tmp_path) -> None:
    dm = CachedLatentDataModule(str(flux_cache), batch_size=4, text_dropout=0.0)
    text, mask, pooled = dm.null_text()
    assert dm.pooled_dim == POOLED_DIM and pooled.shape == (1, POOLED_DIM)
    np.testing.assert_array_equal(pooled[0].numpy(), LatentCache(flux_cache).null_pooled())
    assert text.shape == (1, TOKENS, TEXT_DIM) and mask.all()
    off = CachedLatentDataModule(str(flux_cache), batch_size=4, pooled_text="none")
    off.setup()
    assert off.pooled_dim is None and len(off.null_text()) == 2
    assert "cond" not in off.train_dataset.__getitems__([0, 1])


def test_single_encoder_caches_keep_their_batches_or_pool_their_tokens(tmp_path) -> None:
    from test_flux_cache import OneOutputText

    root = tmp_path / "one"
    with torch.inference_mode():
        dataset = ShapesWorld(size=6, resolution=32, seed=0)
        build_cache(dataset, PoolVAE(), OneOutputText(), root, shard_size=6, progress=False)
    cache = LatentCache(root)
    assert cache.pooled_dim is None and cache.null_pooled() is None
    plain = CachedLatentDataset(cache, text_dropout=0.5, seed=1)
    batch = plain.__getitems__([0, 1, 2, 3])
    assert "cond" not in batch
    pooled = CachedLatentDataset(cache, text_dropout=0.5, seed=1, pooled_text="mean_tokens")
    same = pooled.__getitems__([0, 1, 2, 3])
    torch.testing.assert_close(same["text"], batch["text"], rtol=0, atol=0)  # same draw
    for row in range(4):  # the mean of each row's valid tokens (null ones where dropped)
        valid = batch["text"][row][batch["text_mask"][row]]
        torch.testing.assert_close(same["cond"][row], valid.mean(0), rtol=0, atol=1e-6)
    dm = CachedLatentDataModule(str(root), batch_size=2, pooled_text="mean_tokens")
    _, _, null = dm.null_text()
    torch.testing.assert_close(null[0], torch.from_numpy(cache.null_text()).float().mean(0))


# ---------------------------------------------------------------------------- teacher


def flux_batch(flux_cache: Path) -> dict:
    """The first four samples of the cache as a training batch, with text dropout."""
    dataset = CachedLatentDataset(LatentCache(flux_cache), text_dropout=0.5, seed=0)
    return dataset.__getitems__([0, 1, 2, 3])


def test_teacher_loss_feeds_cond_and_the_guidance_input(flux_cache: Path) -> None:
    net = tiny_flux(guidance_embed=True)
    module = TeacherModule(net, RectifiedFlow(), "velocity", LogitNormal(), guidance_scale=3.5)
    batch = flux_batch(flux_cache)
    loss = module._loss(batch, torch.Generator().manual_seed(7))
    # by hand: x_t = (1 - t) x0 + t eps, the velocity target eps - x0, guidance 3.5 (SD3 eq. 3)
    gen = torch.Generator().manual_seed(7)
    x0 = batch["latents"]
    eps = torch.randn(x0.shape, generator=gen)
    t = LogitNormal()(4, generator=gen)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    guidance = torch.full((4,), 3.5)
    with torch.no_grad():
        v = net(x_t, 1000 * t, batch["text"], batch["text_mask"], batch["cond"], guidance)
    torch.testing.assert_close(loss.detach(), (v - (eps - x0)).pow(2).mean(), rtol=1e-5, atol=0)
    assert isinstance(module.denoiser, GuidanceEmbedded)
    plain = TeacherModule(tiny_flux(guidance_embed=False), RectifiedFlow(), "velocity")
    assert not isinstance(plain.denoiser, GuidanceEmbedded)


def count_passes(net: Flux) -> list[int]:
    """Batch sizes of every forward of ``net`` from now on."""
    sizes: list[int] = []
    net.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes


@torch.no_grad()
def test_guidance_embedded_teacher_costs_one_pass_per_step(flux_cache: Path) -> None:
    batch = flux_batch(flux_cache)
    text, mask, cond = batch["text"], batch["text_mask"], batch["cond"]
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1))
    sampler = Euler(steps=3)
    null = CachedLatentDataModule(str(flux_cache)).null_text()

    dev_net = tiny_flux(guidance_embed=True)
    dev = TeacherModule(dev_net, RectifiedFlow(), "velocity", sampler=sampler, guidance_scale=3.5)
    dev._null_text = None  # no datamodule: a guidance-embedded teacher needs no null text
    passes = count_passes(dev_net)
    guided = dev.sample_latents(text, mask, noise, cond=cond)
    assert dev.nfe == 3 and passes == [4, 4, 4]  # one conditional pass of batch B per step
    x = noise.clone()  # Euler by hand with guidance 3.5 fed to the network
    times = torch.linspace(1, 0, 4)
    for t, s in zip(times[:-1], times[1:], strict=True):
        v = dev_net(x, torch.full((4,), 1000 * float(t)), text, mask, cond, torch.full((4,), 3.5))
        x = x + (s - t) * v
    torch.testing.assert_close(guided, x, rtol=1e-5, atol=1e-5)

    cfg_net = tiny_flux(guidance_embed=False)
    cfg = TeacherModule(cfg_net, RectifiedFlow(), "velocity", sampler=sampler, guidance_scale=3.5)
    cfg._null_text = null
    passes = count_passes(cfg_net)
    cfg.sample_latents(text, mask, noise, cond=cond)
    assert cfg.nfe == 6 and passes == [8, 8, 8]  # cond + uncond batched: two passes per step
    cfg.guidance_scale = 1.0
    assert cfg.nfe == 3


@torch.no_grad()
def test_cfg_over_a_guidance_embedded_denoiser_is_its_guided_pass() -> None:
    net = tiny_flux(guidance_embed=True)
    denoiser = network_denoiser(net, RectifiedFlow(), "velocity", scale=1.0)
    x, t = torch.randn(2, CHANNELS, 4, 4), torch.tensor([0.3, 0.8])
    cond = {"text": torch.randn(2, 3, TEXT_DIM), "text_mask": torch.ones(2, 3, dtype=bool)}
    cond["cond"] = torch.randn(2, POOLED_DIM)
    scale = torch.tensor([2.0, 5.0])  # per-sample scales, as guidance distillation draws them
    guided = ClassifierFreeGuidance(denoiser, scale, cond, {})(x, t)
    direct = net(x, 1000 * t, cond["text"], cond["text_mask"], cond["cond"], scale)
    torch.testing.assert_close(guided.eps - guided.x0, direct, rtol=1e-5, atol=1e-5)


def fit_overrides(cache: Path, root: Path, guidance_embed: bool) -> list[str]:
    """Run configs/teacher/flux_shapes.yaml on the tiny Flux cache: 3 steps, tiny network."""
    net = "--model.init_args.network.init_args."
    return [
        "-c",
        str(CONFIG),
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.callbacks=[]",
        f"{net}in_channels={CHANNELS}",
        f"{net}hidden_size=32",
        f"{net}num_heads=2",
        f"{net}depth=1",
        f"{net}depth_single_blocks=1",
        f"{net}context_in_dim={TEXT_DIM}",
        f"{net}vec_in_dim={POOLED_DIM}",
        f"{net}axes_dim=[4, 6, 6]",
        f"{net}guidance_embed={str(guidance_embed).lower()}",
        "--model.init_args.vae_path=null",
        "--model.init_args.sampler.init_args.steps=2",
        "--data.init_args.path",
        str(cache),
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.25",
        "--data.init_args.pooled_text=cache",
    ]


def test_fewstep_fit_trains_the_flux_teacher_from_yaml(flux_cache: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["network"]
    assert config["class_path"] == "fewstep.models.flux.Flux"
    cli = run(["fit", *fit_overrides(flux_cache, tmp_path, guidance_embed=True)])
    module = cli.model
    assert cli.trainer.global_step == 3 and isinstance(module.network, Flux)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    fresh = run(["fit", *fit_overrides(flux_cache, tmp_path / "b", True), "--trainer.max_steps=0"])
    trained, initial = module.network.state_dict(), fresh.model.network.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    assert not torch.equal(
        trained["vector_in.in_layer.weight"], initial["vector_in.in_layer.weight"]
    )
    # `fewstep export` writes the trained teacher as a FluxPipeline at its guidance scale
    (ckpt,) = tmp_path.glob("teacher_flux/checkpoints/*.ckpt")
    tiny_vae().save_pretrained(tmp_path / "vae")
    args = ["--config", str(tmp_path / "teacher_flux/config.yaml"), "--ckpt_path", str(ckpt)]
    out = ["--out", str(tmp_path / "pipe"), "--vae_path", str(tmp_path / "vae")]
    result = run(["export", *args, *out])
    record = json.loads((Path(result["pipeline"]) / "fewstep_export.json").read_text())
    assert result["kind"] == "flux" and record["pipeline_call"] == {
        "num_inference_steps": 2,
        "height": 16,
        "width": 16,
        "guidance_scale": 3.0,
    }


# ---------------------------------------------------------------------------- export


def tiny_vae() -> VAE:
    """A factor-2 VAE with 4 latent channels and FLUX.1's latent scaling and shift."""
    torch.manual_seed(0)
    vae = VAE(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=CHANNELS)
    vae.set_latent_scale(0.3611, 0.1159)
    return vae


def pipeline_latents(pipe: FluxPipeline, call: dict, inputs: dict, noise: Tensor) -> Tensor:
    """FluxPipeline's latents from packed ``noise``, unpacked to [B, C, h, w]."""
    call = {k: v for k, v in call.items() if k != "negative_prompt"}
    negative = {}
    if "true_cfg_scale" in call:  # the empty caption, as embeddings (no text encoders here)
        negative = {
            "negative_prompt_embeds": inputs["null"],
            "negative_pooled_prompt_embeds": inputs["null_cond"],
        }
    packed = pipe(
        prompt_embeds=inputs["text"],
        pooled_prompt_embeds=inputs["cond"],
        latents=pack_latents(noise),
        output_type="latent",
        max_sequence_length=inputs["text"].shape[1],
        **negative,
        **call,
    ).images  # [B, h*w/4, 4C]
    return unpack_latents(packed, *noise.shape[-2:])


@pytest.mark.parametrize(
    ("guidance_embed", "shift", "spacing"),
    [(True, 1.0, "trailing"), (True, 3.0, "linspace"), (False, 1.0, "trailing")],
)
@torch.no_grad()
def test_flux_pipeline_export_reproduces_our_euler_sampling(
    tmp_path: Path, guidance_embed: bool, shift: float, spacing: str
) -> None:
    net, process, scale = tiny_flux(guidance_embed), RectifiedFlow(shift=shift), 3.5
    sampler = Euler(steps=4, spacing=spacing)
    out = export_flux_pipeline(
        net, tiny_vae(), tmp_path / "pipe", process, "velocity", sampler, (8, 6), scale, [1, 2, 4]
    )
    record = json.loads((out / "fewstep_export.json").read_text())
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert (vae_config["scaling_factor"], vae_config["shift_factor"]) == (0.3611, 0.1159)
    assert "FluxPipeline" in (out / "README.md").read_text()
    text_parts = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = FluxPipeline.from_pretrained(out, **text_parts)  # exported without text encoders
    assert "text_encoder=None" in (out / "README.md").read_text()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "text": torch.randn(2, 5, TEXT_DIM, generator=g),
        "cond": torch.randn(2, POOLED_DIM, generator=g),
        "null": torch.randn(1, 5, TEXT_DIM, generator=g).expand(2, -1, -1),
        "null_cond": torch.randn(1, POOLED_DIM, generator=g).expand(2, -1),
    }
    noise = torch.randn(2, CHANNELS, 8, 6, generator=g)
    mask = torch.ones(2, 5, dtype=bool)
    denoiser = network_denoiser(net, process, "velocity", scale)
    null = (inputs["null"][:1], mask[:1], inputs["null_cond"][:1])
    for steps in (1, 2, 4):
        call = record["pipeline_calls"][str(steps)]
        assert ("guidance_scale" in call) == guidance_embed
        assert ("true_cfg_scale" in call) == (not guidance_embed)
        assert ("sigmas" in call) == (spacing != "trailing" and steps > 1)  # 1 step: t = 1
        ours = generate(
            denoiser, sampler.with_steps(steps), inputs["text"], mask, noise, scale, null,
            cond=inputs["cond"],
        )  # fmt: skip
        theirs = pipeline_latents(pipe, call, inputs, noise)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
