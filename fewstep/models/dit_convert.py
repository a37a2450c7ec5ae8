"""Convert our PixArt-Σ ``DiT`` to and from diffusers' ``PixArtTransformer2DModel``.

Our blocks fuse self-attention QKV and cross-attention KV into one linear each; diffusers keeps
``to_q``/``to_k``/``to_v`` apart. Everything else is a rename. A DiT's optional text refiner acts
on the text tokens before the caption projection, so it converts to a component of its own
(``PixArtTextRefinerModel``) beside a stock transformer: ``to_diffusers_components``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch import Tensor

from fewstep.models.dit import DiT
from fewstep.models.text_refiner_diffusers import PixArtTextRefinerModel

REFINER_PREFIX = "text_refiner."  # the DiT's refiner weights; the component's are "refiner.*"

_TOP = {  # ours -> diffusers (module paths; .weight/.bias follow)
    "x_embedder": "pos_embed.proj",
    "t_embedder.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.fc1": "caption_projection.linear_1",
    "y_embedder.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
    # the CFG-scale embedding of guidance-embedded students (fewstep.export.guided_pixart)
    "g_embedder.0": "guidance_embedder.linear_1",
    "g_embedder.2": "guidance_embedder.linear_2",
}
_BLOCK = {  # inside blocks.{i} -> transformer_blocks.{i}; a tuple is a fused linear (dim 0)
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q": ("attn2.to_q",),
    "cross_attn.kv": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}


def _key_pairs(depth: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every (our key, diffusers keys) pair for a model with ``depth`` blocks."""
    pairs = [("final_layer.scale_shift_table", ("scale_shift_table",))]
    for ours, theirs in _TOP.items():
        pairs += [(f"{ours}.{p}", (f"{theirs}.{p}",)) for p in ("weight", "bias")]
    for i in range(depth):
        ours_i, theirs_i = f"blocks.{i}", f"transformer_blocks.{i}"
        pairs.append((f"{ours_i}.scale_shift_table", (f"{theirs_i}.scale_shift_table",)))
        for ours, theirs in _BLOCK.items():
            for p in ("weight", "bias"):
                pairs.append((f"{ours_i}.{ours}.{p}", tuple(f"{theirs_i}.{t}.{p}" for t in theirs)))
    return pairs


def _depth(keys: list[str], prefix: str) -> int:
    """Number of blocks named ``{prefix}.{i}.`` in a list of state-dict keys."""
    found = [int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def _check_consumed(sd: Mapping[str, Tensor], used: set[str], source: str) -> None:
    """Fail loudly on keys a conversion cannot represent instead of dropping them."""
    left = sorted(set(sd) - used)
    if left:
        qk = any("_norm" in k for k in left)
        hint = " (QK-norm has no diffusers PixArt equivalent)" if qk else ""
        raise ValueError(
            f"Cannot convert {source} state dict: unknown keys {left[:8]}"
            f"{' ...' if len(left) > 8 else ''}{hint}."
        )


def state_dict_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our DiT state dict -> diffusers ``PixArtTransformer2DModel`` one (splits fused QKV/KV)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, theirs in _key_pairs(_depth(list(sd), "blocks")):
        if ours not in sd:
            continue
        parts = sd[ours].chunk(len(theirs), dim=0) if len(theirs) > 1 else (sd[ours],)
        out.update({k: v.clone() for k, v in zip(theirs, parts, strict=True)})
        used.add(ours)
    _check_consumed(sd, used, "DiT")
    return out


def state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``PixArtTransformer2DModel`` state dict -> our DiT state dict (fuses QKV)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, theirs in _key_pairs(_depth(list(sd), "transformer_blocks")):
        present = [k in sd for k in theirs]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"Cannot convert diffusers state dict: {ours} needs all of {theirs}.")
        out[ours] = torch.cat([sd[k] for k in theirs], dim=0)
        used.update(theirs)
    _check_consumed(sd, used, "diffusers PixArtTransformer2DModel")
    return out


