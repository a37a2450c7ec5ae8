"""Teacher speed: our DiT vs diffusers' PixArtTransformer2DModel, same weights, same device.

Cases (PixArt-Σ XL/2, T5-length text with about half the tokens padding):
  train256 / train512 -- training step (forward + MSE + backward + AdamW) at 256 px batch 64
      and 512 px batch 32: images/s and MFU = 3 x counted forward FLOPs x images/s / peak.
      Mixed precision as Lightning's bf16-mixed: fp32 master weights, bf16 autocast; fused
      AdamW on CUDA.
  fwd1024 -- forward latency at 1024 px (128x128 latents), batch 1 and 2, no grad, bf16 weights.
Each case runs for both implementations, eager and/or ``torch.compile``d, one model on the
device at a time. Timings are CUDA events per step (wall clock on CPU), median of ``--steps``
after ``--warmup`` untimed steps (compilation happens in the warm-up). The ratio is
ours/diffusers in images/s (>1: ours is faster; for latency, diffusers ms / our ms).

    python bench/bench_teacher.py [--compile both] [--json out.json]
    python bench/bench_teacher.py --preset tiny --device cpu --dtype fp32 --compile off
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from diffusers.utils import logging as diffusers_logging
from torch import Tensor, nn

from fewstep.models.dit import DiT
from fewstep.models.dit_convert import to_diffusers

ROOT = Path(__file__).resolve().parents[1]
XL2_YAML = ROOT / "configs/model/dit/pixart_sigma_xl2.yaml"
TINY_KWARGS = dict(  # ~3M parameters: a CPU smoke run of the same code path
    hidden_size=192, depth=4, num_heads=3, caption_channels=4096, sample_size=32
)
PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peaks, first substring match of the device name
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
)
NO_SIZE_COND = {"resolution": None, "aspect_ratio": None}  # PixArt-Σ: no size conditioning
TARGET_MFU_256 = 0.45
TARGET_EAGER_RATIO = 1.3
TARGET_FWD1024_MS = 15.0
IMPLS = ("ours", "diffusers")


@dataclass
class Case:
    """One measurement setting: a training step or a forward pass at a resolution and batch."""

    name: str
    kind: str  # "train" or "fwd"
    px: int
    batch: int


@dataclass
class Result:
    """One (case, implementation, compile) measurement; ``status`` is ok, oom or error."""

    case: str
    kind: str
    px: int
    batch: int
    impl: str
    compiled: bool
    status: str = "ok"
    ms: float | None = None  # median per step (train) or per forward (fwd)
    images_per_s: float | None = None
    mfu: float | None = None
    first_step_s: float | None = None  # includes compilation when compiled
    peak_mem_gb: float | None = None
    error: str | None = None


def mfu(flops_per_sample: float, images_per_s: float, peak_tflops: float, train: bool) -> float:
    """Model FLOPs utilisation: (3 x forward FLOPs if training, else 1 x) x images/s / peak."""
    return (3.0 if train else 1.0) * flops_per_sample * images_per_s / (peak_tflops * 1e12)


def detect_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense bf16 peak of a known GPU (H100/H200), else None (MFU then prints n/a)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The selected cases with their (possibly overridden) resolutions and batch sizes."""
    px256, px512, px1024 = args.resolutions
    cases = {
        "train256": [Case("train256", "train", px256, args.train_batches[0])],
        "train512": [Case("train512", "train", px512, args.train_batches[1])],
        "fwd1024": [Case(f"fwd1024_b{b}", "fwd", px1024, b) for b in args.fwd_batches],
    }
    return [c for name in args.cases for c in cases[name]]


def build_dit(preset: str, grad_ckpt: bool) -> DiT:
    """Our DiT at the XL/2 preset (from its YAML) or the tiny smoke-test size, seeded."""
    kwargs = yaml.safe_load(XL2_YAML.read_text())["init_args"] if preset == "xl2" else TINY_KWARGS
    torch.manual_seed(0)
    dit = DiT(**kwargs, gradient_checkpointing=grad_ckpt)
    with torch.no_grad():  # like a trained teacher: no all-zero tensors (PixArt zero-inits some)
        for param in dit.parameters():
            if not param.any():
                param.normal_(0.0, 0.02)
    return dit


