"""Train the reference-teacher candidates (issue 12) on one lent GPU inside a fixed time budget.

    bash bench/gpu_reference_teacher.sh SECONDS     (on the machine; results go to $OUT)

1. builds the 200,000-sample cache (configs/cache/shapes_reference_gpu.yaml);
2. probes: every candidate trains ``--probe-steps`` steps at once (as in the real run) and
   validates once, which measures its steps/s, start-up and validation seconds;
3. trains every candidate at once for the steps that fit the time left, its WSD schedule, its
   validation and checkpoint intervals set to that length (the configs record the values);
4. writes summary.json (curves, steps, seconds), logs.tgz (TensorBoard, configs, logs) and the
   EMA weights of the best candidates, split in halves under the machine's file-size limit.
``--dry-run`` shrinks everything so the whole chain runs on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ROOT, base_config, scalar_curves, set_dotted  # noqa: E402

TEACHER = [
    "configs/teacher/shapes.yaml",
    "configs/teacher/shapes_reference.yaml",
    "configs/teacher/shapes_reference_gpu.yaml",
]
CACHE = [
    "configs/cache/shapes.yaml",
    "configs/cache/shapes_reference.yaml",
    "configs/cache/shapes_reference_gpu.yaml",
]
MMDIT = [  # R4: the size-matched MMDiT of the CPU runs (docs/reference_teacher.md, session 7)
    "configs/teacher/flux_shapes.yaml",
    "configs/teacher/shapes_reference.yaml",
    "configs/teacher/shapes_reference_flux.yaml",
]


def mmdit_patches() -> dict[str, Any]:
    """The GPU recipe with R4's FLUX.1-block network (the whole network mapping) and its pooled
    text vector (the mean MiniLM token): read from R4's YAMLs, not copied."""
    r4 = base_config(MMDIT)
    return {
        "model.init_args.network": r4["model"]["init_args"]["network"],
        "data.init_args.pooled_text": r4["data"]["init_args"]["pooled_text"],
    }


CANDIDATES: dict[str, dict[str, Any]] = {  # patches on TEACHER
    "gpu_ref": {},
    # the short convolution over neighbouring tokens (DiT.text_refiner_conv), the CPU's last fork
    "gpu_ref_conv": {"model.init_args.network.init_args.text_refiner_conv": 7},
    "gpu_norefiner": {"model.init_args.network.init_args.text_refiner_depth": 0},
    "gpu_mmdit": mmdit_patches(),
}
SCORE = "geneval/overall"


