"""Real PixArt-Σ folders in, diffusers PixArtSigmaPipeline folders out (parity with diffusers)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import (
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from tiny_t5 import make_tiny_t5, make_tiny_tokenizer
from torch.utils.data import DataLoader
from transformers import T5EncoderModel

from fewstep.cli import run
from fewstep.diffusion import DDIM, DDPM, DiscreteDDPM, DPMSolver2M, Euler, Heun, RectifiedFlow
from fewstep.export.pixart_pipeline import EXPORT_RECORD, export_pixart_sigma_pipeline
from fewstep.export.schedulers import diffusers_scheduler, pipeline_call_kwargs
from fewstep.lightning.checkpoints import load_module
from fewstep.lightning.ema import EMA
from fewstep.lightning.teacher_module import TeacherModule
from fewstep.models.dit_convert import state_dict_to_diffusers
from fewstep.models.pixart_io import (
    PretrainedDiT,
    pipeline_text_encoder_path,
    pipeline_vae_path,
    text_encoder_folders,
)
from fewstep.models.text_encoder import TextEncoder
from fewstep.models.vae import VAE

TEXT_DIM, LENGTH, CHANNELS, SIZE = 32, 6, 4, 8  # tiny T5 width; latents 4 x 8 x 8
# diffusers' DPM-Solver scheduler builds numpy arrays from tensors the numpy-1 way
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def tiny_transformer(
    in_channels: int = CHANNELS, caption_channels: int = TEXT_DIM, sample_size: int = SIZE
) -> PixArtTransformer2DModel:
    """A 2-block random PixArt-Σ transformer with learned sigma and no size conditioning."""
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        num_layers=2,
        cross_attention_dim=32,
        caption_channels=caption_channels,
        sample_size=sample_size,
        patch_size=2,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    )
    with torch.no_grad():  # diffusers zero-inits some layers: randomise all for a real test
        for param in model.parameters():
            param.copy_(0.1 * torch.randn_like(param))
    return model


def save_tiny_pipeline(
    folder: Path,
    transformer: PixArtTransformer2DModel,
    vae: VAE,
    text_encoder: T5EncoderModel | None = None,
) -> Path:
    """A PixArtSigmaPipeline folder as the Hub ships it (DPM-Solver++ scheduler)."""
    vae.autoencoder.register_to_config(scaling_factor=float(vae.scaling_factor))
    pipe = PixArtSigmaPipeline(
        tokenizer=make_tiny_tokenizer() if text_encoder is not None else None,
        text_encoder=text_encoder,
        vae=vae.autoencoder,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    )
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random PixArt-Σ pipeline folder: transformer, VAE, T5 + tokenizer, scheduler."""
    root = tmp_path_factory.mktemp("pixart")
    torch.manual_seed(0)
    transformer = tiny_transformer()
    vae = VAE(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=CHANNELS)
    vae.set_latent_scale(0.5, 0.0)
    t5 = T5EncoderModel.from_pretrained(make_tiny_t5(root / "t5"))
    return save_tiny_pipeline(root / "PixArt-Sigma-tiny", transformer, vae, t5)


def text_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings [2, L, D] with a padded mask (lengths L and 3), and a null text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, LENGTH, TEXT_DIM, generator=g)  # padded rows stay non-zero on purpose
    mask = torch.arange(LENGTH)[None] < torch.tensor([[LENGTH], [3]])  # [2, L]
    null = torch.randn(1, 2, TEXT_DIM, generator=g)
    return text, mask, null, torch.ones(1, 2, dtype=torch.bool)


# ----------------------------------------------------------------------------------- (a) in


