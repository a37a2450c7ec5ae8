"""Low-rank adapters (LoRA, Hu et al. 2022: W + (alpha / r) B A) on a DiT or Flux through peft:
which linears get them, merging them into the weights, and their weights under diffusers' module
names (fused linears split exactly: the adapter of a fused [q; k; v] linear is A shared and B cut
by rows, as the base weight is)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.models import dit_convert, flux_convert
from fewstep.models.dit import DiT
from fewstep.models.flux import Flux

ADAPTER = "default"  # peft's adapter name
DIT_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj"]
DIT_TARGETS += ["mlp.fc1", "mlp.fc2"]
FLUX_TARGETS = ["img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"]
FLUX_TARGETS += ["img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2"]


@dataclass
class LoraSettings:
    """A LoRA student: ``rank`` r, ``alpha`` (None: r, i.e. scale 1), dropout on the adapter
    input, and ``target_modules``: module names or name suffixes (peft's matching; e.g.
    ``attn.qkv`` adapts every block's), None for the family default (every attention and MLP
    linear of the blocks: DIT_TARGETS / FLUX_TARGETS)."""

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)

    def targets(self, net: nn.Module) -> list[str]:
        """The target modules, or the default of ``net``'s family."""
        if self.target_modules is not None:
            return list(self.target_modules)
        if isinstance(net, Flux):
            return list(FLUX_TARGETS)
        if isinstance(net, DiT):
            return list(DIT_TARGETS)
        raise ValueError(
            f"StudentModule lora: no default target_modules for {type(net).__name__}; set "
            "model.init_args.lora.target_modules."
        )

    @property
    def scale(self) -> float:
        """alpha / r, the factor of B A (Hu et al. 2022, §4.1)."""
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank


def add_lora(net: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject adapters into ``net`` in place (peft; B = 0, so the output is unchanged) and make
    only them trainable; returns the adapted module names."""
    peft = _peft()
    if settings.rank < 1 or settings.scale <= 0 or not 0.0 <= settings.dropout < 1.0:
        raise ValueError(
            f"StudentModule lora: rank must be >= 1, alpha > 0 and dropout in [0, 1); got "
            f"rank={settings.rank}, alpha={settings.alpha}, dropout={settings.dropout}."
        )
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.rank * settings.scale,
        lora_dropout=settings.dropout,
        target_modules=settings.targets(net),
        bias="none",
    )
    try:
        peft.inject_adapter_in_model(config, net, adapter_name=ADAPTER)
    except ValueError as err:
        raise ValueError(
            f"StudentModule lora.target_modules={settings.targets(net)}: {err}".splitlines()[0]
        ) from None
    for name, param in net.named_parameters():
        param.requires_grad_(is_adapter(name))
    return sorted(lora_layers(net))


def _peft() -> Any:
    """The peft package, or one clear error saying how to install it."""
    try:
        import peft
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "LoRA students need peft: pip install 'fewstep[lora]' (or pip install 'peft>=0.13')."
        ) from None
    return peft


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The adapted modules of ``net`` by name (peft LoraLayer), empty for a plain network."""
    layer = _peft().tuners.lora.LoraLayer
    return {name: m for name, m in net.named_modules() if isinstance(m, layer)}


@torch.no_grad()
def merged(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adapter merged into its base weight (W + (alpha/r) B A) and
    the peft layers replaced by plain ones: the same function, the original module names."""
    out = copy.deepcopy(net)
    for name, layer in lora_layers(out).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, layer.get_base_layer())
    return out


def adapter_factors(net: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Per adapted module: (A [r, in, ...], (alpha/r) B [out, r, ...]), the scale folded into B
    so that the pair stands alone at alpha = r."""
    out = {}
    for name, layer in lora_layers(net).items():
        a = layer.lora_A[ADAPTER].weight.detach()
        b = layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER]
        out[name] = (a, b)
    return out


def _converter(net: nn.Module) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """Our -> diffusers state-dict converter of ``net``'s family (row operations on weights)."""
    if isinstance(net, Flux):
        return flux_convert.state_dict_to_diffusers
    if isinstance(net, DiT):
        return dit_convert.state_dict_to_diffusers
    raise ValueError(f"No diffusers key map for {type(net).__name__} (DiT and Flux have one).")


def diffusers_lora_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The adapters as ``<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` at alpha = r.
    B goes through the family's weight converter (which splits fused linears and reorders rows
    only), A is copied to every diffusers module the linear becomes: exact."""
    convert, out, flux = _converter(net), {}, isinstance(net, Flux)
    # Flux's converter reads the width (the q/k/v row count) from img_in: a 0-column stand-in
    width = {"img_in.weight": torch.empty(net.hidden_size, 0)} if flux else {}
    for name, (a, b) in adapter_factors(net).items():
        parts = convert({**width, f"{name}.weight": b})
        if flux and name != "img_in":
            del parts["x_embedder.weight"]  # the stand-in's
        for key, part in parts.items():
            module = key.removesuffix(".weight")
            out[f"{module}.lora_A.weight"] = a.clone().contiguous()
            out[f"{module}.lora_B.weight"] = part.clone().contiguous()
    return out


def diffusers_target_modules(state: Mapping[str, Tensor]) -> list[str]:
    """The diffusers module names a converted adapter state dict adapts."""
    return sorted({re.sub(r"\.lora_[AB]\.weight$", "", k) for k in state})
