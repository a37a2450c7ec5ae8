"""Our FLUX.1 MMDiT: parity with diffusers' FluxTransformer2DModel, conversions, packing, RoPE ids,
and PretrainedFlux on tiny folders written by diffusers' save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from fewstep.diffusion import RectifiedFlow
from fewstep.diffusion.denoiser import Denoiser
from fewstep.models.flux import Flux, pack_latents, position_ids, unpack_latents
from fewstep.models.flux_convert import (
    diffusers_config,
    from_diffusers,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    to_diffusers,
)
from fewstep.models.flux_io import PretrainedFlux
from fewstep.models.flux_layers import rope_angles

TEXT_DIM, POOLED_DIM = 24, 12
TINY = dict(
    in_channels=4,
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    context_in_dim=TEXT_DIM,
    vec_in_dim=POOLED_DIM,
    axes_dim=(4, 6, 6),
)
# (Flux kwargs, latent H x W, padded text): heads 1/2/4, guidance on/off, non-square grids
PARITY_CASES = [
    (dict(guidance_embed=True), (8, 8), True),
    (dict(guidance_embed=False), (4, 12), True),
    (dict(guidance_embed=True, in_channels=16, num_heads=4, axes_dim=(2, 2, 4)), (10, 6), False),
    (dict(guidance_embed=False, num_heads=1, hidden_size=16, axes_dim=(4, 6, 6)), (6, 2), True),
]


def tiny(**kwargs) -> Flux:
    """A small random Flux with every parameter non-trivial."""
    net = Flux(**{**TINY, **kwargs})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net.eval()


def inputs(net: Flux, hw: tuple[int, int], batch: int = 3, length: int = 7) -> dict:
    """Latents, model times on a grid exact in float32 (t = 1000 k / 1024, so the sigma
    t / 1000 diffusers takes is exact), T5 text, a mask with 7, 2 and 1 valid tokens, pooled
    vectors and guidance scales (when the net embeds them)."""
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(batch, net.in_channels, *hw, generator=g),
        t=torch.randint(0, 1025, (batch,), generator=g).float() * 1000 / 1024,
        text=torch.randn(batch, length, TEXT_DIM, generator=g),
        text_mask=torch.arange(length)[None] < torch.tensor([length, 2, 1][:batch])[:, None],
        cond=torch.randn(batch, POOLED_DIM, generator=g),
        guidance=torch.tensor([3.5, 1.0, 5.25][:batch]) if net.guidance_in is not None else None,
    )


def diffusers_out(
    model: FluxTransformer2DModel, inp: dict, masked: bool = True, text_positions: bool = False
) -> torch.Tensor:
    """Diffusers' prediction as FluxPipeline calls it (packed latents, sigma as timestep, ids);
    a padded text goes in as a key mask over [text; image] through the attention kwargs."""
    x, text = inp["x"], inp["text"]
    b, _, h, w = x.shape
    ids = position_ids(text.shape[1], h // 2, w // 2, text_positions=text_positions)
    kwargs = {}
    if masked:
        image = torch.ones(b, h * w // 4, dtype=torch.bool)
        kwargs = {"attention_mask": torch.cat([inp["text_mask"], image], dim=1)}
    out = model(
        FluxPipeline._pack_latents(x, b, x.shape[1], h, w),
        encoder_hidden_states=text,
        pooled_projections=inp["cond"],
        timestep=inp["t"] / 1000,
        img_ids=ids[text.shape[1] :],
        txt_ids=ids[: text.shape[1]],
        guidance=inp["guidance"],
        joint_attention_kwargs=kwargs,
    ).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def ours_out(net: Flux, inp: dict, masked: bool = True) -> torch.Tensor:
    """Our prediction through the fewstep network interface."""
    mask = inp["text_mask"] if masked else None
    return net(inp["x"], inp["t"], inp["text"], mask, cond=inp["cond"], guidance=inp["guidance"])


# ------------------------------------------------------------------------------ packing and ids


def test_packing_and_ids_match_flux_pipeline():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)  # exact round trip
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), x)
    ids = position_ids(5, 3, 5)
    assert ids.shape == (5 + 15, 3)
    assert not ids[:5].any()  # text tokens all at (0, 0, 0)
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(ids[5:], image_ids)
    assert ids[5 + 7].tolist() == [0.0, 1.0, 2.0]  # token 7 of a 3 x 5 grid: row 1, column 2


def test_rope_angles_match_diffusers_pos_embed():
    ids = position_ids(4, 3, 5)
    angles = rope_angles(ids, (4, 6, 6))  # [S, 8]
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)  # [S, 16], pairs repeated
    assert angles.shape == (19, 8)
    torch.testing.assert_close(angles.cos().float().repeat_interleave(2, 1), cos, rtol=0, atol=0)
    torch.testing.assert_close(angles.sin().float().repeat_interleave(2, 1), sin, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("kwargs,hw,masked", PARITY_CASES)
@torch.no_grad()
def test_parity_ours_to_diffusers(kwargs, hw, masked):
    torch.manual_seed(0)
    net = tiny(**kwargs)
    ref = to_diffusers(net).eval()
    inp = inputs(net, hw)
    ours, theirs = ours_out(net, inp, masked), diffusers_out(ref, inp, masked)
    assert ours.shape == inp["x"].shape and theirs.abs().mean() > 0.1
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("kwargs,hw,masked", PARITY_CASES)
@torch.no_grad()
def test_parity_diffusers_to_ours(kwargs, hw, masked):
    torch.manual_seed(1)
    ref = to_diffusers(tiny(**kwargs))
    for p in ref.parameters():  # fresh random weights on the diffusers side
        p.normal_(0.0, 0.2)
    net = from_diffusers(ref.eval()).eval()
    assert net.config() == tiny(**kwargs).config()
    inp = inputs(net, hw)
    assert (ours_out(net, inp, masked) - diffusers_out(ref, inp, masked)).abs().max() <= 1e-5


@torch.no_grad()
def test_text_positions_match_diffusers_given_the_same_text_ids():
    """Text token k at RoPE index k: diffusers' transformer fed txt_ids (k, 0, 0) is the
    independent reference (its FluxPipeline passes zeros, so export refuses such a network)."""
    net = tiny(guidance_embed=False, text_positions=True)
    twin = tiny(guidance_embed=False)  # the same weights without text positions, to convert
    twin.load_state_dict(net.state_dict())
    ref, inp = to_diffusers(twin).eval(), inputs(net, (8, 8))
    theirs = diffusers_out(ref, inp, text_positions=True)
    assert (ours_out(net, inp) - theirs).abs().max() <= 1e-5
    assert (ours_out(twin, inp) - theirs).abs().max() > 1e-3  # the ids do change the output
    ids = position_ids(5, 2, 3, text_positions=True)
    assert ids[:5].tolist() == [[float(k), 0.0, 0.0] for k in range(5)]
    assert torch.equal(ids[5:], position_ids(5, 2, 3)[5:])  # image ids unchanged
    with pytest.raises(ValueError, match=r"text_positions=True\) has no diffusers equivalent"):
        to_diffusers(net)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_only_text_positions_let_the_image_see_word_order(seed):
    """FLUX.1's text ids are all 0, so the image stream is a function of the set of text
    tokens: swapping the first and last token changes nothing. With text positions it does."""
    for text_positions in (False, True):
        torch.manual_seed(seed)
        net = tiny(guidance_embed=False, text_positions=text_positions)
        inp = inputs(net, (4, 4), batch=1)
        length = inp["text"].shape[1]
        swapped = dict(inp, text=inp["text"][:, [length - 1, *range(1, length - 1), 0]])
        out = ours_out(net, inp, masked=False)
        change = (out - ours_out(net, swapped, masked=False)).abs().max() / out.abs().max()
        # float noise ~5e-7 of the output; the ids' effect ~2e-4 (2 of 8 RoPE pairs per head)
        assert (change > 1e-5) == text_positions, (text_positions, change)


def test_state_dict_round_trip_is_exact():
    net = tiny(guidance_embed=True)
    sd = net.state_dict()
    back = state_dict_from_diffusers(state_dict_to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    theirs = to_diffusers(net).state_dict()
    again = state_dict_to_diffusers(state_dict_from_diffusers(theirs))
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)
    with pytest.raises(ValueError, match="unknown keys"):
        state_dict_to_diffusers({**sd, "extra.weight": torch.zeros(1)})
    partial = {k: v for k, v in theirs.items() if not k.endswith("attn.to_k.weight")}
    with pytest.raises(ValueError, match=r"qkv.weight needs all of"):
        state_dict_from_diffusers(partial)


def test_flux1_dev_keys_and_shapes_match_diffusers_single_file_conversion():
    """Our FLUX.1-dev (reference keys) converts like diffusers' own BFL-checkpoint converter."""
    with torch.device("meta"):
        ours = Flux()  # FLUX.1-dev defaults
        theirs = FluxTransformer2DModel(**diffusers_config(ours))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and 11.8e9 < count < 12.0e9
    sd = ours.state_dict()
    shapes = {k: v.shape for k, v in state_dict_to_diffusers(sd).items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    reference = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert shapes == {k: v.shape for k, v in reference.items()}


# --------------------------------------------------------------------- interface and behaviour


@torch.no_grad()
def test_denoiser_feeds_flux_pipeline_time_and_padding_has_no_influence():
    net = tiny(guidance_embed=True)
    ref = to_diffusers(net).eval()
    inp = inputs(net, (8, 4))
    sigma = inp["t"] / 1000
    denoiser = Denoiser(net, RectifiedFlow(), prediction="velocity")
    cond = {k: inp[k] for k in ("text", "text_mask", "cond", "guidance")}
    torch.testing.assert_close(denoiser.raw(inp["x"], sigma, **cond), diffusers_out(ref, inp))
    junk = torch.where(inp["text_mask"][..., None], inp["text"], 10 * torch.randn_like(inp["text"]))
    padded = net(inp["x"], inp["t"], junk, inp["text_mask"], inp["cond"], inp["guidance"])
    torch.testing.assert_close(padded, ours_out(net, inp), rtol=0, atol=1e-6)
    assert not torch.allclose(ours_out(net, {**inp, "text": junk}, masked=False), padded)


@torch.no_grad()
def test_add_guidance_embedding_keeps_the_output_and_errors_are_clear():
    net = tiny(guidance_embed=False)
    inp = inputs(net, (4, 4))
    before = ours_out(net, inp)
    net.add_guidance_embedding()
    assert net.config()["guidance_embed"] and diffusers_config(net)["guidance_embeds"]
    after = ours_out(net, {**inp, "guidance": torch.tensor([2.0, 3.0, 4.0])})
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"needs guidance="):
        ours_out(net, inp)
    with pytest.raises(ValueError, match=r"needs cond= \(the pooled CLIP"):
        net(inp["x"], inp["t"], inp["text"])
    with pytest.raises(ValueError, match="must be even"):
        ours_out(net, {**inp, "x": torch.randn(3, 4, 5, 4), "guidance": torch.ones(3)})
    with pytest.raises(ValueError, match="axes_dim"):
        Flux(**{**TINY, "axes_dim": (4, 4, 4)})