def make_inputs(
    dit: DiT, case: Case, text_len: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Latents [B,4,H/8,W/8], timesteps [B], text [B,L,Ct], mask [B,L] (~half padding), target."""
    g = torch.Generator().manual_seed(1)
    b, side = case.batch, case.px // 8
    valid = torch.randint(text_len // 4, 3 * text_len // 4 + 1, (b,), generator=g)  # [B]
    tensors = {
        "x": torch.randn(b, dit.in_channels, side, side, generator=g),
        "t": torch.rand(b, generator=g) * 999,
        "text": torch.randn(b, text_len, dit.config()["caption_channels"], generator=g),
        "mask": torch.arange(text_len)[None] < valid[:, None],  # [B, L], True = valid
        "target": torch.randn(b, dit.out_channels, side, side, generator=g),
    }
    out = {k: v.to(device) for k, v in tensors.items()}
    if case.kind == "fwd":  # inference runs in the model's dtype; training under autocast
        out.update({k: out[k].to(dtype) for k in ("x", "text")})
    return out


def forward_fn(impl: str, net: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
    """A call of either implementation on the shared inputs (diffusers gets a 1/0 float mask)."""

    def ours(d: dict[str, Tensor]) -> Tensor:
        """Our DiT: boolean key-padding mask."""
        return net(d["x"], d["t"], d["text"], d["mask"])

    def theirs(d: dict[str, Tensor]) -> Tensor:
        """Diffusers: float 1/0 mask, as PixArtSigmaPipeline passes it."""
        mask = d["mask"].to(d["text"].dtype)
        out = net(
            d["x"],
            encoder_hidden_states=d["text"],
            encoder_attention_mask=mask,
            timestep=d["t"],
            added_cond_kwargs=NO_SIZE_COND,
        )
        return out.sample

    return ours if impl == "ours" else theirs


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast (Lightning's bf16-mixed) or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step_fn(
    fwd: Callable, net: nn.Module, data: dict[str, Tensor], device: torch.device, dtype: torch.dtype
) -> Callable[[], None]:
    """One optimisation step: forward + MSE loss + backward + AdamW (fused on CUDA)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        """Forward under autocast, fp32 loss, backward, optimiser step."""
        with autocast(device, dtype):
            out = fwd(data)
        F.mse_loss(out.float(), data["target"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fwd_step_fn(fwd: Callable, data: dict[str, Tensor]) -> Callable[[], None]:
    """One forward pass without autograd."""

    def step() -> None:
        """Inference-mode forward."""
        with torch.inference_mode():
            fwd(data)

    return step


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_event() -> torch.cuda.Event:
    """A CUDA event that records time."""
    return torch.cuda.Event(enable_timing=True)


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls: CUDA events on GPU, wall clock on CPU."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(cuda_event(), cuda_event()) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    sync(device)
    return [start.elapsed_time(end) for start, end in events]


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' logger below errors for the duration."""
    old = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(old)


def prepare_net(
    master: nn.Module, case: Case, args: argparse.Namespace, compiled: bool
) -> nn.Module:
    """A device copy of a CPU master (bf16 weights for inference) and its compiled wrapper."""
    dtype = args.torch_dtype if case.kind == "fwd" else torch.float32  # fp32 master weights
    with quiet_diffusers():  # its warning about casting with .to() concerns from_pretrained
        net = copy.deepcopy(master).to(args.device, dtype).train(case.kind == "train")
    if not compiled:
        return net
    torch._dynamo.reset()  # fresh guards: no automatic-dynamic shapes from an earlier case
    if args.compile_scope == "blocks":  # regional: one compiled block reused by all blocks
        blocks = net.blocks if isinstance(net, DiT) else net.transformer_blocks
        for block in blocks:
            block.compile(mode=args.compile_mode, dynamic=False)
        return net
    return torch.compile(net, mode=args.compile_mode, dynamic=False)


def run_one(
    master: nn.Module, impl: str, case: Case, compiled: bool, args: argparse.Namespace
) -> Result:
    """Warm up, then time one case; the model is built and freed inside."""
    res = Result(case.name, case.kind, case.px, case.batch, impl, compiled)
    device = args.device
    net = prepare_net(master, case, args, compiled)
    data = make_inputs(args.dit, case, args.text_len, device, args.torch_dtype)
    fwd = forward_fn(impl, net)
    if case.kind == "train":
        step = train_step_fn(fwd, net, data, device, args.torch_dtype)
    else:
        step = fwd_step_fn(fwd, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()  # first call: compilation, allocator growth, autotuning
    sync(device)
    res.first_step_s = time.perf_counter() - start
    for _ in range(max(args.warmup - 1, 2 if compiled else 0)):
        step()
    sync(device)
    res.ms = statistics.median(time_steps(step, args.steps, device))
    res.images_per_s = case.batch / (res.ms / 1e3)
    if device.type == "cuda":
        res.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    return res


def measure(
    master: nn.Module, impl: str, case: Case, compiled: bool, args: argparse.Namespace
) -> Result:
    """``run_one`` that reports an out-of-memory or a failure instead of raising."""
    try:
        res = run_one(master, impl, case, compiled, args)
    except torch.OutOfMemoryError:
        res = Result(case.name, case.kind, case.px, case.batch, impl, compiled, status="oom")
    except Exception as err:  # e.g. a compiler failure: report it and go on with other cases
        text = str(err)
        status = "oom" if "out of memory" in text.lower() else "error"  # OOM wrapped by inductor
        msg = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        res = Result(case.name, case.kind, case.px, case.batch, impl, compiled, status, error=msg)
    free(args.device)
    if res.status == "ok" and args.peak_tflops:
        flops = args.dit.flops_per_sample((case.px // 8, case.px // 8), args.text_len)
        res.mfu = mfu(flops, res.images_per_s, args.peak_tflops, case.kind == "train")
    return res


def free(device: torch.device) -> None:
    """Release the previous model, optimiser and compiled graphs before the next case."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compile_modes(flag: str) -> list[bool]:
    """--compile off/on/both -> the compiled settings to run."""
    return {"off": [False], "on": [True], "both": [False, True]}[flag]


def run_all(args: argparse.Namespace, masters: dict[str, nn.Module]) -> list[Result]:
    """Every case x compile setting x implementation, ours and diffusers back to back."""
    results = []
    for case in build_cases(args):
        for compiled in compile_modes(args.compile):
            for impl in IMPLS:
                res = measure(masters[impl], impl, case, compiled, args)
                results.append(res)
                print(
                    f"  measured {case.name} {impl} {'compiled' if compiled else 'eager'}: "
                    f"{res.status} {fmt(res.ms, '.2f')} ms",
                    flush=True,
                )
    return results


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    """ours/diffusers images/s per (case, compile) where both ran."""
    out = []
    for ours in (r for r in results if r.impl == "ours" and r.status == "ok"):
        theirs = find(results, ours.case, "diffusers", ours.compiled)
        if theirs is not None:
            ratio = ours.images_per_s / theirs.images_per_s
            out.append({"case": ours.case, "compiled": ours.compiled, "ratio": ratio})
    return out


def find(results: list[Result], case: str, impl: str, compiled: bool) -> Result | None:
    """The successful result of one (case, impl, compiled), or None."""
    hits = [
        r for r in results if (r.case, r.impl, r.compiled, r.status) == (case, impl, compiled, "ok")
    ]
    return hits[0] if hits else None


def fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """A number or n/a."""
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def print_table(results: list[Result], ratio_rows: list[dict[str, Any]]) -> None:
    """Case, implementation, compile, images/s, ms, MFU and ours/diffusers per row."""
    lookup = {(r["case"], r["compiled"]): r["ratio"] for r in ratio_rows}
    head = f"{'case':12s} {'px':>5s} {'batch':>5s} {'impl':10s} {'compile':8s} {'images/s':>10s}"
    print(f"{head} {'ms':>9s} {'MFU':>7s} {'mem GB':>7s} {'ours/diffusers':>15s}")
    for r in results:
        ratio = lookup.get((r.case, r.compiled)) if r.impl == "ours" else None
        status = "" if r.status == "ok" else f"  {r.status.upper()} {r.error or ''}"
        print(
            f"{r.case:12s} {r.px:5d} {r.batch:5d} {r.impl:10s} "
            f"{'on' if r.compiled else 'off':8s} {fmt(r.images_per_s, '10.1f')} "
            f"{fmt(r.ms, '9.2f')} {fmt(r.mfu, '6.1f', 100, '%'):>7s} "
            f"{fmt(r.peak_mem_gb, '7.1f')} {fmt(ratio, '14.2f', suffix='x'):>15s}{status}"
        )


def best_ours(results: list[Result], case: str) -> Result | None:
    """Our fastest successful result for a case (eager or compiled)."""
    hits = [r for r in results if (r.case, r.impl, r.status) == (case, "ours", "ok")]
    return max(hits, key=lambda r: r.images_per_s) if hits else None


def label(r: Result) -> str:
    """'compiled' or 'eager'."""
    return "compiled" if r.compiled else "eager"


def targets(results: list[Result]) -> list[dict[str, Any]]:
    """The issue's H100 targets: MFU at 256 px, speed-up over diffusers eager, 1024 px latency."""
    out = []
    ours = best_ours(results, "train256")
    if ours is not None and ours.mfu is not None:
        out.append(
            target(
                f"train256 MFU >= 45% (ours {label(ours)})",
                ours.mfu,
                ours.mfu >= TARGET_MFU_256,
                f"{ours.mfu:.1%}",
            )
        )
    for case in ("train256", "train512"):
        ours, eager = best_ours(results, case), find(results, case, "diffusers", False)
        if ours is not None and eager is not None:
            ratio = ours.images_per_s / eager.images_per_s
            out.append(
                target(
                    f"{case} ours ({label(ours)}) >= 1.3x diffusers eager images/s",
                    ratio,
                    ratio >= TARGET_EAGER_RATIO,
                    f"{ratio:.2f}x",
                )
            )
    fwd = find(results, "fwd1024_b1", "ours", True)
    if fwd is not None:
        out.append(
            target(
                "fwd1024 batch-1 forward <= 15 ms (ours compiled)",
                fwd.ms,
                fwd.ms <= TARGET_FWD1024_MS,
                f"{fwd.ms:.2f} ms",
            )
        )
    return out


def target(name: str, value: float, met: bool, shown: str) -> dict[str, Any]:
    """One target-check record."""
    return {"target": name, "value": value, "met": met, "shown": shown}


def print_targets(checks: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Target lines marked met / not met (only meaningful for XL/2 bf16 on an H100)."""
    if args.device.type != "cuda" or args.preset != "xl2":
        print(
            f"targets apply to the XL/2 preset in bf16 on an H100 GPU; not checked on this "
            f"run ({args.preset}, {args.device.type})."
        )
        return
    print("targets (H100, XL/2, bf16):")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'NOT MET':7s}] {c['target']}: {c['shown']}")
    if not checks:
        print("  none measured (need train256/train512/fwd1024 with compile and a peak for MFU)")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Device, versions and settings recorded with the results."""
    import diffusers

    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "preset": args.preset,
        "params": sum(p.numel() for p in args.dit.parameters()),
        "dtype": args.dtype,
        "text_len": args.text_len,
        "peak_tflops": args.peak_tflops,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile_mode": args.compile_mode,
        "compile_scope": args.compile_scope,
        "grad_checkpointing": args.grad_checkpointing,
    }


def int_list(n: int) -> Callable[[str], list[int]]:
    """argparse type: a comma-separated list of exactly ``n`` ints (n=0: any length)."""

    def parse(text: str) -> list[int]:
        """'1,2,3' -> [1, 2, 3]."""
        values = [int(v) for v in text.split(",") if v]
        if n and len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated integers: {text!r}")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["xl2", "tiny"], default="xl2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs",
    )
    p.add_argument(
        "--compile-scope",
        choices=["model", "blocks"],
        default="model",
        help="compile the whole network or each transformer block (faster compile)",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=["train256", "train512", "fwd1024"],
        default=["train256", "train512", "fwd1024"],
    )
    p.add_argument(
        "--resolutions",
        type=int_list(3),
        default=[256, 512, 1024],
        help="pixel sizes of train256,train512,fwd1024 (override for smoke runs)",
    )
    p.add_argument("--train-batches", type=int_list(2), default=[64, 32])
    p.add_argument("--fwd-batches", type=int_list(0), default=[1, 2])
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation included)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: detected for H100/H200 in bf16)",
    )
    p.add_argument("--text-len", type=int, default=300, help="text tokens (PixArt-Σ T5: 300)")
    p.add_argument("--grad-checkpointing", action="store_true", help="in both implementations")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 avoids stalls on a busy shared CPU)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.device = torch.device(args.device)
    args.torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.peak_tflops = args.peak_tflops or detect_peak_tflops(args.device, args.torch_dtype)
    return args


def build_masters(args: argparse.Namespace) -> dict[str, nn.Module]:
    """CPU masters of both implementations with identical weights."""
    args.dit = build_dit(args.preset, args.grad_checkpointing)
    theirs = to_diffusers(args.dit)
    if args.grad_checkpointing:
        theirs.enable_gradient_checkpointing()
    return {"ours": args.dit, "diffusers": theirs}


@contextlib.contextmanager
def torch_settings(device: torch.device, threads: int | None) -> Iterator[None]:
    """TF32 for the few fp32 matmuls on CUDA (both implementations alike); CPU thread count."""
    old = torch.get_float32_matmul_precision(), torch.get_num_threads()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.set_num_threads(old[1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and target checks; return (and maybe save) results."""
    args = parse_args(argv)
    masters = build_masters(args)
    env = environment(args)
    print(
        f"{env['device']}: torch {env['torch']}, diffusers {env['diffusers']}, "
        f"{args.preset} ({env['params'] / 1e6:.1f}M params), {args.dtype}, text {args.text_len}, "
        f"peak {fmt(args.peak_tflops, '.0f')} TFLOPS",
        flush=True,
    )
    with torch_settings(args.device, args.cpu_threads):
        results = run_all(args, masters)
    ratio_rows = ratios(results)
    checks = targets(results)
    print_table(results, ratio_rows)
    print_targets(checks, args)
    report = {
        "env": env,
        "results": [asdict(r) for r in results],
        "ratios": ratio_rows,
        "targets": checks,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