def diffusers_config(dit: DiT, without_text_refiner: bool = False) -> dict[str, Any]:
    """The ``PixArtTransformer2DModel`` config of a DiT (PixArt-Σ: no size conditioning); a DiT
    with a text refiner only ``without_text_refiner`` (the refiner is a component of its own)."""
    c = dit.config()
    if c.get("text_refiner_depth", 0) and not without_text_refiner:
        raise ValueError(
            "DiT with text_refiner_depth > 0 is not one diffusers PixArtTransformer2DModel, which "
            "has no text refiner: export it with to_diffusers_components (transformer + "
            "text_refiner), as fewstep export / fewstep ship do (RefinedPixArtSigmaPipeline)."
        )
    if c["qk_norm"]:
        raise ValueError(
            "DiT with qk_norm=True cannot be exported: diffusers' PixArt has no QK-norm."
        )
    if int(c["hidden_size"] * c["mlp_ratio"]) != 4 * c["hidden_size"]:
        raise ValueError(
            f"DiT with mlp_ratio={c['mlp_ratio']} cannot be exported: diffusers' "
            "PixArt fixes the MLP width at 4x."
        )
    scale = dit.interpolation_scale
    return dict(
        num_attention_heads=c["num_heads"],
        attention_head_dim=c["hidden_size"] // c["num_heads"],
        in_channels=c["in_channels"],
        out_channels=dit.out_channels,
        num_layers=c["depth"],
        dropout=0.0,
        norm_num_groups=32,
        cross_attention_dim=dit.context_dim,
        attention_bias=True,
        sample_size=c["sample_size"],
        patch_size=c["patch_size"],
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        upcast_attention=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=int(scale) if float(scale).is_integer() else scale,
        use_additional_conditions=False,
        caption_channels=c["caption_channels"] if c["caption_projection"] else None,
        attention_type="default",
    )


_REQUIRED = {  # diffusers config fields our DiT hard-codes
    "norm_type": "ada_norm_single",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "attention_type": "default",
}


def dit_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``PixArtTransformer2DModel`` config -> ``DiT`` init arguments; unsupported fields raise."""
    for field, value in _REQUIRED.items():
        if config.get(field, value) != value:
            raise ValueError(
                f"Cannot convert PixArt transformer: config field {field}="
                f"{config.get(field)!r}, only {value!r} is supported."
            )
    if config.get("use_additional_conditions"):
        raise ValueError(
            "Cannot convert PixArt transformer: use_additional_conditions=True "
            "(PixArt-α size conditioning) is not supported; PixArt-Σ has it off."
        )
    in_ch, heads = config["in_channels"], config["num_attention_heads"]
    out_ch = config.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(
            f"Cannot convert PixArt transformer: out_channels={out_ch} must equal "
            f"in_channels={in_ch} or twice it (learned sigma)."
        )
    hidden = heads * config["attention_head_dim"]
    projection = config.get("caption_channels") is not None
    if projection and config.get("cross_attention_dim") != hidden:
        raise ValueError(
            f"Cannot convert PixArt transformer: cross_attention_dim="
            f"{config.get('cross_attention_dim')} must equal the width {hidden}."
        )
    sample_size = config["sample_size"]
    scale = config.get("interpolation_scale")
    return dict(
        in_channels=in_ch,
        patch_size=config["patch_size"],
        hidden_size=hidden,
        depth=config["num_layers"],
        num_heads=heads,
        mlp_ratio=4.0,
        caption_channels=config["caption_channels" if projection else "cross_attention_dim"],
        learn_sigma=out_ch == 2 * in_ch,
        sample_size=sample_size,
        interpolation_scale=float(scale) if scale is not None else float(max(sample_size // 64, 1)),
        caption_projection=projection,
    )


def split_text_refiner(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A DiT state dict -> (everything but the refiner, the refiner's keyed as its component's)."""
    rest = {k: v for k, v in sd.items() if not k.startswith(REFINER_PREFIX)}
    refiner = {"refiner." + k[len(REFINER_PREFIX) :]: v for k, v in sd.items() if k not in rest}
    return rest, refiner


def text_refiner_state_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``PixArtTextRefinerModel`` state dict -> the DiT's ``text_refiner.*`` entries."""
    wrong = [k for k in sd if not k.startswith("refiner.")]
    if wrong:
        raise ValueError(f"Cannot convert the text refiner: unknown keys {sorted(wrong)[:8]}.")
    return {REFINER_PREFIX + k[len("refiner.") :]: v for k, v in sd.items()}


