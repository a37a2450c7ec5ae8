"""`make demo`: the pipeline on the shapes world, each stage reused when already finished.

Stages write under the profile's run folder (``runs/demo/`` for the 2-core CPU demo,
``runs/shapes128/`` for ``FEWSTEP_DEMO_PROFILE=gpu``, the GPU-sized recipe); a rerun reuses
finished stages (their recorded figures) and resumes an interrupted training stage from its
``last.ckpt``. ``FEWSTEP_DEMO_STAGES=shapes,vae`` runs (again) just those stages.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from fewstep.utils.atomic import write_text_atomic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Profile:
    """A demo profile: its run folder, image size and configs (``<name><suffix>.yaml``)."""

    run_dir: Path
    resolution: int
    suffix: str = ""

    def config(self, name: str) -> Path:
        """``configs/<name><suffix>.yaml``, e.g. ``configs/vae/shapes_gpu.yaml`` for gpu."""
        return CONFIGS / f"{name}{self.suffix}.yaml"

    def configs(self, name: str) -> list[Path]:
        """The ``-c`` chain of stage ``name``: ``config(name)``, preceded by the base
        ``configs/<name>.yaml`` when that file is an overlay (it names no model class)."""
        path = self.config(name)
        raw = yaml.safe_load(path.read_text()) or {}
        model = raw.get("model")
        overlay = isinstance(model, dict) and "class_path" not in model
        return [CONFIGS / f"{name}.yaml", path] if overlay and self.suffix else [path]

    @property
    def results(self) -> Path:
        """The figures of finished stages."""
        return self.run_dir / "results.json"


PROFILES = {  # FEWSTEP_DEMO_PROFILE picks one (default: cpu, the 15-minute demo)
    "cpu": Profile(Path("runs/demo"), resolution=64),
    "gpu": Profile(Path("runs/shapes128"), resolution=128, suffix="_gpu"),
}


def active_profile() -> Profile:
    """The profile named by ``FEWSTEP_DEMO_PROFILE`` (default ``cpu``)."""
    name = os.environ.get("FEWSTEP_DEMO_PROFILE", "cpu")
    if name not in PROFILES:
        raise SystemExit(f"FEWSTEP_DEMO_PROFILE={name!r}: choose one of {sorted(PROFILES)}")
    return PROFILES[name]


def _cli(args: list[str]) -> Any:
    """Run ``fewstep <args>`` in this process and return the LightningCLI object."""
    from fewstep.cli import run

    return run(args)


def _last_checkpoint(log_dir: Path) -> list[str]:
    """``--ckpt_path`` arguments resuming from ``log_dir/checkpoints/last.ckpt`` if present."""
    last = log_dir / "checkpoints" / "last.ckpt"
    return ["--ckpt_path", str(last)] if last.is_file() else []


def _config_args(configs: Path | list[Path]) -> list[str]:
    """``-c`` arguments for one config or a base + overlay chain."""
    chain = configs if isinstance(configs, list) else [configs]
    return [arg for path in chain for arg in ("-c", str(path))]


def _fit_once(config: Path | list[Path], log_dir: Path) -> dict[str, float]:
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
    _cli(["fit", *_config_args(config), *no_val, *_last_checkpoint(log_dir)])
    done.write_text(json.dumps({"fit_seconds": round(time.time() - start, 1)}) + "\n")
    return {}


def _validate_metrics(config: Path | list[Path], log_dir: Path) -> dict[str, float]:
    """``fewstep validate`` of ``log_dir``'s last checkpoint; the logged metrics."""
    last = log_dir / "checkpoints" / "last.ckpt"
    cli = _cli(["validate", *_config_args(config), "--ckpt_path", str(last)])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _load_results() -> dict[str, Any]:
    """Figures of finished stages (so a rerun reports them without recomputing)."""
    path = active_profile().results
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_results(results: dict[str, Any]) -> None:
    """Write ``results.json`` atomically."""
    write_text_atomic(active_profile().results, json.dumps(results, indent=2))


def stage_shapes() -> dict[str, Any]:
    """Render a captioned grid of the shapes world and score ground-truth renders."""
    from fewstep.tools.shapes_preview import preview

    profile = active_profile()
    return preview(out=str(profile.run_dir / "shapes"), resolution=profile.resolution)


def stage_vae() -> dict[str, Any]:
    """Train the VAE (configs/vae/shapes.yaml; exports <run>/vae) and measure its semantic
    fidelity: scorer accuracy on reconstructions of held-out renders (issue bar >= 95%)."""
    from fewstep.data.shapes import ShapesWorld
    from fewstep.eval.reconstruction import reconstruction_geneval
    from fewstep.models.vae import VAE

    profile = active_profile()
    vae_dir = profile.run_dir / "vae"
    if not (vae_dir / "config.json").is_file():
        config = profile.config("vae/shapes")
        _cli(["fit", "-c", str(config), *_last_checkpoint(profile.run_dir / "vae_training")])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = VAE.from_pretrained(vae_dir).eval().to(device)
    held_out = ShapesWorld(size=600, resolution=profile.resolution, seed=123)
    return {"reconstruction_geneval": reconstruction_geneval(vae, held_out, num_samples=600)}


