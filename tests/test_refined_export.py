"""A DiT with a text refiner out as a diffusers folder: a stock PixArtTransformer2DModel plus a
``text_refiner/`` component, sampled by RefinedPixArtSigmaPipeline exactly as fewstep samples the
DiT (conditional and unconditional tokens refined under their masks), and loaded back by
PretrainedDiT with equal weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel

from fewstep.diffusion import DDIM, DiscreteDDPM, Euler, RectifiedFlow
from fewstep.export.pixart_pipeline import EXPORT_RECORD, export_pixart_sigma_pipeline
from fewstep.export.refined_pixart import RefinedPixArtSigmaPipeline
from fewstep.lightning.teacher_module import TeacherModule
from fewstep.models.dit import DiT
from fewstep.models.dit_convert import (
    from_diffusers,
    to_diffusers,
    to_diffusers_components,
)
from fewstep.models.pixart_io import PretrainedDiT
from fewstep.models.text_refiner_diffusers import PixArtTextRefinerModel
from fewstep.models.vae import VAE

TEXT_DIM, LENGTH, CHANNELS, SIZE, MAX_TOKENS = 32, 6, 4, 8, 8
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation:DeprecationWarning",
        "ignore:.*init_noise_sigma.*:FutureWarning",
    ),
]


def refined_dit(
    seed: int = 0,
    learn_sigma: bool = True,
    alibi: bool = False,
    relative: bool = False,
    conv: int = 0,
) -> DiT:
    """A 2-block DiT with a 2-block text refiner, every weight random (the refiner is not the
    identity it starts as, so the export must carry it)."""
    torch.manual_seed(seed)
    dit = DiT(
        in_channels=CHANNELS,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        caption_channels=TEXT_DIM,
        learn_sigma=learn_sigma,
        sample_size=SIZE,
        text_refiner_depth=2,
        text_refiner_width=16,
        text_refiner_max_tokens=MAX_TOKENS,
        text_refiner_alibi=alibi,
        text_refiner_relative=relative,
        text_refiner_conv=conv,
    )
    with torch.no_grad():
        for param in dit.parameters():
            param.copy_(0.1 * torch.randn_like(param))
    return dit.eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = VAE(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=CHANNELS)
    vae.set_latent_scale(0.5, 0.0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def text_batch() -> tuple[torch.Tensor, ...]:
    """Prompt embeddings [2, L, D] with a padded mask (lengths L and 3), and a null text."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, LENGTH, TEXT_DIM, generator=g)  # padded rows stay non-zero on purpose
    mask = torch.arange(LENGTH)[None] < torch.tensor([[LENGTH], [3]])  # [2, L]
    null = torch.randn(1, 2, TEXT_DIM, generator=g)
    return text, mask, null, torch.ones(1, 2, dtype=torch.bool)


def pipeline_latents(out: Path, noise: torch.Tensor, pad_to: int = LENGTH) -> torch.Tensor:
    """The exported pipeline's latents for text_batch() (padded to ``pad_to`` tokens), called
    with its recorded keyword arguments and the null text as negative prompt."""
    text, mask, null, null_mask = text_batch()
    text, mask = F.pad(text, (0, 0, 0, pad_to - LENGTH)), F.pad(mask, (0, pad_to - LENGTH))
    call = json.loads((out / EXPORT_RECORD).read_text())["pipeline_call"]
    pipe = RefinedPixArtSigmaPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pad = pad_to - null.shape[1]
    return pipe(
        negative_prompt=None,
        prompt_embeds=text,
        prompt_attention_mask=mask.long(),
        negative_prompt_embeds=F.pad(null, (0, 0, 0, pad)).expand(2, -1, -1),
        negative_prompt_attention_mask=F.pad(null_mask, (0, pad)).long().expand(2, -1),
        latents=noise.clone(),
        output_type="latent",
        **call,
    ).images


