"""Convert our ``Flux`` (FLUX.1 reference keys) to and from diffusers' ``FluxTransformer2DModel``.

Our blocks keep the reference's fused linears (double blocks: one QKV per stream; single blocks:
QKV + MLP-in in ``linear1``); diffusers splits them. The last layer's modulation is (shift, scale)
in the reference and (scale, shift) in diffusers. Everything else is a rename (the same mapping as
diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor

from fewstep.models.flux import Flux
from fewstep.models.flux_layers import PACK

_SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) here, (scale, shift) in diffusers
_TOP = {  # ours -> diffusers linears (module paths; .weight/.bias follow)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    _SWAPPED: "norm_out.linear",
}
_DOUBLE = {  # double_blocks.{i} -> transformer_blocks.{i}; a tuple of several is a fused linear
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_NORMS = {  # RMSNorm scales
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {  # single_blocks.{i} -> single_transformer_blocks.{i}
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
Pair = tuple[str, tuple[str, ...]]


def _linears(ours: str, theirs: tuple[str, ...]) -> Iterator[Pair]:
    """(our key, diffusers keys) for the weight and bias of one (possibly fused) linear."""
    for p in ("weight", "bias"):
        yield f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs)


def _key_pairs(double: int, single: int) -> list[Pair]:
    """Every (our key, diffusers keys) pair of a model with these block counts."""
    pairs = [p for ours, theirs in _TOP.items() for p in _linears(ours, (theirs,))]
    for i in range(double):
        o, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _DOUBLE.items():
            pairs += _linears(o + ours, tuple(t + x for x in theirs))
        pairs += [(o + ours, (t + theirs,)) for ours, theirs in _DOUBLE_NORMS.items()]
    for i in range(single):
        o, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for ours, theirs in _SINGLE.items():
            pairs += _linears(o + ours, tuple(t + x for x in theirs))
        pairs += [(o + ours, (t + theirs,)) for ours, theirs in _SINGLE_NORMS.items()]
    return pairs


def _count(keys: list[str], prefix: str) -> int:
    """Number of blocks named ``{prefix}.{i}.`` in a list of state-dict keys."""
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _swap_halves(x: Tensor) -> Tensor:
    """(a, b) -> (b, a) along dim 0: the last layer's shift/scale order (an involution)."""
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_consumed(sd: Mapping[str, Tensor], used: set[str], source: str) -> None:
    """Fail loudly on keys a conversion cannot represent instead of dropping them."""
    left = sorted(set(sd) - used)
    if left:
        more = " ..." if len(left) > 8 else ""
        raise ValueError(f"Cannot convert {source} state dict: unknown keys {left[:8]}{more}.")


def state_dict_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our Flux state dict -> diffusers ``FluxTransformer2DModel`` one (splits fused linears)."""
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    keys = list(sd)
    for ours, theirs in _key_pairs(_count(keys, "double_blocks"), _count(keys, "single_blocks")):
        if ours not in sd:
            continue
        value = _swap_halves(sd[ours]) if ours.startswith(_SWAPPED) else sd[ours]
        sizes = [hidden] * (len(theirs) - 1)  # q, k, v are D rows each; the MLP-in takes the rest
        parts = value.split([*sizes, value.shape[0] - sum(sizes)], dim=0)
        out.update({k: v.clone() for k, v in zip(theirs, parts, strict=True)})
        used.add(ours)
    _check_consumed(sd, used, "Flux")
    return out


def state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``FluxTransformer2DModel`` state dict -> our Flux state dict (fuses linears)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    keys = list(sd)
    blocks = (_count(keys, "transformer_blocks"), _count(keys, "single_transformer_blocks"))
    for ours, theirs in _key_pairs(*blocks):
        present = [k in sd for k in theirs]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"Cannot convert diffusers state dict: {ours} needs all of {theirs}.")
        value = torch.cat([sd[k] for k in theirs], dim=0)
        out[ours] = _swap_halves(value) if ours.startswith(_SWAPPED) else value
        used.update(theirs)
    _check_consumed(sd, used, "diffusers FluxTransformer2DModel")
    return out


def diffusers_config(flux: Flux) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of a Flux."""
    c = flux.config()
    if c.get("text_positions"):
        raise ValueError(
            "Flux(text_positions=True) has no diffusers equivalent: FluxPipeline gives every text "
            "token the RoPE id 0. Train with text_positions=false to export to diffusers."
        )
    return dict(
        patch_size=1,
        in_channels=c["in_channels"] * PACK * PACK,
        out_channels=None,
        num_layers=c["depth"],
        num_single_layers=c["depth_single_blocks"],
        attention_head_dim=c["hidden_size"] // c["num_heads"],
        num_attention_heads=c["num_heads"],
        joint_attention_dim=c["context_in_dim"],
        pooled_projection_dim=c["vec_in_dim"],
        guidance_embeds=c["guidance_embed"],
        axes_dims_rope=tuple(c["axes_dim"]),
    )


def flux_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config -> ``Flux`` init arguments; unsupported fields raise."""
    packed = config.get("in_channels", 64)
    out = config.get("out_channels") or packed
    if config.get("patch_size", 1) != 1 or packed % (PACK * PACK) or out != packed:
        raise ValueError(
            f"Cannot convert Flux transformer: patch_size={config.get('patch_size')}, "
            f"in_channels={packed}, out_channels={config.get('out_channels')}; only patch_size=1 "
            "with in_channels = out_channels = 4 x latent channels (2x2 packing) is supported."
        )
    heads = config.get("num_attention_heads", 24)
    return dict(
        in_channels=packed // (PACK * PACK),
        hidden_size=heads * config.get("attention_head_dim", 128),
        num_heads=heads,
        depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        context_in_dim=config.get("joint_attention_dim", 4096),
        vec_in_dim=config.get("pooled_projection_dim", 768),
        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(config.get("guidance_embeds", False)),
    )


def to_diffusers(flux: Flux) -> FluxTransformer2DModel:
    """A diffusers ``FluxTransformer2DModel`` carrying a Flux's weights (same device and dtype)."""
    param = next(flux.parameters())
    model = FluxTransformer2DModel(**diffusers_config(flux))
    model.load_state_dict(state_dict_to_diffusers(flux.state_dict()), strict=True)
    model = model.to(param.device)
    return model if param.dtype == torch.float32 else model.to(param.dtype)


def from_diffusers(model: FluxTransformer2DModel) -> Flux:
    """A Flux carrying a diffusers ``FluxTransformer2DModel``'s weights (same device and dtype)."""
    param = next(model.parameters())
    flux = Flux(**flux_kwargs_from_diffusers_config(dict(model.config)))
    flux.load_state_dict(state_dict_from_diffusers(model.state_dict()), strict=True)
    return flux.to(device=param.device, dtype=param.dtype)
