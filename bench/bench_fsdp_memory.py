"""Per-GPU memory of an FSDP training step (FULL_SHARD, bf16-mixed), against the 60 GB bar.

Estimate (default, CPU, seconds): the networks are built on the meta device and their parameter
counts feed the per-term formula of docs/distributed.md ("Memory per GPU"): P parameters, the
largest FSDP unit U (a DoubleStreamBlock / SingleStreamBlock / PixArtBlock), the root part R (all
a network holds outside its blocks) and the LoRA adapters L (the linears LoraSettings targets).

    python bench/bench_fsdp_memory.py --network flux_dev --method dmd2_lora --gpus 8 --px 1024
    python bench/bench_fsdp_memory.py --network pixart_sigma_xl2 --method teacher \\
      --weights fp32 --ema

Measure (``--measure``, CUDA): ``--steps`` training steps of the given YAMLs under FSDP (no
logger, validation or checkpoint), then every rank prints torch.cuda.max_memory_allocated beside
the estimate:

    python bench/bench_fsdp_memory.py --measure --network flux_dev --method lcm_lora \\
      -c configs/student/lcm_flux_dev_lora.yaml -c configs/fsdp/flux.yaml [more fit arguments]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewstep.models.dit import DiT, PixArtBlock  # noqa: E402
from fewstep.models.flux import Flux  # noqa: E402
from fewstep.models.flux_io import flux_kwargs_from_folder, flux_root  # noqa: E402
from fewstep.models.flux_layers import DoubleStreamBlock, SingleStreamBlock  # noqa: E402
from fewstep.models.ladd_discriminator import FeatureDiscriminatorHeads  # noqa: E402
from fewstep.models.lora import LoraSettings  # noqa: E402

GB = 1e9
BAR_GB = 60.0  # issue 17: a Flux-dev LoRA DMD2 step at 1024 px on 8 GPUs
UNITS = (DoubleStreamBlock, SingleStreamBlock, PixArtBlock)  # the overlays' block wrap classes
VAE_FACTOR = 8  # latent side = px / 8 (FLUX.1 and SDXL-style VAEs)
TEXT_TOKENS = 512  # T5 tokens at FLUX.1-dev / PixArt-Σ length
RECOMPUTE_WIDTHS = 28  # token widths one block keeps while recomputed (single-stream count)
CUDA_CONTEXT_GB = 2.0  # CUDA context and allocator slack
NETWORKS = {"flux_dev": None, "pixart_sigma_xl2": "configs/model/dit/pixart_sigma_xl2.yaml"}
METHODS = ("teacher", "lcm_lora", "dmd2_lora", "dmd2_full")
BYTES = {"bf16": 2, "fp32": 4}
PRETRAINED_FLUX = "fewstep.models.flux_io.PretrainedFlux"


@dataclass
class Counts:
    """Parameter counts of one network: total P, largest block unit U, root part R, adapters L."""

    total: int
    largest_unit: int
    root: int
    lora: int
    width: int
    blocks: int
    text_dim: int
    image_tokens_per_px2: float  # image tokens = px^2 x this
    joint_text: bool  # Flux: text tokens run through every block with the image tokens


@dataclass
class Term:
    """One line of the table: what, its bytes formula, GB per GPU."""

    name: str
    formula: str
    gb: float


def build_network(spec: str, device: str = "meta") -> nn.Module:
    """``flux_dev`` (Flux() defaults are FLUX.1-dev's), ``pixart_sigma_xl2``, or a YAML: a network
    (class_path Flux / DiT / PretrainedFlux with init_args) or a fit config, whose
    model.init_args.network (or teacher_config's, for a student) is read."""
    if spec == "flux_dev":
        with torch.device(device):
            return Flux()
    cfg = network_config(NETWORKS.get(spec) or spec)
    kwargs = dict(cfg.get("init_args") or {})
    if cfg.get("class_path") == PRETRAINED_FLUX:  # its folder's config, else FLUX.1-dev's
        folder = ROOT / kwargs.get("path", "")
        kwargs = flux_kwargs_from_folder(flux_root(folder)) if folder.is_dir() else {}
        cfg = {"class_path": "fewstep.models.flux.Flux"}
    classes = {"fewstep.models.flux.Flux": Flux, "fewstep.models.dit.DiT": DiT}
    if cfg.get("class_path") not in classes:
        choices = sorted([*classes, PRETRAINED_FLUX])
        raise ValueError(f"--network {spec}: the network's class_path must be one of {choices}.")
    with torch.device(device):
        return classes[cfg["class_path"]](**kwargs)


def network_config(spec: str) -> dict:
    """The network's {class_path, init_args} from a network YAML or a fit config."""
    path = Path(spec) if Path(spec).is_file() else ROOT / spec
    if not path.is_file():
        raise ValueError(f"--network {spec}: not {sorted(NETWORKS)} nor a YAML file.")
    cfg = yaml.safe_load(path.read_text()) or {}
    if "model" not in cfg:
        return cfg
    init = cfg["model"].get("init_args") or {}
    if init.get("network"):
        return init["network"]
    if init.get("teacher_config"):  # a student: the teacher's network (its copy, or the base)
        return network_config(str(init["teacher_config"]))
    raise ValueError(f"--network {spec}: no model.init_args.network or teacher_config in it.")


def lora_count(net: nn.Module, settings: LoraSettings) -> int:
    """Adapter parameters r (in + out) over the linears peft matches (name == target or ends
    with '.' + target; Hu et al. 2022: W + B A, A [r, in], B [out, r])."""
    targets = settings.targets(net)
    return sum(
        settings.rank * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def count(net: nn.Module, settings: LoraSettings) -> Counts:
    """P, U, R and L of ``net`` (any device: numel needs no storage)."""
    units = [sum(p.numel() for p in m.parameters()) for m in net.modules() if isinstance(m, UNITS)]
    total = sum(p.numel() for p in net.parameters())
    feats = net.token_features()
    patch = feats.patch * VAE_FACTOR
    return Counts(
        total=total,
        largest_unit=max(units),
        root=total - sum(units),
        lora=lora_count(net, settings),
        width=feats.width,
        blocks=len(feats.blocks),
        text_dim=feats.text_dim,
        image_tokens_per_px2=1.0 / patch**2,
        joint_text=isinstance(net, Flux),
    )


def head_count(c: Counts, gan: bool) -> int:
    """DMD2's GAN heads (one, on the last block; FeatureDiscriminatorHeads defaults), 0 without."""
    if not gan:
        return 0
    with torch.device("meta"):
        heads = FeatureDiscriminatorHeads(num_heads=1, feature_dim=c.width, text_dim=c.text_dim)
    return sum(p.numel() for p in heads.parameters())


def sample_activation_bytes(c: Counts, px: int, text_tokens: int, vae: int = VAE_FACTOR) -> float:
    """One sample's differentiated forward with per-block checkpointing: every block's bf16
    input kept, plus one block's internals (RECOMPUTE_WIDTHS token widths) while recomputed."""
    tokens = px * px * c.image_tokens_per_px2 / (vae / VAE_FACTOR) ** 2
    tokens += text_tokens if c.joint_text else 0
    return (c.blocks + RECOMPUTE_WIDTHS) * tokens * c.width * 2


def term(name: str, coeff: float, symbol: str, value: int, gpus: int | None) -> Term:
    """``coeff`` bytes per ``symbol`` (a count ``value``), sharded over ``gpus`` (None: whole)."""
    div = f" / {gpus}" if gpus else ""
    return Term(name, f"{coeff:g}·{symbol}{div}", coeff * value / (gpus or 1) / GB)


def state_terms(c: Counts, method: str, a: argparse.Namespace) -> list[Term]:
    """Sharded weights, gradients, Adam states (and EMA) of every network ``method`` holds."""
    if method not in METHODS:
        raise ValueError(f"--method {method}: choose one of {METHODS}.")
    n, w, t = a.gpus, BYTES[a.weights], BYTES[a.teacher_weights]
    e = 4 if a.ema else 0  # the EMA keeps a float32 average of every trainable parameter
    opt = 4 * w + e  # weight w + grad w + Adam m, v 2w (torch keeps them in the weight's dtype)
    kept = f"{4 * w}" + (" + 4 EMA" if e else "")
    P, L = c.total, c.lora
    if method == "teacher":
        return [term(f"network, trained: weight, grad, Adam m, v ({kept} B)", opt, "P", P, n)]
    out = [term(f"frozen teacher ({a.teacher_weights})", t, "P", P, n)]
    if method.endswith("_lora"):
        out.append(term(f"student base, frozen ({a.weights})", w, "P", P, n))
        out.append(
            term("its flat gradient (FSDP1 units mixing frozen and trainable)", w, "P", P, n)
        )
        out.append(term(f"adapters: weight, grad, Adam m, v ({kept} B)", opt, "L", L, n))
    if method == "lcm_lora":
        out.append(term(f"LCM target θ⁻: shadows of the adapters ({a.weights})", w, "L", L, n))
    if method == "dmd2_full":
        out.append(term(f"student, trained ({kept} B)", opt, "P", P, n))
    if method.startswith("dmd2"):
        out.append(term(f"fake score, full copy trained ({4 * w} B, no EMA)", 4 * w, "P", P, n))
        if a.gan:
            out.append(term(f"GAN heads ({4 * w} B)", 4 * w, "H", head_count(c, True), n))
    return out


def step_terms(c: Counts, method: str, a: argparse.Namespace) -> list[Term]:
    """What one step adds: gathered units and root parts, activations, the CUDA context."""
    roots = 1 if method == "teacher" else 2
    fwd = 3 if (method.startswith("dmd2") and a.gan) else 1
    act = fwd * a.batch * sample_activation_bytes(c, a.px, a.text_tokens, a.vae_factor) / GB
    return [
        term("two gathered bf16 block units (current + prefetch)", 4, "U", c.largest_unit, None),
        term(f"{roots} networks' root parts gathered (bf16)", 2 * roots, "R", c.root, None),
        Term(f"activations: {fwd}×batch {a.batch} forwards", "(blocks + 28)·tokens·width·2", act),
        Term("CUDA context and allocator slack", "", CUDA_CONTEXT_GB),
    ]


def terms(c: Counts, method: str, a: argparse.Namespace) -> list[Term]:
    """The per-GPU terms of ``method`` (docs/distributed.md, "Memory per GPU")."""
    return state_terms(c, method, a) + step_terms(c, method, a)


def estimate(net: nn.Module, a: argparse.Namespace) -> dict:
    """Counts, terms and total (GB per GPU) of ``a.method`` on ``net``."""
    c = count(net, LoraSettings(rank=a.lora_rank, target_modules=a.lora_targets))
    rows = terms(c, a.method, a)
    return {
        "counts": asdict(c),
        "terms": [asdict(r) for r in rows],
        "total_gb": sum(r.gb for r in rows),
    }


def print_report(report: dict, a: argparse.Namespace) -> None:
    """The per-term table, each figure with its ratio to the 60 GB bar."""
    c = report["counts"]
    setting = f"{a.gpus} GPUs, {a.px} px, batch {a.batch}/GPU, LoRA r{a.lora_rank}"
    print(f"{a.network} {a.method}: {setting}")
    print(f"P={c['total']:,}  U={c['largest_unit']:,}  R={c['root']:,}  L={c['lora']:,}")
    print(f"{'term':<62} {'bytes':<34} {'GB/GPU':>7} {'/60GB':>6}")
    for r in report["terms"]:
        print(f"{r['name']:<62} {r['formula']:<34} {r['gb']:7.2f} {r['gb'] / BAR_GB:6.3f}")
    total = report["total_gb"]
    print(f"{'total (estimate)':<62} {'':<34} {total:7.2f} {total / BAR_GB:6.3f}")


def has_cuda() -> bool:
    """Whether CUDA GPUs are visible (the one thing --measure needs that a CPU lacks)."""
    return torch.cuda.is_available()


def measure(a: argparse.Namespace, report: dict) -> None:
    """``a.steps`` training steps of the ``-c`` YAMLs (every rank runs this under Lightning's
    launcher; no logger, validation or checkpoint), then each rank's peak allocation."""
    if not has_cuda():
        raise SystemExit("--measure needs CUDA GPUs (none visible); run the estimate without it.")
    if not a.config:
        raise SystemExit("--measure needs the run's YAMLs: -c <student or teacher> -c <overlay>.")
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from fewstep.cli import FewstepCLI

    args = [x for c in a.config for x in ("-c", c)] + [
        f"--trainer.max_steps={a.steps}", f"--trainer.devices={a.gpus}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false", f"--data.init_args.batch_size={a.batch}",
        f"--trainer.default_root_dir={tempfile.mkdtemp(prefix='fsdp_memory_')}", *a.override,
    ]  # fmt: skip
    cli = FewstepCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, args=args, run=False,
    )  # fmt: skip
    trainer = cli.trainer
    drop = (ModelCheckpoint, LearningRateMonitor)  # no checkpoint written; no logger to watch
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, drop)]
    trainer.fit(cli.model, datamodule=cli.datamodule)
    peak, reserved = torch.cuda.max_memory_allocated() / GB, torch.cuda.max_memory_reserved() / GB
    est = report["total_gb"] - CUDA_CONTEXT_GB  # allocated memory holds no CUDA context
    print(
        f"rank {trainer.global_rank}: max_memory_allocated {peak:.2f} GB ({peak / BAR_GB:.3f} of "
        f"60 GB), max_memory_reserved {reserved:.2f} GB; estimate without the CUDA context "
        f"{est:.2f} GB (measured/estimate {peak / est:.3f})",
        flush=True,
    )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--network",
        help=f"{sorted(NETWORKS)}, a network or fit YAML (default: the first -c, else flux_dev)",
    )
    p.add_argument("--method", default="dmd2_lora", choices=METHODS)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--px", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2, help="samples per GPU")
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    p.add_argument("--vae-factor", type=int, default=VAE_FACTOR, help="pixels per latent (8)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-targets", nargs="*", default=None, help="default: the family's")
    p.add_argument("--weights", choices=BYTES, default="bf16", help="trained networks' dtype")
    p.add_argument("--teacher-weights", choices=BYTES, default="bf16")
    p.add_argument("--ema", action="store_true", help="an EMA callback (float32 average)")
    p.add_argument("--gan", action="store_true", help="DMD2 with its GAN head (gan_weight > 0)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--measure", action="store_true", help="run training steps on CUDA GPUs")
    p.add_argument("--steps", type=int, default=6, help="--measure: optimiser steps (DMD2: 1 + 5)")
    p.add_argument("-c", "--config", action="append", default=[], help="fit YAMLs (--measure)")
    a, a.override = p.parse_known_args(argv)  # the rest: fit arguments, e.g. --trainer.num_nodes=2
    a.network = a.network or (a.config[0] if a.config else "flux_dev")
    if a.override and not a.measure:
        p.error(f"unrecognized arguments: {' '.join(a.override)} (fit arguments need --measure)")
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    """Print (and optionally write) the estimate; with --measure, also run and measure."""
    a = parse(argv)
    report = estimate(build_network(a.network), a)
    print_report(report, a)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, **report}))
    if a.measure:
        measure(a, report)
    return report


if __name__ == "__main__":
    main()
