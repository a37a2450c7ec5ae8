"""Bring a candidate trained by bench/gpu_reference_teacher.py back to this machine.

    python bench/gpu_reference_import.py FILES NAME [--out runs/reference/NAME]

FILES is the folder the device call returned (``NAME_ema_0.pt``, ``NAME_ema_1.pt``,
``logs.tgz``). Writes ``OUT/ema.ckpt`` (the two halves joined: the EMA weights as the model's
state dict) and ``OUT/config.yaml`` (the run's config, pointed at the local reference cache and
VAE, float32, the CPU runs' 512 held-out prompts). Then, as for any teacher:

    fewstep validate -c OUT/config.yaml --ckpt_path OUT/ema.ckpt
    fewstep ship --config OUT/config.yaml --ckpt_path OUT/ema.ckpt --ema false --out FOLDER
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml

LOCAL = {  # the CPU reference runs' data, so scores compare with theirs (same prompts, noise)
    "data.init_args.path": "runs/reference/cache",
    "data.init_args.batch_size": 32,
    "data.init_args.num_workers": 0,
    "data.init_args.val_fraction": 0.01024,
    "model.init_args.vae_path": "fewstep/assets/reference_vae",
    "trainer.precision": "32-true",
    "trainer.limit_val_batches": 16,
}


def joined_checkpoint(files: Path, name: str) -> dict[str, Any]:
    """The halves ``name_ema_{0,1}.pt`` as one Lightning-style checkpoint of the EMA weights."""
    halves = [torch.load(files / f"{name}_ema_{i}.pt", weights_only=True) for i in (0, 1)]
    state = {**halves[0]["state_dict"], **halves[1]["state_dict"]}
    if len(state) != sum(len(h["state_dict"]) for h in halves):
        raise ValueError(f"{files}: the halves of {name} overlap; were they written by one run?")
    return {
        "state_dict": state,
        "global_step": halves[0]["meta"]["global_step"],
        "epoch": 0,
        "pytorch-lightning_version": lightning.__version__,
        "fewstep_gpu_import": {"weights": halves[0]["meta"]["weights"], "name": name},
    }


def local_config(files: Path, name: str, out: Path) -> dict[str, Any]:
    """The run's config from ``logs.tgz``, with the local paths of ``LOCAL``, no EMA callback
    (the weights are the average already) and its logs under ``out``."""
    with tarfile.open(files / "logs.tgz") as tar:
        member = tar.extractfile(f"runs/{name}/config.yaml")
        if member is None:
            raise FileNotFoundError(f"{files}/logs.tgz has no runs/{name}/config.yaml")
        config = yaml.safe_load(member.read())
    for key, value in LOCAL.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("EMA")]
    trainer["logger"]["init_args"].update(save_dir=str(out.parent), name=out.name, version="eval")
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path)
    parser.add_argument("name")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("runs/reference") / args.name
    out.mkdir(parents=True, exist_ok=True)
    torch.save(joined_checkpoint(args.files, args.name), out / "ema.ckpt")
    config = local_config(args.files, args.name, out)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {out / 'ema.ckpt'} and {out / 'config.yaml'}")


if __name__ == "__main__":
    main()