CASES = {
    "flow-euler": (RectifiedFlow(), "velocity", Euler(steps=3), False),
    "ddpm-ddim-eps": (DiscreteDDPM(), "epsilon", DDIM(steps=4), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refined_pipeline_reproduces_our_guided_sampler(case, vae_dir, tmp_path):
    process, prediction, sampler, learn_sigma = CASES[case]
    dit = refined_dit(learn_sigma=learn_sigma)
    teacher = TeacherModule(
        dit, process, prediction, sampler=sampler, guidance_scale=3.0, vae_path=str(vae_dir)
    ).eval()
    text, mask, null, null_mask = text_batch()
    teacher._null_text = (null, null_mask)  # what the datamodule would provide
    noise = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = teacher.sample_latents(text, mask, noise)
    out = tmp_path / "export"
    export_pixart_sigma_pipeline(
        dit, str(vae_dir), out, process, prediction, sampler, guidance_scale=3.0
    )
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["pipeline_class"] == "fewstep.export.refined_pixart.RefinedPixArtSigmaPipeline"
    assert json.loads((out / "model_index.json").read_text())["text_refiner"] == [
        "fewstep.models.text_refiner_diffusers",
        "PixArtTextRefinerModel",
    ]
    assert "RefinedPixArtSigmaPipeline" in (out / "README.md").read_text()
    scale = max(1.0, ours.abs().max().item())
    assert ours.abs().mean() > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert (pipeline_latents(out, noise) - ours).abs().max() < 1e-4 * scale
        # a prompt padded past the refiner's max_tokens (as pipelines pad to 300): same samples
        padded = pipeline_latents(out, noise, pad_to=MAX_TOKENS + 5)
    assert (padded - ours).abs().max() < 1e-4 * scale


def test_without_the_refiner_the_stock_pipeline_samples_differently(vae_dir, tmp_path):
    """The refiner matters: the same transformer without it gives other latents."""
    dit = refined_dit()
    plain = DiT(**{**dit.config(), "text_refiner_depth": 0})
    plain.load_state_dict(dit.state_dict(), strict=False)
    text, mask, _, _ = text_batch()
    x, t = torch.randn(2, CHANNELS, SIZE, SIZE), torch.tensor([500.0, 20.0])
    with torch.no_grad():
        assert (dit(x, t, text, mask) - plain(x, t, text, mask)).abs().max() > 1e-2


POSITION_BIASES = [(False, False, 0), (True, False, 0), (False, True, 3)]  # alibi, relative, conv


@pytest.mark.parametrize("alibi,relative,conv", POSITION_BIASES)
def test_pretrained_dit_loads_the_refined_folder_with_equal_weights(
    vae_dir, tmp_path, alibi, relative, conv
):
    dit = refined_dit(seed=1, alibi=alibi, relative=relative, conv=conv)
    out = tmp_path / "export"
    export_pixart_sigma_pipeline(dit, str(vae_dir), out, RectifiedFlow(), "velocity")
    assert {p.name for p in (out / "text_refiner").iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }
    for path in (out, out / "transformer"):  # the pipeline root or its transformer/
        loaded = PretrainedDiT(str(path)).eval()
        assert loaded.config() | {"interpolation_scale": None} == dit.config() | {
            "interpolation_scale": None
        }
        mine, theirs = loaded.state_dict(), dit.state_dict()
        assert mine.keys() == theirs.keys() and any(k.startswith("text_refiner.") for k in mine)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("alibi,relative,conv", POSITION_BIASES)
def test_components_round_trip_and_the_refiner_component_equals_the_dits_refiner(
    alibi, relative, conv
):
    dit = refined_dit(seed=2, alibi=alibi, relative=relative, conv=conv)
    transformer, refiner = to_diffusers_components(dit)
    assert type(transformer) is PixArtTransformer2DModel
    assert isinstance(refiner, PixArtTextRefinerModel)
    back = from_diffusers(transformer, refiner)
    same = {"interpolation_scale": None}  # diffusers records the resolved scale
    assert back.config() | same == dit.config() | same and back.text_refiner.alibi is alibi
    assert (back.text_refiner.relative_bias is not None) is relative
    assert (back.text_refiner.mixer is not None) is bool(conv)
    assert back.state_dict().keys() == dit.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in dit.state_dict().items())
    text, mask, _, _ = text_batch()
    with torch.no_grad():
        bias = torch.zeros(2, 1, 1, LENGTH).masked_fill(~mask[:, None, None], -1e4)
        expected = dit.text_refiner(text, bias)  # TextRefiner itself, explicit key-padding bias
        got = refiner(text, mask.long())
    torch.testing.assert_close(got[mask], expected[mask])  # every token; padding is masked
    with pytest.raises(ValueError, match="to_diffusers_components"):
        to_diffusers(dit)  # the transformer alone would silently drop the refiner


def test_prompts_longer_than_max_tokens_are_one_clear_error():
    refiner = to_diffusers_components(refined_dit())[1]
    tokens = torch.randn(1, MAX_TOKENS + 1, TEXT_DIM)
    with pytest.raises(ValueError, match="max_tokens=8 .*text_refiner_max_tokens"):
        refiner(tokens, torch.ones(1, MAX_TOKENS + 1))
