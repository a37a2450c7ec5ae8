"""Write a teacher checkpoint's network weights (its EMA average by default) without some
tensors, for ``TeacherModule.init_weights`` with ``init_weights_ema: false``: the dropped
tensors start from the new run's initialisation (e.g. a text refiner's token positions
re-drawn at a larger scale).

    python bench/graft_without.py SRC.ckpt OUT.ckpt --drop text_refiner.positions
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fewstep.lightning.checkpoints import network_weights


def graft_without(src: Path, out: Path, drop: list[str], ema: bool = True) -> list[str]:
    """Save ``src``'s network weights minus the names in ``drop`` (each must exist) to ``out``
    as ``{"state_dict": {"network.<name>": tensor}}``; returns the dropped names."""
    weights = network_weights(src, ema)
    unknown = sorted(set(drop) - set(weights))
    if unknown:
        raise ValueError(
            f"{src} has no network tensors {unknown}; names look like {sorted(weights)[:3]}"
        )
    kept = {f"network.{k}": v for k, v in weights.items() if k not in drop}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": kept, "graft_source": str(src), "dropped": sorted(drop)}, out)
    return sorted(drop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--drop", action="append", required=True, help="a network tensor name")
    parser.add_argument("--raw", action="store_true", help="the raw weights, not the EMA")
    args = parser.parse_args(argv)
    dropped = graft_without(args.src, args.out, args.drop, ema=not args.raw)
    print(f"wrote {args.out} without {dropped}")


if __name__ == "__main__":
    main()