def text_refiner_kwargs(config: Mapping[str, Any], dit_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``DiT`` init arguments of a ``PixArtTransformer2DModel`` config's DiT (``dit_kwargs``)
    given its ``PixArtTextRefinerModel`` config; a refiner the DiT cannot hold raises."""
    heads, channels = dit_kwargs["num_heads"], dit_kwargs["caption_channels"]
    if config.get("num_heads") != heads or config.get("channels") != channels:
        raise ValueError(
            f"Cannot convert the text refiner: its num_heads={config.get('num_heads')} and "
            f"channels={config.get('channels')} must equal the transformer's heads={heads} and "
            f"caption channels={channels} (a fewstep DiT's refiner shares them)."
        )
    return dict(
        text_refiner_depth=int(config["depth"]),
        text_refiner_width=int(config["dim"]),
        text_refiner_max_tokens=int(config["max_tokens"]),
        text_refiner_alibi=bool(config.get("alibi", False)),
        text_refiner_relative=bool(config.get("relative", False)),
        text_refiner_conv=int(config.get("conv", 0)),
    )


def to_diffusers(
    dit: DiT,
    model_class: type[PixArtTransformer2DModel] = PixArtTransformer2DModel,
    without_text_refiner: bool = False,
) -> PixArtTransformer2DModel:
    """A diffusers ``model_class`` (``PixArtTransformer2DModel`` or a subclass with a
    ``guidance_embedder``) carrying a DiT's weights (same device and dtype); a DiT with a text
    refiner only ``without_text_refiner`` (see ``to_diffusers_components``)."""
    if dit.g_embedder is not None and model_class is PixArtTransformer2DModel:
        raise ValueError(
            "DiT with guidance_embed=True has a CFG-scale embedding diffusers' PixArt lacks: "
            "export it as fewstep.export.guided_pixart.GuidedPixArtTransformer2DModel."
        )
    param = next(dit.parameters())
    model = model_class(**diffusers_config(dit, without_text_refiner))
    state, _ = split_text_refiner(dit.state_dict())
    model.load_state_dict(state_dict_to_diffusers(state), strict=True)
    model = model.to(param.device)
    return model if param.dtype == torch.float32 else model.to(param.dtype)


def text_refiner_to_diffusers(dit: DiT) -> PixArtTextRefinerModel | None:
    """The DiT's text refiner as a ``PixArtTextRefinerModel`` (same device and dtype), or None."""
    if dit.text_refiner is None:
        return None
    param = next(dit.text_refiner.parameters())
    model = PixArtTextRefinerModel(**dit.text_refiner.config)
    model.load_state_dict(split_text_refiner(dit.state_dict())[1], strict=True)
    model = model.to(param.device)
    return model if param.dtype == torch.float32 else model.to(param.dtype)


def to_diffusers_components(
    dit: DiT, model_class: type[PixArtTransformer2DModel] = PixArtTransformer2DModel
) -> tuple[PixArtTransformer2DModel, PixArtTextRefinerModel | None]:
    """(transformer, text refiner or None): the DiT = the transformer on refined text tokens."""
    return to_diffusers(dit, model_class, without_text_refiner=True), text_refiner_to_diffusers(dit)


def from_diffusers(
    model: PixArtTransformer2DModel, text_refiner: PixArtTextRefinerModel | None = None
) -> DiT:
    """A DiT carrying a diffusers ``PixArtTransformer2DModel``'s weights and, when given, its
    ``text_refiner`` component's (same device and dtype as the transformer)."""
    param = next(model.parameters())
    kwargs = dit_kwargs_from_diffusers_config(dict(model.config))
    state = state_dict_from_diffusers(model.state_dict())
    if text_refiner is not None:
        kwargs |= text_refiner_kwargs(dict(text_refiner.config), kwargs)
        state |= text_refiner_state_from_diffusers(text_refiner.state_dict())
    dit = DiT(**kwargs, guidance_embed=hasattr(model, "guidance_embedder"))
    dit.load_state_dict(state, strict=True)
    return dit.to(device=param.device, dtype=param.dtype)