def test_gradient_checkpointing_same_outputs_and_grads():
    net = tiny(guidance_embed=True).train()
    inp = inputs(net, (4, 6))
    results = []
    for flag in (False, True):
        net.gradient_checkpointing = flag
        net.zero_grad()
        out = ours_out(net, inp)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- PretrainedFlux

SCALE, SHIFT = 0.3611, 0.1159  # FLUX.1's VAE factors


def save_tiny_flux_folder(root: Path, max_shard_size: str | None = None) -> Path:
    """A FLUX.1-like folder: transformer/ and vae/ written by diffusers' save_pretrained."""
    torch.manual_seed(0)
    transformer = to_diffusers(tiny(guidance_embed=True))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    transformer.save_pretrained(root / "transformer", **kwargs)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=TINY["in_channels"],
        scaling_factor=SCALE,
        shift_factor=SHIFT,
    )
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """A tiny FLUX.1 folder with a single weights file."""
    return save_tiny_flux_folder(tmp_path_factory.mktemp("flux") / "FLUX.1-tiny")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.no_grad()
def test_pretrained_flux_matches_diffusers_and_reads_vae_factors(flux_dir: Path, dtype: str):
    net = PretrainedFlux(str(flux_dir), dtype=dtype).eval()
    ref = FluxTransformer2DModel.from_pretrained(flux_dir / "transformer").eval()
    assert (net.vae_scaling_factor, net.vae_shift_factor) == (SCALE, SHIFT)
    assert net.vae_path == str(flux_dir / "vae") and net.config()["guidance_embed"]
    assert all(p.dtype == getattr(torch, dtype) for p in net.parameters())
    inp = inputs(net, (6, 8))
    if dtype == "float32":
        assert (ours_out(net, inp) - diffusers_out(ref, inp)).abs().max() <= 1e-5
    else:
        expected = state_dict_from_diffusers(ref.state_dict())
        assert all(torch.equal(v, expected[k].bfloat16()) for k, v in net.state_dict().items())
        out, reference = ours_out(net, inp), diffusers_out(ref, inp)  # float32 inputs
        assert out.dtype == torch.bfloat16
        assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_pretrained_flux_loads_sharded_weights(tmp_path: Path, flux_dir: Path):
    sharded = save_tiny_flux_folder(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads(
        (sharded / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    net, single = PretrainedFlux(str(sharded)), PretrainedFlux(str(flux_dir))
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in net.state_dict().items())
    (sharded / "transformer" / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"weight shard missing: .*{shards[1]}"):
        PretrainedFlux(str(sharded))


def test_pretrained_flux_errors_name_the_missing_file(tmp_path: Path, flux_dir: Path):
    with pytest.raises(FileNotFoundError, match=r"FLUX.1 folder not found: .*nowhere"):
        PretrainedFlux(str(tmp_path / "nowhere"))
    with pytest.raises(
        FileNotFoundError, match=r"missing the transformer config .*transformer/config.json"
    ):
        PretrainedFlux(str(tmp_path))
    broken = tmp_path / "broken"
    (broken / "transformer").mkdir(parents=True)
    (broken / "transformer/config.json").write_text(
        (flux_dir / "transformer/config.json").read_text()
    )
    with pytest.raises(FileNotFoundError, match=r"missing the VAE config .*vae/config.json"):
        PretrainedFlux(str(broken))
    (broken / "vae").mkdir()
    (broken / "vae/config.json").write_text((flux_dir / "vae/config.json").read_text())
    with pytest.raises(
        FileNotFoundError, match=r"No weights .*diffusion_pytorch_model.safetensors"
    ):
        PretrainedFlux(str(broken))
    (broken / "transformer/config.json").write_text((flux_dir / "vae/config.json").read_text())
    with pytest.raises(ValueError, match=r"not a FLUX.1 transformer config"):
        PretrainedFlux(str(broken))
    with pytest.raises(ValueError, match=r"dtype='int8'"):
        PretrainedFlux(str(flux_dir), dtype="int8")