def stage_cache() -> dict[str, Any]:
    """Encode the shapes world with the demo VAE and the MiniLM text encoder (resumable)."""
    from fewstep.data.cache import read_manifest

    profile = active_profile()
    _cli(["cache", "-c", str(profile.config("cache/shapes"))])
    manifest = read_manifest(profile.run_dir / "cache")
    return {"samples": manifest["num_samples"], "shards": len(manifest["shards"])}


def stage_teacher() -> dict[str, Any]:
    """Train the teacher (configs/teacher/shapes.yaml), then validate it with the scorer."""
    profile = active_profile()
    config, log_dir = profile.config("teacher/shapes"), profile.run_dir / "teacher"
    reused = _fit_once(config, log_dir)
    return {"validate": _validate_metrics(config, log_dir), **reused}


STUDENTS = {  # FEWSTEP_DEMO_STUDENT picks the distillation method (default: ladd, the best)
    "lcm": ("student/lcm_shapes", "student_lcm"),
    "reflow": ("student/reflow_shapes", "student_reflow"),
    "ladd": ("student/ladd_shapes", "student_ladd"),
    "dmd2": ("student/dmd2_shapes", "student_dmd2"),
    "scm": ("student/scm_shapes", "student_scm"),
    "progressive": ("student/progressive_shapes", "student_progressive"),
    "guidance": ("student/guidance_shapes", "student_guidance"),
}
COUPLINGS = "student/reflow_couplings_shapes"  # the reflow student's teacher couplings


def student_method() -> str:
    """The distillation method named by ``FEWSTEP_DEMO_STUDENT`` (default ``ladd``)."""
    name = os.environ.get("FEWSTEP_DEMO_STUDENT", "ladd")
    if name not in STUDENTS:
        raise SystemExit(f"FEWSTEP_DEMO_STUDENT={name!r}: choose one of {sorted(STUDENTS)}")
    return name


def stage_student() -> dict[str, Any]:
    """Distill the teacher into a 1-4 step student, then evaluate it side by side with the
    teacher (same prompts and noise): scores, fidelity to the teacher, NFE, ms per image."""
    name = student_method()
    profile = active_profile()
    config_name, log_name = STUDENTS[name]
    config, log_dir = profile.configs(config_name), profile.run_dir / log_name
    if name == "reflow":
        _cli(["couplings", "-c", str(profile.config(COUPLINGS))])
    reused = _fit_once(config, log_dir)
    metrics = _validate_metrics(config, log_dir)
    return {"method": name, "log_dir": str(log_dir), "validate": metrics, **reused}


def stage_report() -> dict[str, Any]:
    """Write <run>/report.md: tables, teacher-vs-student grids, score-vs-NFE plot."""
    from fewstep.report import write_report

    run_dir = active_profile().run_dir
    results = _load_results()
    student = results.get("student", {}).get("log_dir")
    path = write_report(run_dir, results, Path(student) if student else None, run_dir / "teacher")
    return {"report": str(path)}


STAGES: dict[str, Callable[[], dict[str, Any]]] = {
    "shapes": stage_shapes,
    "vae": stage_vae,
    "cache": stage_cache,
    "teacher": stage_teacher,
    "student": stage_student,
    "report": stage_report,
}


def stage_output(name: str) -> Path | None:
    """The file whose presence shows that stage ``name`` finished (None: the stage always runs)."""
    outputs = {
        "shapes": "shapes/scores.json",
        "vae": "vae/config.json",
        "cache": "cache/manifest.json",
        "teacher": "teacher/FINISHED",
        "student": f"{STUDENTS[student_method()][1]}/FINISHED",
    }
    return active_profile().run_dir / outputs[name] if name in outputs else None


def reusable(name: str, results: dict[str, Any]) -> bool:
    """Whether a full run may reuse stage ``name``: its figures are recorded (for the student,
    those of the method asked for now) and its output is still there."""
    output = stage_output(name)
    if name not in results or output is None or not output.is_file():
        return False
    return name != "student" or results[name].get("method") == student_method()


def main() -> None:
    """Run the stages in order, printing what each did and wrote."""
    torch.set_float32_matmul_precision("high")
    profile = active_profile()
    profile.run_dir.mkdir(parents=True, exist_ok=True)
    chosen = os.environ.get("FEWSTEP_DEMO_STAGES", ",".join(STAGES)).split(",")
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise SystemExit(
            f"FEWSTEP_DEMO_STAGES: unknown stage(s) {unknown}; choose from {list(STAGES)}"
        )
    explicit = "FEWSTEP_DEMO_STAGES" in os.environ  # named stages always run again
    results = _load_results()
    start = time.time()
    ran = False  # once a stage runs, the stages after it (which read its output) run too
    for i, name in enumerate(chosen, 1):
        if not (explicit or ran) and reusable(name, results):
            print(
                f"\n=== [{i}/{len(chosen)}] {name}: finished before, figures reused "
                f"(FEWSTEP_DEMO_STAGES={name} runs it again)",
                flush=True,
            )
            continue
        summary = (STAGES[name].__doc__ or name).splitlines()[0]
        print(f"\n=== [{i}/{len(chosen)}] {name}: {summary}", flush=True)
        t0, ran = time.time(), True
        results[name] = {**STAGES[name](), "seconds": round(time.time() - t0, 1)}
        _save_results(results)
        print(json.dumps(results[name], indent=2), flush=True)
    print(f"\ndemo finished in {time.time() - start:.0f} s; figures in {profile.results}")


if __name__ == "__main__":
    main()
