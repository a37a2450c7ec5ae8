"""Our PixArt-Σ DiT: parity with diffusers' PixArtTransformer2DModel, presets and invariants."""

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from jsonargparse import ArgumentParser
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fewstep.models.dit import DiT, sincos_pos_embed_2d
from fewstep.models.dit_convert import (
    diffusers_config,
    from_diffusers,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    to_diffusers,
)

DIT_CONFIGS = sorted((Path(__file__).parents[1] / "configs/model/dit").glob("*.yaml"))
NO_SIZE_COND = {"resolution": None, "aspect_ratio": None}

# (DiT kwargs, latent H x W): heads 1/2/4, depth 1/3, learned sigma on/off, non-square grids.
PARITY_CASES = [
    (dict(hidden_size=32, depth=1, num_heads=1, learn_sigma=False, sample_size=8), (8, 8)),
    (dict(hidden_size=32, depth=3, num_heads=2, learn_sigma=True, sample_size=16), (16, 8)),
    (dict(hidden_size=64, depth=3, num_heads=4, learn_sigma=True, sample_size=8), (12, 20)),
    (
        dict(
            hidden_size=48,
            depth=1,
            num_heads=4,
            learn_sigma=False,
            sample_size=16,
            interpolation_scale=0.5,
            caption_projection=False,
        ),
        (6, 10),
    ),
]


def tiny(**kwargs) -> DiT:
    """A small random DiT with every parameter non-trivial (the PixArt init zeroes the output)."""
    args = dict(hidden_size=32, depth=2, num_heads=2, caption_channels=16, sample_size=8)
    net = DiT(**{**args, **kwargs})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net.eval()


def inputs(net: DiT, hw: tuple[int, int], batch: int = 3, length: int = 7) -> tuple:
    """Latents, continuous timesteps, text and a padding mask (rows with 7, 2 and 1 valid)."""
    x = torch.randn(batch, net.in_channels, *hw)
    t = torch.rand(batch) * 999
    text = torch.randn(batch, length, net.config()["caption_channels"])
    mask = torch.arange(length)[None] < torch.tensor([length, 2, 1][:batch])[:, None]  # [B, L]
    return x, t, text, mask


def diffusers_out(model: PixArtTransformer2DModel, x, t, text, mask) -> torch.Tensor:
    """Diffusers' prediction, with the mask passed as float 1/0 like PixArtSigmaPipeline does."""
    return model(
        x,
        encoder_hidden_states=text,
        encoder_attention_mask=mask.float(),
        timestep=t,
        added_cond_kwargs=NO_SIZE_COND,
    ).sample


@pytest.mark.parametrize("kwargs,hw", PARITY_CASES)
@torch.no_grad()
def test_parity_ours_to_diffusers(kwargs, hw):
    torch.manual_seed(0)
    net = tiny(**kwargs)
    ref = to_diffusers(net).eval()
    x, t, text, mask = inputs(net, hw)
    ours, theirs = net(x, t, text, mask), diffusers_out(ref, x, t, text, mask)
    assert ours.shape == (3, net.out_channels, *hw)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs,hw", PARITY_CASES)
@torch.no_grad()
def test_parity_diffusers_to_ours(kwargs, hw):
    torch.manual_seed(1)
    ref = to_diffusers(tiny(**kwargs))
    for p in ref.parameters():  # fresh random weights on the diffusers side
        p.normal_(0.0, 0.2)
    ref.eval()
    net = from_diffusers(ref).eval()
    expected = {**tiny(**kwargs).config(), "interpolation_scale": net.interpolation_scale}
    assert net.config() == expected
    x, t, text, mask = inputs(net, hw)
    assert (net(x, t, text, mask) - diffusers_out(ref, x, t, text, mask)).abs().max() < 1e-5
    no_mask = (
        net(x, t, text)
        - ref(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=NO_SIZE_COND).sample
    )
    assert no_mask.abs().max() < 1e-5


