"""FSDP helpers for the Lightning layer: the parameter helpers of ``fewstep.models.fsdp_params``
(plain torch, so that methods in ``fewstep.distill`` use them too), re-exported, and the forward
of the FSDP root that manual optimisation runs each loss through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl

from fewstep.models.fsdp_params import (
    WRAPPER_PREFIXES,
    clean_name,
    fsdp_root,
    gather_full,
    root_trainable_names,
    scatter_full,
)

__all__ = [
    "WRAPPER_PREFIXES",
    "clean_name",
    "fsdp_root",
    "gather_full",
    "scatter_full",
    "through_root_forward",
]

T = TypeVar("T")


def through_root_forward(pl_module: pl.LightningModule, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` run as a forward of the FSDP root wrapping ``pl_module`` (directly when there
    is none). FSDP1 registers its backward hooks on the outputs of a finished root forward; a
    ``manual_backward`` inside ``training_step`` (itself one root forward) reaches the root's
    gradient hook while the root is still in FORWARD ("Expects BACKWARD_PRE or BACKWARD_POST
    state but got FORWARD"; Lightning issue #19685). Each loss computed this way is the output of
    a root forward of its own, and may be backpropagated before ``training_step`` returns."""
    trainer = pl_module._trainer
    root = fsdp_root(trainer.strategy.model) if trainer is not None else None
    if root is None:
        return fn(*args)
    shared = root_trainable_names(root)
    if shared:
        raise ValueError(
            "FSDP with two optimisers: the root FSDP unit holds trainable parameters "
            f"({', '.join(shared[:3])}, ...), which FSDP1 can neither save per optimiser nor "
            "freeze per step. Use the two-optimiser overlay, -c configs/fsdp/"
            "pixart_xl_two_optimizers.yaml or -c configs/fsdp/flux_two_optimizers.yaml, or add "
            "the networks' classes to trainer.strategy.init_args."
            "auto_wrap_policy next to the block classes (fewstep.models.dit.DiT or "
            "fewstep.models.flux.Flux, and fewstep.models.ladd_discriminator."
            "FeatureDiscriminatorHeads for GAN heads), so that each is an FSDP unit of its own."
        )
    inner = root.module
    original = inner.forward

    def forward(*_: Any, **__: Any) -> T:
        inner.forward = original  # type: ignore[method-assign]
        return fn(*args)

    inner.forward = forward  # type: ignore[method-assign]
    try:
        return root()
    finally:
        inner.forward = original  # type: ignore[method-assign]
