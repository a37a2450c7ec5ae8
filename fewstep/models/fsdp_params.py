"""The full parameters behind an FSDP-sharded network (FSDP1 with ``use_orig_params=True``, as
Lightning's FSDPStrategy sets): names without the wrapper prefixes, the FSDP units inside a
network, and per-unit gather and scatter of values kept in the parameters' local shards (the EMA
average, LCM's target θ⁻). One unit is unsharded at a time, so the peak memory is one unit, never
the whole model. Plain torch: used by the methods (fewstep.distill) and the Lightning layer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

# Prefixes FSDP and its activation-checkpointing wrapper insert into parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped network spells it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def fsdp_root(model: nn.Module | None) -> FSDP | None:
    """``model`` (the strategy's wrapped model) when it is an FSDP root, else None."""
    if not isinstance(model, FSDP):
        return None
    if not model._use_orig_params:
        raise ValueError(
            "Shadow weights (the EMA, LCM's θ⁻) under FSDP need use_orig_params=True "
            "(FSDPStrategy's default); remove "
            "use_orig_params: false from trainer.strategy.init_args."
        )
    return model


def _owned(unit: FSDP) -> list[nn.Parameter]:
    """The original parameters whose shards ``unit``'s flat parameter holds (nested units hold
    their own)."""
    owned, stack = [], [unit.module]
    while stack:
        module = stack.pop()
        owned += list(module.parameters(recurse=False))
        stack += [child for child in module.children() if not isinstance(child, FSDP)]
    return owned


def _units(root: FSDP, params: Sequence[nn.Parameter]) -> list[tuple[FSDP, list[int]]]:
    """(unit, indices into ``params`` it owns). The root comes first while FSDP has not
    initialised it (a unit summoned before its root would take itself for the root); after that
    it is left out when it owns none of ``params`` (it may be unsharded already: a state dict)."""
    index = {id(p): i for i, p in enumerate(params)}
    groups = []
    for unit in FSDP.fsdp_modules(root):  # pre-order: the root comes first
        mine = [index[id(p)] for p in _owned(unit) if id(p) in index]
        if mine or (unit is root and root._is_root is None):
            groups.append((unit, mine))
    if sum(len(mine) for _, mine in groups) != len(params):
        raise RuntimeError("FSDP: some averaged parameters belong to no FSDP unit of the model")
    return groups


def gather_full(
    root: FSDP, params: Sequence[nn.Parameter], local: Sequence[Tensor], keep: bool
) -> list[Tensor] | None:
    """The full tensors whose local shards are ``local`` (aligned with ``params``' shards), on CPU
    where ``keep`` (e.g. rank 0 only), else None; every rank must call. Each unit in turn: the
    local values are swapped into its shards, the unit unsharded and read, the shards restored."""
    full: list[Tensor | None] = [None] * len(params)
    for unit, mine in _units(root, params):
        backup = [params[i].detach().clone() for i in mine]
        for i in mine:
            params[i].detach().copy_(local[i])
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for i in mine:
                full[i] = params[i].detach().to("cpu", copy=True) if keep else None
        for i, saved in zip(mine, backup, strict=True):
            params[i].detach().copy_(saved)
    return list(full) if keep else None  # type: ignore[arg-type]


def scatter_full(
    root: FSDP, params: Sequence[nn.Parameter], full: Sequence[Tensor]
) -> list[Tensor]:
    """This rank's shards of the full tensors ``full`` (aligned with ``params``); every rank
    must call with the same values. The inverse of ``gather_full``."""
    local: list[Tensor | None] = [None] * len(params)
    for unit, mine in _units(root, params):
        backup = [params[i].detach().clone() for i in mine]
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for i in mine:
                params[i].detach().copy_(full[i])
        for i, saved in zip(mine, backup, strict=True):
            local[i] = params[i].detach().clone()
            params[i].detach().copy_(saved)
    return list(local)  # type: ignore[arg-type]


def root_trainable_names(root: FSDP) -> list[str]:
    """The trainable parameters the root unit itself holds (those of no nested unit), by name."""
    own = {id(p) for p in _owned(root)}
    return [clean_name(n) for n, p in root.named_parameters() if id(p) in own and p.requires_grad]


def nested_units(network: nn.Module) -> list[FSDP]:
    """The FSDP units inside ``network`` (itself included if it is one), outermost first."""
    return [m for m in network.modules() if isinstance(m, FSDP)]


def in_nested_unit(network: nn.Module, params: Sequence[nn.Parameter]) -> list[bool]:
    """For each of ``params`` (parameters of ``network``), whether an FSDP unit inside
    ``network`` holds it (sharded outside that unit's forward); False for the parameters left
    to the root unit that wraps ``network`` from outside (or for an unwrapped network)."""
    held = {id(p) for unit in nested_units(network) for p in _owned(unit)}
    return [id(p) in held for p in params]


def reshards_after_forward(unit: FSDP) -> bool:
    """Whether ``unit`` frees its gathered parameters after each forward, so that the next
    forward gathers them again from the local shards (FULL_SHARD, HYBRID_SHARD, NO_SHARD) — not
    SHARD_GRAD_OP, which keeps them gathered until the backward."""
    return unit.sharding_strategy not in (
        ShardingStrategy.SHARD_GRAD_OP,
        ShardingStrategy._HYBRID_SHARD_ZERO2,
    )
