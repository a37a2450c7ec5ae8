"""`make demo`: the pipeline on the shapes world, each stage reused when already finished.

Stages write under ``runs/demo/``; a rerun skips finished stages and resumes an interrupted
training stage from its ``last.ckpt``. ``FEWSTEP_DEMO_STAGES=shapes,vae`` runs a subset.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RUN_DIR = Path("runs/demo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VAE_DIR = RUN_DIR / "vae"
CACHE_DIR = RUN_DIR / "cache"
RESULTS = RUN_DIR / "results.json"


def _cli(args: list[str]) -> Any:
    """Run ``fewstep <args>`` in this process and return the LightningCLI object."""
    from fewstep.cli import main

    return main(args)


def _last_checkpoint(log_dir: Path) -> list[str]:
    """``--ckpt_path`` arguments resuming from ``log_dir/checkpoints/last.ckpt`` if present."""
    last = log_dir / "checkpoints" / "last.ckpt"
    return ["--ckpt_path", str(last)] if last.is_file() else []


def _fit_once(config: Path, log_dir: Path) -> dict[str, float]:
    """``fewstep fit`` unless ``log_dir/FINISHED`` says it finished; resumes from last.ckpt.
    Validation is left to ``_validate_metrics`` (run once, after the fit). Returns
    ``{"reused_fit_seconds": s}`` when an earlier fit was reused (its time, if recorded)."""
    done = log_dir / "FINISHED"
    if done.is_file():
        try:
            return {"reused_fit_seconds": float(json.loads(done.read_text())["fit_seconds"])}
        except (ValueError, KeyError, TypeError):
            return {"reused_fit_seconds": 0.0}  # finished by an older fewstep: time unknown
    start = time.time()
    no_val = ["--trainer.limit_val_batches", "0"]
    _cli(["fit", "-c", str(config), *no_val, *_last_checkpoint(log_dir)])
    done.write_text(json.dumps({"fit_seconds": round(time.time() - start, 1)}) + "\n")
    return {}


def _validate_metrics(config: Path, log_dir: Path) -> dict[str, float]:
    """``fewstep validate`` of ``log_dir``'s last checkpoint; the logged metrics."""
    last = log_dir / "checkpoints" / "last.ckpt"
    cli = _cli(["validate", "-c", str(config), "--ckpt_path", str(last)])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _load_results() -> dict[str, Any]:
    """Figures of finished stages (so a rerun reports them without recomputing)."""
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _save_results(results: dict[str, Any]) -> None:
    """Write ``results.json`` atomically."""
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(RESULTS)


def stage_shapes() -> dict[str, Any]:
    """Render a captioned grid of the shapes world and score ground-truth renders."""
    from fewstep.tools.shapes_preview import preview

    return preview(out=str(RUN_DIR / "shapes"), resolution=64)


def stage_vae() -> dict[str, Any]:
    """Train the VAE (configs/vae/shapes.yaml; exports runs/demo/vae) and measure its semantic
    fidelity: scorer accuracy on reconstructions of held-out renders (issue bar >= 95%)."""
    from fewstep.data.shapes import ShapesWorld
    from fewstep.eval.reconstruction import reconstruction_geneval
    from fewstep.models.vae import VAE

    if not (VAE_DIR / "config.json").is_file():
        config = CONFIGS / "vae/shapes.yaml"
        _cli(["fit", "-c", str(config), *_last_checkpoint(RUN_DIR / "vae_training")])
    vae = VAE.from_pretrained(VAE_DIR).eval()
    held_out = ShapesWorld(size=600, resolution=64, seed=123)
    return {"reconstruction_geneval": reconstruction_geneval(vae, held_out, num_samples=600)}


def stage_cache() -> dict[str, Any]:
    """Encode the shapes world with the demo VAE and the MiniLM text encoder (resumable)."""
    from fewstep.data.cache import read_manifest

    _cli(["cache", "-c", str(CONFIGS / "cache/shapes.yaml")])
    manifest = read_manifest(CACHE_DIR)
    return {"samples": manifest["num_samples"], "shards": len(manifest["shards"])}


def stage_teacher() -> dict[str, Any]:
    """Train the CPU teacher (configs/teacher/shapes.yaml), then validate it with the scorer."""
    config, log_dir = CONFIGS / "teacher/shapes.yaml", RUN_DIR / "teacher"
    reused = _fit_once(config, log_dir)
    return {"validate": _validate_metrics(config, log_dir), **reused}


STUDENTS = {  # FEWSTEP_DEMO_STUDENT picks the distillation method (default: ladd, the best)
    "lcm": ("student/lcm_shapes.yaml", "student_lcm"),
    "reflow": ("student/reflow_shapes.yaml", "student_reflow"),
    "ladd": ("student/ladd_shapes.yaml", "student_ladd"),
}


def stage_student() -> dict[str, Any]:
    """Distill the teacher into a 1-4 step student, then evaluate it side by side with the
    teacher (same prompts and noise): scores, fidelity to the teacher, NFE, ms per image."""
    name = os.environ.get("FEWSTEP_DEMO_STUDENT", "ladd")
    if name not in STUDENTS:
        raise SystemExit(f"FEWSTEP_DEMO_STUDENT={name!r}: choose one of {sorted(STUDENTS)}")
    relative, log_name = STUDENTS[name]
    config, log_dir = CONFIGS / relative, RUN_DIR / log_name
    if name == "reflow":
        _cli(["couplings", "-c", str(CONFIGS / "student/reflow_couplings_shapes.yaml")])
    reused = _fit_once(config, log_dir)
    metrics = _validate_metrics(config, log_dir)
    return {"method": name, "log_dir": str(log_dir), "validate": metrics, **reused}


def stage_report() -> dict[str, Any]:
    """Write runs/demo/report.md: tables, teacher-vs-student grids, score-vs-NFE plot."""
    from fewstep.eval.report import write_report

    results = _load_results()
    student = results.get("student", {}).get("log_dir")
    path = write_report(RUN_DIR, results, Path(student) if student else None, RUN_DIR / "teacher")
    return {"report": str(path)}


STAGES: dict[str, Callable[[], dict[str, Any]]] = {
    "shapes": stage_shapes,
    "vae": stage_vae,
    "cache": stage_cache,
    "teacher": stage_teacher,
    "student": stage_student,
    "report": stage_report,
}


def main() -> None:
    """Run the stages in order, printing what each did and wrote."""
    torch.set_float32_matmul_precision("high")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    chosen = os.environ.get("FEWSTEP_DEMO_STAGES", ",".join(STAGES)).split(",")
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise SystemExit(
            f"FEWSTEP_DEMO_STAGES: unknown stage(s) {unknown}; choose from {list(STAGES)}"
        )
    results = _load_results()
    start = time.time()
    for i, name in enumerate(chosen, 1):
        summary = (STAGES[name].__doc__ or name).splitlines()[0]
        print(f"\n=== [{i}/{len(chosen)}] {name}: {summary}", flush=True)
        t0 = time.time()
        results[name] = {**STAGES[name](), "seconds": round(time.time() - t0, 1)}
        _save_results(results)
        print(json.dumps(results[name], indent=2), flush=True)
    print(f"\ndemo finished in {time.time() - start:.0f} s; figures in {RESULTS}")


if __name__ == "__main__":
    main()
