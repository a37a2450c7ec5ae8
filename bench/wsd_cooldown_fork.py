"""Fork a cooldown branch from a warmup-stable-decay run (Hägele et al. 2024, §3: the lr can be
annealed from any stable-phase checkpoint): copy ``CKPT`` to ``OUT`` with its WarmupStableDecay
state rewritten so that the decay starts at the checkpoint's step and lasts ``--steps`` steps.

    python bench/wsd_cooldown_fork.py CKPT OUT --steps 2000
    fewstep fit -c <the run's configs> --ckpt_path OUT --trainer.max_steps=<step + steps> \
        --trainer.logger.init_args.name=<branch name>

The scheduler's arguments live in the checkpoint (torch restores ``__dict__``), so a YAML
override of ``total_steps`` on resume would be ignored; this rewrites them instead. The source
checkpoint is never modified."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def cooldown_state(state: dict, step: int, steps: int) -> dict:
    """WarmupStableDecay state whose cosine decay spans [step, step + steps]."""
    if "decay_fraction" not in state:
        raise SystemExit("the checkpoint's lr scheduler is not a WarmupStableDecay")
    total = step + steps
    return {**state, "total_steps": total, "decay_fraction": steps / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="length of the decay")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new path (nothing was written)")
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    step = int(ckpt["global_step"])
    ckpt["lr_schedulers"] = [cooldown_state(s, step, args.steps) for s in ckpt["lr_schedulers"]]
    torch.save(ckpt, args.out)
    print(f"{args.out}: decay over steps {step}..{step + args.steps}")


if __name__ == "__main__":
    main()
