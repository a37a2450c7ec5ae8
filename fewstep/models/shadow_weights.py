"""Shadow copies of a network's trainable parameters (an EMA average, LCM's target network θ⁻),
kept in the parameters' own layout so that they update and swap in without gathering anything:
full tensors on one device; under FSDP (FSDP1, ``use_orig_params=True``) this rank's shards of
the parameters that FSDP units shard, and full tensors where ``full`` says so. Saved state is
always full tensors by parameter name (the unwrapped names), so a run resumes and exports on any
number of devices. Plain torch; the owners decide when values are laid out which way."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from fewstep.models.fsdp_params import clean_name, gather_full, scatter_full

DtypeOf = Callable[[Tensor], torch.dtype]  # a parameter -> the dtype its shadow is kept in


def _dtype(dtype: DtypeOf | None, param: Tensor) -> torch.dtype:
    return dtype(param) if dtype is not None else param.dtype


def trainable_parameters(network: nn.Module) -> dict[str, nn.Parameter]:
    """``network``'s trainable floating-point parameters by their unwrapped names (a LoRA
    network: its adapters only)."""
    return {
        clean_name(n): p
        for n, p in network.named_parameters()
        if p.requires_grad and p.is_floating_point()
    }


def named_tensors(network: nn.Module, names: Sequence[str]) -> list[Tensor]:
    """``network``'s parameters called ``names`` (unwrapped names), as it holds them now (inside
    an FSDP forward: the gathered views)."""
    params = {clean_name(n): p for n, p in network.named_parameters()}
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"the network has no parameters {missing[:5]}")
    return [params[n] for n in names]


class ShadowWeights:
    """Named shadow values aligned with some parameters (see the module docstring)."""

    def __init__(self, names: Sequence[str], values: Sequence[Tensor], full: Sequence[bool]):
        if not len(names) == len(values) == len(full):
            raise ValueError("ShadowWeights: names, values and full differ in length")
        self.names, self.values, self.full = list(names), list(values), list(full)

    @classmethod
    def copy_of(
        cls,
        names: Sequence[str],
        params: Sequence[Tensor],
        full: Sequence[bool] | None = None,
        dtype: DtypeOf | None = None,
    ) -> ShadowWeights:
        """Detached copies of ``params`` as they are laid out now (each in ``dtype(param)`` if
        given, else the parameter's dtype)."""
        values = [p.detach().to(_dtype(dtype, p), copy=True) for p in params]
        return cls(names, values, full if full is not None else [True] * len(values))

    @torch.no_grad()
    def lerp_(self, params: Sequence[Tensor], weight: float) -> None:
        """shadow <- shadow + weight (param - shadow) (an EMA step with decay 1 - weight);
        ``params`` aligned with the shadows, in their layout."""
        if not self.values:
            return
        targets = [p.detach().to(s.dtype) for p, s in zip(params, self.values, strict=True)]
        torch._foreach_lerp_(self.values, targets, weight)

    @contextmanager
    def swapped_into(self, network: nn.Module) -> Iterator[None]:
        """Inside the context ``network`` computes with the shadow values (under no_grad; its own
        values come back bit for bit after). Full-layout shadows replace the parameter tensors
        of their modules for the context (nothing is written: inside an FSDP forward the root
        unit's parameters are views of its gathered flat parameter, which must not be modified
        in place); shards are copied into the parameters' local shards in place and restored
        (the FSDP units gather them at their next forward)."""
        slots = parameter_slots(network, self.names)
        now = [module._parameters[attr] for module, attr in slots]
        _check_layout(self.names, self.values, now)
        sharded = [i for i, f in enumerate(self.full) if not f]
        with torch.no_grad():
            backup = [now[i].detach().clone() for i in sharded]
            _copy([now[i] for i in sharded], [self.values[i] for i in sharded])
        for (module, attr), value, tensor, full in zip(
            slots, self.values, now, self.full, strict=True
        ):
            if full:
                module._parameters[attr] = value.to(tensor.dtype)  # type: ignore[assignment]
        try:
            yield
        finally:
            for (module, attr), tensor in zip(slots, now, strict=True):
                module._parameters[attr] = tensor  # type: ignore[assignment]
            with torch.no_grad():
                _copy([now[i] for i in sharded], backup)

    def full_state(self, root: FSDP | None, params: Sequence[nn.Parameter]) -> dict[str, Tensor]:
        """The shadows as full CPU tensors by name. Sharded ones are gathered through ``root``
        (a collective: every rank calls) and kept on rank 0 only (it writes checkpoints; the
        other ranks get the full-layout ones only)."""
        out = {n: v.detach().to("cpu", copy=True) for n, v, f in self._items() if f}
        local = [i for i, f in enumerate(self.full) if not f]
        if not local:
            return {n: out[n] for n in self.names}
        if root is None:
            raise RuntimeError("ShadowWeights: sharded shadows need the FSDP root to be saved")
        keep = not dist.is_initialized() or dist.get_rank() == 0
        gathered = gather_full(
            root, [params[i] for i in local], [self.values[i] for i in local], keep
        )
        if gathered is None:
            return out
        out.update({self.names[i]: t for i, t in zip(local, gathered, strict=True)})
        return {n: out[n] for n in self.names}

    @classmethod
    def from_full(
        cls,
        saved: dict[str, Tensor],
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        full: Sequence[bool],
        root: FSDP | None,
        dtype: DtypeOf | None = None,
    ) -> ShadowWeights:
        """Shadows from full saved tensors: ``full`` ones copied, the others cut to this rank's
        shards through ``root`` (a collective: every rank calls with the same ``saved``)."""
        missing = [n for n in names if n not in saved]
        if missing:
            raise KeyError(f"the saved shadow weights lack parameters {missing[:5]}")
        values: list[Tensor | None] = [
            saved[n].to(p.device, _dtype(dtype, p), copy=True) if f else None
            for n, p, f in zip(names, params, full, strict=True)
        ]
        local = [i for i, f in enumerate(full) if not f]
        if local:
            if root is None:
                raise RuntimeError("ShadowWeights: sharded shadows need the FSDP root to load")
            cut = scatter_full(root, [params[i] for i in local], [saved[names[i]] for i in local])
            for i, value in zip(local, cut, strict=True):
                values[i] = value.to(_dtype(dtype, params[i]))
        return cls(names, values, full)  # type: ignore[arg-type]

    def _items(self) -> Iterator[tuple[str, Tensor, bool]]:
        return zip(self.names, self.values, self.full, strict=True)


def parameter_slots(network: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """(module, attribute) holding each of ``names`` (unwrapped parameter names) in ``network``."""
    slots = {}
    for prefix, module in network.named_modules():
        for attr in module._parameters:
            slots[clean_name(f"{prefix}.{attr}" if prefix else attr)] = (module, attr)
    missing = [n for n in names if n not in slots]
    if missing:
        raise KeyError(f"the network has no parameters {missing[:5]}")
    return [slots[n] for n in names]


def _copy(params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """params <- values in place, outside autograd."""
    if params:
        torch._foreach_copy_([p.detach() for p in params], list(values))


def _check_layout(names: Sequence[str], values: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """One clear error when a shadow and its parameter are laid out differently (e.g. a shard
    against a gathered parameter)."""
    for name, value, param in zip(names, values, params, strict=True):
        if value.shape != param.shape:
            raise RuntimeError(
                f"shadow weight {name!r} has shape {tuple(value.shape)} but the parameter holds "
                f"{tuple(param.shape)} now (sharded against gathered: under FSDP the shadows "
                "swap in inside the training step, before the network's own forward)"
            )