def test_state_dict_round_trip_is_exact():
    net = tiny(depth=3)
    sd = net.state_dict()
    back = state_dict_from_diffusers(state_dict_to_diffusers(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    theirs = to_diffusers(net).state_dict()
    again = state_dict_to_diffusers(state_dict_from_diffusers(theirs))
    assert again.keys() == theirs.keys()
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_unconvertible_models_fail_clearly():
    with pytest.raises(ValueError, match="qk_norm"):
        to_diffusers(tiny(qk_norm=True))
    with pytest.raises(ValueError, match="unknown keys"):
        state_dict_to_diffusers({**tiny().state_dict(), "extra.weight": torch.zeros(1)})


@torch.no_grad()
def test_padded_text_tokens_have_no_influence():
    torch.manual_seed(0)
    net = tiny(depth=3)
    x, t, text, mask = inputs(net, (8, 8))
    noisy = torch.where(mask[..., None], text, 10 * torch.randn_like(text))
    torch.testing.assert_close(net(x, t, noisy, mask), net(x, t, text, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(net(x, t, noisy), net(x, t, text))  # unmasked, they would matter


def test_gradient_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    net = tiny(depth=3).train()
    x, t, text, mask = inputs(net, (8, 12))
    results = []
    for flag in (False, True):
        net.gradient_checkpointing = flag
        net.zero_grad()
        out = net(x, t, text, mask)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b)


def test_qk_norm_and_cond_hook_run():
    torch.manual_seed(0)
    net = tiny(qk_norm=True, num_heads=4)
    x, t, text, mask = inputs(net, (8, 8))
    out = net(x, t, text, mask, cond=torch.randn(3, 32))
    assert out.shape == (3, 8, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, net(x, t, text, mask))
    out.mean().backward()
    assert net.blocks[0].attn.q_norm.weight.grad is not None


def test_positional_embedding_other_grid_sizes():
    net = tiny(sample_size=16, interpolation_scale=2.0)
    for grid in [(8, 8), (4, 12), (16, 6)]:
        ours = net.pos_embed(*grid, torch.device("cpu"))
        ref = get_2d_sincos_pos_embed(32, grid, base_size=8, interpolation_scale=2.0)
        assert ours.shape == (1, grid[0] * grid[1], 32)
        torch.testing.assert_close(ours[0], ref.float(), rtol=0, atol=0)
        assert net.pos_embed(*grid, torch.device("cpu")) is ours  # cached per grid
    plain = sincos_pos_embed_2d(32, (4, 4), base_size=4, interpolation_scale=1.0)  # [16, 32]
    origin = torch.cat([torch.zeros(8), torch.ones(8)]).repeat(2)  # sin 0 = 0, cos 0 = 1
    torch.testing.assert_close(plain[0], origin)
    torch.testing.assert_close(plain[1, 16:], plain[0, 16:])  # same row: second half is the row
    torch.testing.assert_close(plain[4, :16], plain[0, :16])  # same column: first half
    with torch.no_grad():
        assert net(*inputs(net, (10, 26))).shape == (3, 8, 10, 26)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        net(*inputs(net, (9, 8)))


def _sigma_xl2_diffusers_config() -> dict:
    """PixArt-Σ XL/2 1024-MS transformer config, as published in diffusers format."""
    return dict(
        activation_fn="gelu-approximate",
        attention_bias=True,
        attention_head_dim=72,
        attention_type="default",
        caption_channels=4096,
        cross_attention_dim=1152,
        dropout=0.0,
        in_channels=4,
        interpolation_scale=2,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        norm_num_groups=32,
        norm_type="ada_norm_single",
        num_attention_heads=16,
        num_embeds_ada_norm=1000,
        num_layers=28,
        out_channels=8,
        patch_size=2,
        sample_size=128,
        upcast_attention=False,
        use_additional_conditions=False,
    )


def _instantiate(path: Path) -> DiT:
    """Load a configs/model/dit YAML through jsonargparse, as LightningCLI does."""
    parser = ArgumentParser()
    parser.add_argument("--net", type=DiT)
    cfg = parser.parse_object({"net": yaml.safe_load(path.read_text())})
    return parser.instantiate(cfg).net


def test_xl2_preset_matches_diffusers_sigma_on_meta():
    with torch.device("meta"):
        ours = _instantiate(DIT_CONFIGS[0].parent / "pixart_sigma_xl2.yaml")
        theirs = PixArtTransformer2DModel(**_sigma_xl2_diffusers_config())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert 600e6 < count < 620e6
    assert ours.out_channels == 8 and ours.interpolation_scale == 2
    assert {
        k: v for k, v in diffusers_config(ours).items() if k in _sigma_xl2_diffusers_config()
    } == _sigma_xl2_diffusers_config()
    sd = ours.state_dict()
    assert {k: v.shape for k, v in state_dict_to_diffusers(sd).items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize(
    "path", [p for p in DIT_CONFIGS if "xl2" not in p.stem], ids=lambda p: p.stem
)
@torch.no_grad()
def test_small_presets_instantiate_and_run(path):
    net = _instantiate(path)
    side = net.config()["sample_size"]
    out = net(*inputs(net, (side, side), batch=2))
    assert out.shape == (2, net.out_channels, side, side)


@pytest.mark.parametrize("refiner", [0, 2])
def test_flops_match_counter_and_scale_with_depth(refiner):
    net = tiny(depth=3, hidden_size=64, num_heads=4, text_refiner_depth=refiner)
    x, t, text, mask = inputs(net, (8, 12), batch=1, length=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t, text, mask)
    assert net.flops_per_sample((8, 12), 5) == counter.get_total_flops()
    xl = dict(hidden_size=1152, num_heads=16, caption_channels=4096)
    with torch.device("meta"):
        f14, f28 = (DiT(depth=d, **xl).flops_per_sample((128, 128), 300) for d in (14, 28))
    assert f28 > 0 and 1.9 < f28 / f14 <= 2.0


def test_caption_init_std_sets_the_text_projection_init_and_exports():
    torch.manual_seed(0)
    args = dict(hidden_size=64, depth=1, num_heads=2, caption_channels=256, sample_size=8)
    wide = DiT(**args, caption_init_std=0.1)
    assert abs(wide.y_embedder.fc1.weight.std().item() - 0.1) < 0.01
    assert abs(DiT(**args).y_embedder.fc1.weight.std().item() - 0.02) < 0.002
    assert diffusers_config(wide)["caption_channels"] == 256  # plain init: still exportable
    with pytest.raises(ValueError, match="caption_init_std"):
        DiT(**args, caption_init_std=0.0)