def patched(base: list[str], patches: dict[str, Any], path: Path) -> Path:
    """Write ``base`` (layered) with dotted-key ``patches`` to ``path``."""
    config = base_config(base)
    for key, value in patches.items():
        set_dotted(config, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fewstep(command: str, config: Path, log: Path, threads: int = 1) -> subprocess.Popen:
    """Start ``python -m fewstep.cli <command> -c <config>`` with its output in ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "fewstep.cli", command, "-c", str(config)]
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def schedule_patches(steps: int, warmup: int, vals: int, run_root: Path, name: str) -> dict:
    """Length-dependent settings: steps, schedule, validation/CFG-grid/checkpoint intervals."""
    every = max(1, steps // vals)
    return {
        "trainer.max_steps": steps,
        "trainer.val_check_interval": every,
        "trainer.logger.init_args.save_dir": str(run_root),
        "trainer.logger.init_args.name": name,
        "trainer.logger.init_args.version": "",
        "trainer.callbacks.1.init_args.every_n_steps": every,
        "trainer.callbacks.2.init_args.every_n_train_steps": every,
        "model.init_args.lr_scheduler.init_args.total_steps": steps,
        "model.init_args.lr_scheduler.init_args.warmup_steps": warmup,
    }


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int]:
    """Wait for every process; past ``deadline`` each gets SIGTERM (a fit then writes an exact
    last.ckpt), and SIGKILL 40 s later."""
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(2)
    for name, proc in procs.items():
        if proc.poll() is None:
            print(f"[driver] {name}: deadline, SIGTERM", flush=True)
            proc.send_signal(signal.SIGTERM)
    stop = time.time() + 40
    while any(p.poll() is None for p in procs.values()) and time.time() < stop:
        time.sleep(1)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    return {name: proc.wait() for name, proc in procs.items()}


def timing(folder: Path, started: float) -> dict[str, float]:
    """Steps/s (from the wall times of logged training scalars), seconds before the first step,
    and the seconds of the one validation at the probe's end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train: list[tuple[int, float]] = []
    val_wall = None
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points = [(e.step, e.wall_time) for e in acc.Scalars(tag)]
            if tag.startswith("lr-"):
                train = points
            if SCORE in tag and points:
                val_wall = points[-1][1]
    (s0, w0), (s1, w1) = train[1], train[-1]
    rate = (s1 - s0) / max(w1 - w0, 1e-6)
    return {
        "steps_per_s": rate,
        "startup_s": max(0.0, w0 - started - s0 / rate),
        "val_s": max(0.0, (val_wall or w1) - w1),
    }


def run_probe(args: argparse.Namespace, work: Path, names: list[str]) -> dict[str, dict]:
    """Every candidate at once for ``probe_steps`` steps and one validation: their timings."""
    procs, started = {}, time.time()
    for name in names:
        patches = {
            **CANDIDATES[name],
            **schedule_patches(args.probe_steps, 10, 1, work / "probe", name),
            "trainer.log_every_n_steps": 10,
            **args.extra,
        }
        config = patched(TEACHER, patches, work / "probe" / f"{name}.yaml")
        procs[name] = fewstep("fit", config, work / "probe" / f"{name}.log")
    codes = wait_all(procs, started + args.budget)
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        raise SystemExit(f"[driver] probe failed: {bad}; see {work}/probe/*.log")
    return {n: timing(work / "probe" / n, started) for n in names}


def steps_for(t: dict[str, float], seconds: float, vals: int, multiple: int) -> int:
    """The training steps (a multiple of ``multiple``) that fit ``seconds`` with ``vals``
    validations, at 90 % of the probe's rate."""
    train_s = seconds - t["startup_s"] - vals * t["val_s"]
    return max(multiple, int(0.9 * t["steps_per_s"] * train_s) // multiple * multiple)


def export_ema(name: str, run: Path, out: Path) -> list[str]:
    """The run's last checkpoint with its EMA average in place, as two halves of its state
    dict (``<name>_ema_0.pt``, ``_1.pt``), each under the machine's 16 MiB file limit."""
    import torch

    from fewstep.lightning.checkpoints import load_trained

    module, ckpt, kind = load_trained(run / "config.yaml", run / "checkpoints" / "last.ckpt")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    files = []
    for i, part in enumerate((keys[:half], keys[half:])):
        path = out / f"{name}_ema_{i}.pt"
        meta = {"global_step": ckpt.get("global_step"), "weights": kind}
        torch.save({"state_dict": {k: state[k] for k in part}, "meta": meta}, path)
        files.append(path.name)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=540, help="seconds for everything")
    parser.add_argument("--cache-size", type=int, default=200_000)
    parser.add_argument("--probe-steps", type=int, default=200)
    parser.add_argument("--vals", type=int, default=3, help="validations in the main run")
    parser.add_argument("--keep", type=int, default=2, help="candidates whose weights return")
    parser.add_argument("--only", default=",".join(CANDIDATES))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "reference" / "gpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/out")))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, for a CPU check")
    args = parser.parse_args(argv)
    start = time.time()
    names = args.only.split(",")
    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    args.size = size = 600 if args.dry_run else args.cache_size
    args.extra = {
        "data.init_args.path": str(cache_dir),
        "data.init_args.val_fraction": min(0.1, 512 / size),  # 512 held-out samples
    }
    if args.dry_run:
        args.extra.update(
            {
                "data.init_args.batch_size": 16,
                "model.init_args.val_num_samples": 16,
                "data.init_args.num_workers": 1,
                "trainer.limit_val_batches": 1,
                "trainer.log_every_n_steps": 5,
            }
        )
    summary: dict[str, Any] = {"budget_s": args.budget, "candidates": CANDIDATES}
    try:
        run_all(args, names, work, out, cache_dir, start, summary)
    finally:
        summary["total_s"] = round(time.time() - start, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        with tarfile.open(out / "logs.tgz", "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if path.is_file() and path.suffix not in {".ckpt", ".npy", ".pt"}:
                    if "cache" not in path.relative_to(work).parts[:1]:
                        tar.add(path, arcname=str(path.relative_to(work)))
        print(json.dumps(summary, indent=1)[-6000:], flush=True)


def run_all(args, names, work, out, cache_dir, start, summary) -> None:  # noqa: ANN001
    """Cache, probe, main runs, export (see the module docstring)."""
    size = args.size
    patches = {"dataset.init_args.size": size, "out": str(cache_dir)}
    if os.environ.get("FEWSTEP_TEXT_ENCODER"):
        patches["text_encoder.init_args.path"] = os.environ["FEWSTEP_TEXT_ENCODER"]
    if os.environ.get("FEWSTEP_VAE"):
        patches["vae.init_args.pretrained_path"] = os.environ["FEWSTEP_VAE"]
        args.extra["model.init_args.vae_path"] = os.environ["FEWSTEP_VAE"]
    config = patched(CACHE, patches, work / "cache.yaml")
    code = fewstep("cache", config, work / "cache.log", threads=4).wait()
    summary["cache_s"] = round(time.time() - start, 1)
    print(f"[driver] cache of {size}: exit {code} after {summary['cache_s']} s", flush=True)
    if code != 0:
        raise SystemExit(f"[driver] cache failed; see {work}/cache.log")
    probe = run_probe(args, work, names)
    summary["probe"] = probe
    summary["probe_end_s"] = round(time.time() - start, 1)
    print(f"[driver] probe: {json.dumps(probe)}", flush=True)
    left = args.budget - (time.time() - start) - 45  # export and packing
    multiple = 3 * args.vals if args.dry_run else 100 * args.vals
    steps = {n: steps_for(probe[n], left, args.vals, multiple) for n in names}
    summary["steps"] = steps
    print(f"[driver] main run steps: {steps} in {left:.0f} s", flush=True)
    procs = {}
    for name in names:
        warmup = min(300, steps[name] // 10)
        patches = {
            **CANDIDATES[name],
            **schedule_patches(steps[name], warmup, args.vals, work / "runs", name),
            **args.extra,
        }
        config = patched(TEACHER, patches, work / "runs" / f"{name}.yaml")
        procs[name] = fewstep("fit", config, work / "runs" / f"{name}.log")
    codes = wait_all(procs, start + args.budget - 45)
    summary["exit"] = codes
    summary["main_end_s"] = round(time.time() - start, 1)
    curves = {n: scalar_curves(work / "runs" / n, (SCORE, "val/", "geneval/")) for n in names}
    summary["curves"] = curves
    finals = {n: _final(curves[n]) for n in names}
    summary["final_score"] = finals
    best = sorted(names, key=lambda n: finals[n] if finals[n] is not None else -1, reverse=True)
    summary["exported"] = {}
    for name in best[: args.keep]:
        try:
            summary["exported"][name] = export_ema(name, work / "runs" / name, out)
        except Exception as err:  # report, and still pack the logs
            summary["exported"][name] = f"failed: {err!r}"


def _final(curves: dict[str, list[list[float]]]) -> float | None:
    """The last logged overall score (the main validation tag)."""
    tags = [t for t in curves if t.endswith(SCORE)]
    return curves[min(tags, key=len)][-1][1] if tags else None


if __name__ == "__main__":
    main()
