"""The DiT's optional text refiner: identity at initialisation (a function-preserving graft onto a
trained DiT), masked padding, token order made visible, grafting checkpoint weights."""

import pytest
import torch

from fewstep.lightning.checkpoints import graft_weights
from fewstep.models.dit import DiT
from fewstep.models.dit_convert import diffusers_config
from fewstep.models.text_refiner import (
    DIRECTION_PENALTY,
    LocalMixer,
    RelativePositionBias,
    TextRefiner,
    alibi_bias,
)

KW = dict(
    in_channels=4,
    patch_size=2,
    hidden_size=32,
    depth=2,
    num_heads=2,
    caption_channels=24,
    learn_sigma=False,
    sample_size=8,
)


def _inputs(batch: int = 2, length: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, length, 24, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 4:] = False
    return x, t, text, mask


def _with_cross_attention(net: DiT) -> DiT:
    """Give the zero-initialised cross-attention outputs weights, so the text matters."""
    torch.manual_seed(1)
    for block in net.blocks:
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.2)
    return net


def _perturb_refiner(net: DiT) -> DiT:
    torch.manual_seed(2)
    with torch.no_grad():
        for p in net.text_refiner.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_refiner_at_initialisation_leaves_the_function_unchanged():
    base = _with_cross_attention(DiT(**KW))
    refined = DiT(**KW, text_refiner_depth=2, text_refiner_max_tokens=16)
    missing = refined.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("text_refiner.") for k in missing)
    x, t, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(refined(x, t, text, mask), base(x, t, text, mask))


def test_cross_attention_alone_ignores_token_order_and_the_refiner_sees_it():
    """PixArt's cross-attention is a function of the set of text tokens; with a (trained) refiner
    and its positions, swapping two caption tokens changes the prediction."""
    x, t, text, mask = _inputs()
    swapped = text.clone()
    swapped[:, [1, 3]] = text[:, [3, 1]]
    base = _with_cross_attention(DiT(**KW))
    refined = _perturb_refiner(
        _with_cross_attention(DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=16))
    )
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, text, mask), base(x, t, swapped, mask))
        change = (refined(x, t, text, mask) - refined(x, t, swapped, mask)).abs().max()
    assert change > 1e-3


def test_padded_tokens_do_not_reach_the_prediction():
    net = _perturb_refiner(
        _with_cross_attention(DiT(**KW, text_refiner_depth=2, text_refiner_max_tokens=16))
    )
    x, t, text, mask = _inputs()
    noisy = text.clone()
    noisy[1, 4:] = 100.0 * torch.randn_like(noisy[1, 4:])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, text, mask)[1], net(x, t, noisy, mask)[1])


def test_the_refiner_trains_from_its_zero_initialisation():
    """At the graft only the output projection has a gradient; one step later the positions and
    the blocks have theirs (zero-initialised residual outputs, as adaLN-Zero)."""
    net = _with_cross_attention(DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=16))
    refiner = net.text_refiner
    optimizer = torch.optim.SGD(refiner.parameters(), lr=0.1)
    x, t, text, mask = _inputs()
    net(x, t, text, mask).square().mean().backward()
    assert refiner.proj_out.weight.grad.abs().sum() > 0
    assert refiner.positions.grad.abs().sum() == 0
    optimizer.step()
    optimizer.zero_grad()
    net(x, t, text, mask).square().mean().backward()
    assert refiner.positions.grad.abs().sum() > 0
    assert refiner.blocks[0].proj.weight.grad.abs().sum() > 0


def test_too_many_tokens_and_export_are_clear_errors():
    net = DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=4)
    x, t, text, mask = _inputs(length=6)
    with pytest.raises(ValueError, match="text_refiner_max_tokens"):
        net(x, t, text, mask)
    with pytest.raises(ValueError, match="text refiner"):
        diffusers_config(net)


def _teacher_checkpoint(path, network: DiT, ema_network: DiT) -> None:
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    shadow = {k: v.clone() for k, v in ema_network.named_parameters()}
    torch.save({"state_dict": state, "callbacks": {"EMA": {"shadow": shadow}}}, path)


def test_graft_loads_the_ema_weights_and_keeps_new_modules_initialised(tmp_path):
    raw, averaged = DiT(**KW), _with_cross_attention(DiT(**KW))
    ckpt = tmp_path / "teacher.ckpt"
    _teacher_checkpoint(ckpt, raw, averaged)
    grown = DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=16)
    new = graft_weights(grown, ckpt, ema=True)
    assert new and all(k.startswith("text_refiner.") for k in new)
    x, t, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, text, mask), averaged(x, t, text, mask))
    plain = DiT(**KW)
    assert graft_weights(plain, ckpt, ema=False) == []
    torch.testing.assert_close(plain.state_dict(), raw.state_dict())