@pytest.mark.parametrize("sub", ["", "transformer"])
def test_pretrained_dit_matches_diffusers_transformer(pipeline_dir: Path, sub: str) -> None:
    net = PretrainedDiT(str(pipeline_dir / sub) if sub else str(pipeline_dir)).eval()
    ref = PixArtTransformer2DModel.from_pretrained(pipeline_dir / "transformer").eval()
    assert net.learn_sigma and net.out_channels == 2 * CHANNELS
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    text, mask, _, _ = text_batch()
    x = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999.0, 321.5])
    with torch.no_grad():
        ours = net(x, t, text, mask)
        theirs = ref(
            x,
            encoder_hidden_states=text,
            encoder_attention_mask=mask.float(),
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    assert theirs.abs().mean() > 0.1  # a non-trivial output
    assert (ours - theirs).abs().max() < 1e-5


def test_pipeline_layout_helpers(pipeline_dir: Path) -> None:
    assert pipeline_vae_path(pipeline_dir) == str(pipeline_dir / "vae")
    assert float(VAE.from_pretrained(pipeline_vae_path(pipeline_dir)).scaling_factor) == 0.5
    te, tok = text_encoder_folders(pipeline_dir / "text_encoder")
    assert (te, tok) == (pipeline_dir / "text_encoder", pipeline_dir / "tokenizer")
    assert text_encoder_folders(pipeline_dir) == (te, tok)
    for path in (pipeline_dir, pipeline_dir / "text_encoder"):
        assert pipeline_text_encoder_path(path) == str(pipeline_dir)
    encoder = TextEncoder(pipeline_text_encoder_path(pipeline_dir / "text_encoder"), max_length=8)
    emb, emb_mask = encoder(["a red circle", "two squares left of a star"])
    assert emb.shape[-1] == TEXT_DIM and emb_mask.sum(1).tolist() == [4, 7]
    direct = TextEncoder(str(pipeline_dir / "text_encoder"), max_length=8)  # sibling tokenizer/
    assert torch.equal(direct(["a red circle"])[0], encoder(["a red circle"])[0])


# ----------------------------------------------------------------------------------- (d) errors


def test_missing_or_wrong_folders_raise_clear_errors(tmp_path: Path, pipeline_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"PixArt folder not found: .*nowhere.*transformer"):
        PretrainedDiT(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"holds no PixArt transformer"):
        PretrainedDiT(str(tmp_path))
    with pytest.raises(ValueError, match=r"vae.config\.json' is not a PixArt transformer config"):
        PretrainedDiT(str(pipeline_dir / "vae"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((pipeline_dir / "transformer/config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"No weights in the PixArt transformer folder"):
        PretrainedDiT(str(broken))
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        pipeline_vae_path(tmp_path / "nowhere")


# -------------------------------------------------------------------------- (b) export parity


CASES = {
    "ddpm-dpmsolver2m": (DiscreteDDPM(), "epsilon", DPMSolver2M(steps=4)),
    "ddpm-ddim-v": (DiscreteDDPM(), "v", DDIM(steps=4)),
    "flow-euler": (RectifiedFlow(), "velocity", Euler(steps=3)),
    "flow-linspace": (RectifiedFlow(shift=2.0), "velocity", Euler(steps=3, spacing="linspace")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_pipeline_reproduces_our_sampler(
    case: str, pipeline_dir: Path, tmp_path: Path
) -> None:
    process, prediction, sampler = CASES[case]
    teacher = TeacherModule(
        PretrainedDiT(str(pipeline_dir)),
        process,
        prediction,
        sampler=sampler,
        guidance_scale=3.0,
        vae_path=pipeline_vae_path(pipeline_dir),
    ).eval()
    text, mask, null, null_mask = text_batch()
    teacher._null_text = (null, null_mask)  # what the datamodule would provide
    noise = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = teacher.sample_latents(text, mask, noise)

    out = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an exact grid must not warn
        export_pixart_sigma_pipeline(
            teacher.network,
            teacher.vae_path,
            out,
            process,
            prediction,
            sampler,
            guidance_scale=teacher.guidance_scale,
        )
    call = json.loads((out / EXPORT_RECORD).read_text())["pipeline_call"]
    assert call["num_inference_steps"] == sampler.steps and call["guidance_scale"] == 3.0
    assert ("sigmas" in call) == (case == "flow-linspace")  # else the scheduler's default grid
    pipe = PixArtSigmaPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    pipe.set_progress_bar_config(disable=True)
    pad = LENGTH - null.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # flow: init_noise_sigma read from config
        latents = pipe(
            negative_prompt=None,
            prompt_embeds=text,
            prompt_attention_mask=mask.long(),
            negative_prompt_embeds=F.pad(null, (0, 0, 0, pad)).expand(2, -1, -1),
            negative_prompt_attention_mask=F.pad(null_mask, (0, pad)).long().expand(2, -1),
            latents=noise.clone(),
            output_type="latent",
            **call,
        ).images
    scale = max(1.0, ours.abs().max().item())  # a random eps-net's x0 is ~1/alpha_T = 150x big
    assert ours.abs().mean() > 0.1
    assert (latents - ours).abs().max() < 1e-4 * scale


def test_export_writes_text_encoder_and_refuses_non_empty_out(
    pipeline_dir: Path, tmp_path: Path
) -> None:
    net = PretrainedDiT(str(pipeline_dir))
    out = tmp_path / "with_t5"
    args = (net, pipeline_vae_path(pipeline_dir), out, DiscreteDDPM(), "epsilon")
    export_pixart_sigma_pipeline(*args, text_encoder_path=str(pipeline_dir / "text_encoder"))
    pipe = PixArtSigmaPipeline.from_pretrained(out, local_files_only=True)
    assert isinstance(pipe.text_encoder, T5EncoderModel) and pipe.tokenizer is not None
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.vae.config.scaling_factor == 0.5
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match=r"with_t5' exists and is not empty.*overwrite"):
        export_pixart_sigma_pipeline(*args)
    assert sorted(p.name for p in out.iterdir()) == before
    export_pixart_sigma_pipeline(*args, overwrite=True)  # replaced: no text encoder now
    assert not (out / "text_encoder").exists() and (out / "transformer").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["with_t5"]  # no temporary folders left


# ------------------------------------------------------------------------------ (c) export tool


def tiny_batches(n: int = 4) -> DataLoader:
    """One CachedLatentDataModule-style training batch per epoch."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(LENGTH)[None] < torch.randint(2, LENGTH + 1, (n, 1), generator=g)
    batch = {
        "latents": torch.randn(n, CHANNELS, SIZE, SIZE, generator=g),
        "text": torch.randn(n, LENGTH, TEXT_DIM, generator=g) * mask[..., None],
        "text_mask": mask,
    }
    return DataLoader([batch], batch_size=None)


def test_export_tool_writes_ema_weights(pipeline_dir: Path, tmp_path: Path) -> None:
    config = {
        "trainer": {"max_steps": 2},  # ignored by export
        "model": {
            "class_path": "fewstep.lightning.teacher_module.TeacherModule",
            "init_args": {
                "network": {
                    "class_path": "fewstep.models.pixart_io.PretrainedDiT",
                    "init_args": {"path": str(pipeline_dir)},
                },
                "process": {"class_path": "fewstep.diffusion.schedules.DiscreteDDPM"},
                "prediction": "epsilon",
                "sampler": {
                    "class_path": "fewstep.diffusion.samplers.DPMSolver2M",
                    "init_args": {"steps": 4},
                },
                "vae_path": str(pipeline_dir / "vae"),
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            },
        },
    }
    config_path = tmp_path / "teacher.yaml"
    config_path.write_text(yaml.safe_dump(config))
    module = load_module(config_path)
    ema = EMA(decay=0.5)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        callbacks=[ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=tiny_batches())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    average = dict(zip(ema.names, ema.shadow, strict=True))
    raw = {k: v.clone() for k, v in module.network.state_dict().items()}
    assert any(not torch.equal(average[k], raw[k]) for k in average)  # EMA != raw weights

    out = tmp_path / "exported"
    run(["export", "-c", str(config_path), "--ckpt_path", str(ckpt), "--out", str(out)])
    exported = PixArtTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    expected = state_dict_to_diffusers({**raw, **average})
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["source"]["weights"] == "ema" and record["global_step"] == 2

    with pytest.raises(FileExistsError, match=r"exported' exists and is not empty"):
        run(["export", "-c", str(config_path), "--ckpt_path", str(ckpt), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match=r"Checkpoint not found"):
        run(
            [
                "export",
                "-c",
                str(config_path),
                "--ckpt_path",
                str(tmp_path / "no.ckpt"),
                "--out",
                str(tmp_path / "other"),
            ]
        )


def test_scheduler_mapping_and_inexact_grids_warn() -> None:
    scaled = diffusers_scheduler(DiscreteDDPM(beta_schedule="scaled_linear"), "x0", DDPM(steps=5))
    assert type(scaled).__name__ == "DDPMScheduler" and scaled.config.prediction_type == "sample"
    assert scaled.config.beta_schedule == "scaled_linear" and scaled.config.beta_end == 0.02
    process = DiscreteDDPM()
    for sampler in [DDIM(steps=3), DPMSolver2M(4, "linspace")]:  # DDIM: 1000 % 3 != 0
        scheduler = diffusers_scheduler(process, "epsilon", sampler)
        with pytest.warns(UserWarning, match=r"not the sampler's"):
            pipeline_call_kwargs(scheduler, process, sampler, 8)
    with pytest.warns(UserWarning, match=r"Heun.*writing Euler"):
        diffusers_scheduler(RectifiedFlow(), "velocity", Heun(steps=2))
    with pytest.raises(ValueError, match=r"predicting 'epsilon'.*velocity"):
        diffusers_scheduler(RectifiedFlow(), "epsilon")