def test_graft_refuses_a_checkpoint_of_another_network(tmp_path):
    ckpt = tmp_path / "teacher.ckpt"
    other = DiT(**{**KW, "hidden_size": 64})
    _teacher_checkpoint(ckpt, other, other)
    with pytest.raises(ValueError, match="does not fit the network"):
        graft_weights(DiT(**KW), ckpt)
    torch.save({"state_dict": {f"network.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match="no EMA average"):
        graft_weights(DiT(**{**KW, "hidden_size": 64}), ckpt, ema=True)


def test_teacher_module_init_weights_starts_the_fit_from_the_checkpoint(tmp_path):
    from fewstep.diffusion.schedules import RectifiedFlow
    from fewstep.lightning.teacher_module import TeacherModule

    trained = _with_cross_attention(DiT(**KW))
    ckpt = tmp_path / "teacher.ckpt"
    _teacher_checkpoint(ckpt, DiT(**KW), trained)  # raw weights differ from the EMA average
    grown = DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=16)
    module = TeacherModule(grown, RectifiedFlow(), "velocity", init_weights=str(ckpt))
    x, t, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(module.network(x, t, text, mask), trained(x, t, text, mask))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        TeacherModule(
            DiT(**KW), RectifiedFlow(), "velocity", init_weights=str(tmp_path / "missing.ckpt")
        )


def test_position_std_sets_the_initial_positions_and_keeps_the_config():
    """``text_refiner_position_std`` is the initial positions' std (init only: the exported
    config, and so fingerprints, do not change); the function stays the identity at init."""
    torch.manual_seed(0)
    small = DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=512)
    large = DiT(
        **KW, text_refiner_depth=1, text_refiner_max_tokens=512, text_refiner_position_std=0.5
    )
    assert small.text_refiner.positions.std().item() == pytest.approx(0.02, rel=0.1)
    assert large.text_refiner.positions.std().item() == pytest.approx(0.5, rel=0.1)
    assert small.config() == large.config()
    x, t, text, mask = _inputs()
    base = DiT(**KW)
    base.load_state_dict({k: v for k, v in large.state_dict().items() if "text_refiner" not in k})
    with torch.no_grad():
        torch.testing.assert_close(large(x, t, text, mask), base(x, t, text, mask))
    with pytest.raises(ValueError, match="position_std"):
        DiT(**KW, text_refiner_depth=1, text_refiner_position_std=0.0)


def test_alibi_bias_is_minus_slope_times_distance():
    """Press et al. 2022: head h of H has slope 2^(-8h/H); the bias is -slope * |i - j|."""
    bias = alibi_bias(4, 5)
    assert bias.shape == (1, 4, 5, 5)
    for h in range(4):
        slope = 2.0 ** (-8.0 * (h + 1) / 4)
        for i in range(5):
            for j in range(5):
                assert bias[0, h, i, j].item() == pytest.approx(-slope * abs(i - j))


def test_alibi_makes_a_refiner_without_positions_see_order():
    """With its positions at zero a refiner attends over a set (permuting the tokens permutes
    its output); with ALiBi the same weights give a token another output once its neighbours
    change places."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 6, 24, generator=g)
    swapped = tokens[:, [0, 4, 2, 3, 1, 5]]  # token 2 stays; its neighbours at 1 and 2 trade
    outputs = {}
    for alibi in (False, True):
        torch.manual_seed(3)
        refiner = TextRefiner(24, 16, 2, 1, 8, alibi=alibi)
        with torch.no_grad():
            for p in refiner.parameters():
                p.copy_(0.3 * torch.randn_like(p))
            refiner.positions.zero_()
            outputs[alibi] = (refiner(tokens, None), refiner(swapped, None))
    plain, local = outputs[False], outputs[True]
    torch.testing.assert_close(plain[0][0, 2], plain[1][0, 2])
    assert (local[0][0, 2] - local[1][0, 2]).abs().max() > 1e-3
    assert TextRefiner(24, 16, 2, 1, 8, alibi=True).config["alibi"] is True
    assert "alibi" not in TextRefiner(24, 16, 2, 1, 8).config


def test_alibi_keeps_the_refiner_the_identity_at_initialisation():
    x, t, text, mask = _inputs()
    base = _with_cross_attention(DiT(**KW))
    refined = DiT(**KW, text_refiner_depth=2, text_refiner_max_tokens=16, text_refiner_alibi=True)
    refined.load_state_dict(base.state_dict(), strict=False)
    assert refined.config()["text_refiner_alibi"] is True
    assert "text_refiner_alibi" not in base.config()
    with torch.no_grad():
        torch.testing.assert_close(refined(x, t, text, mask), base(x, t, text, mask))


def test_relative_bias_starts_as_directional_alibi():
    """table[h, j - i] = -m_h |i - j|, minus DIRECTION_PENALTY for keys after the query on even
    heads and before it on odd heads (slow loop against the explicit formula)."""
    heads, length = 4, 5
    bias = RelativePositionBias(heads, max_tokens=8)(length)
    assert bias.shape == (1, heads, length, length)
    for h in range(heads):
        slope = 2.0 ** (-8.0 * (h + 1) / heads)
        for i in range(length):
            for j in range(length):
                blind = j > i if h % 2 == 0 else j < i
                expected = -slope * abs(i - j) - DIRECTION_PENALTY * blind
                assert bias[0, h, i, j].item() == pytest.approx(expected)


def test_relative_bias_is_learned_and_reset():
    module = RelativePositionBias(2, max_tokens=4)
    start = module(4).detach().clone()
    module(4).sum().backward()
    assert module.table.grad is not None and module.table.grad.abs().sum() > 0
    with torch.no_grad():
        module.table.add_(1.0)
    module.reset_parameters()
    torch.testing.assert_close(module(4), start)


def test_directional_heads_tell_a_word_before_a_relation_from_one_after_it():
    """'X left of Y' against 'Y left of X' with the same content vectors: the mirrored captions
    hold the same multiset of (token, distance) pairs, so symmetric ALiBi without positions
    maps the reversed sequence to the reversed outputs, while directional heads do not."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 5, 24, generator=g)
    reversed_tokens = tokens.flip(1)
    outputs = {}
    for kind in ("alibi", "relative"):
        torch.manual_seed(3)
        refiner = TextRefiner(24, 16, 2, 1, 8, **{kind: True})
        with torch.no_grad():
            for name, p in refiner.named_parameters():
                if "table" not in name:
                    p.copy_(0.3 * torch.randn_like(p))
            refiner.positions.zero_()
            outputs[kind] = (refiner(tokens, None), refiner(reversed_tokens, None).flip(1))
    torch.testing.assert_close(*outputs["alibi"])
    assert (outputs["relative"][0] - outputs["relative"][1]).abs().max() > 1e-3


def test_relative_bias_keeps_the_graft_the_identity_and_is_configured_only_when_set():
    x, t, text, mask = _inputs()
    base = _with_cross_attention(DiT(**KW))
    refined = DiT(
        **KW, text_refiner_depth=2, text_refiner_max_tokens=16, text_refiner_relative=True
    )
    refined.load_state_dict(base.state_dict(), strict=False)
    assert refined.config()["text_refiner_relative"] is True
    assert "text_refiner_relative" not in base.config()
    assert "relative" not in TextRefiner(24, 16, 2, 1, 8).config
    with torch.no_grad():
        torch.testing.assert_close(refined(x, t, text, mask), base(x, t, text, mask))
    with pytest.raises(ValueError, match="exclusive"):
        TextRefiner(24, 16, 2, 1, 8, alibi=True, relative=True)


def test_local_mixer_sees_exactly_its_kernel_and_never_padding():
    """Kernel 5: token i's output changes when token i +- 2 changes, not when i +- 3 does; a
    padded token changes no valid token's output (random weights, explicit perturbations)."""
    torch.manual_seed(0)
    mixer = LocalMixer(8, 5)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p))
    h = torch.randn(1, 9, 8)
    valid = torch.ones(1, 9, dtype=torch.bool)
    base = mixer(h, valid)
    for offset, moves in ((2, True), (3, False)):
        changed = h.clone()
        changed[0, 4 + offset] = torch.randn(8)  # not a constant shift: the norm removes it
        delta = (mixer(changed, valid) - base)[0, 4].abs().max().item()
        assert (delta > 1e-4) is moves, (offset, delta)
    valid[0, 6:] = False
    masked = mixer(h, valid)
    padded = h.clone()
    padded[0, 6:] = torch.randn(3, 8)
    torch.testing.assert_close(mixer(padded, valid)[0, :6], masked[0, :6])
    with pytest.raises(ValueError, match="odd"):
        LocalMixer(8, 4)


def test_conv_keeps_the_graft_the_identity_and_is_configured_only_when_set():
    x, t, text, mask = _inputs()
    base = _with_cross_attention(DiT(**KW))
    refined = DiT(**KW, text_refiner_depth=1, text_refiner_max_tokens=16, text_refiner_conv=3)
    refined.load_state_dict(base.state_dict(), strict=False)
    assert refined.config()["text_refiner_conv"] == 3
    assert (
        "text_refiner_conv" not in base.config()
        and "conv" not in TextRefiner(24, 16, 2, 1, 8).config
    )
    with torch.no_grad():
        torch.testing.assert_close(refined(x, t, text, mask), base(x, t, text, mask))
