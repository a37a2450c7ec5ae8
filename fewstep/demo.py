"""`make demo`: the pipeline on the shapes world, each stage reused when already finished.

Stages write under the profile's run folder (``runs/demo/`` for the 2-core CPU demo,
``runs/shapes128/`` for ``FEWSTEP_DEMO_PROFILE=gpu``, the GPU-sized recipe); a rerun reuses
finished stages (their recorded figures) and resumes an interrupted training stage from its
``last.ckpt``. ``FEWSTEP_DEMO_STAGES=shapes,vae`` runs (again) just those stages.

``FEWSTEP_DEMO_STUDENT`` names the distillation method(s): one (default ``ladd``), a comma list
(``lcm,ladd,dmd2``) or ``all``; each is distilled and validated in turn from the same teacher on
the same prompts and noise, each reused once finished, and the report compares them.
``FEWSTEP_DEMO_DATA=<image–caption folder>`` (ImageCaptionFolder format) runs the chain on
that folder instead of the shapes world; without shapes specs the report shows distribution
measures only. ``FEWSTEP_DEMO_TEACHER=<shipped folder>`` (written by ``fewstep ship``;
checked against its sha256 manifest) distils that teacher instead of training one: the cache
is encoded with its VAE, the teacher stage only validates it, and every student loads it.
``train`` (the default, ``DEFAULT_TEACHER``) trains the VAE and teacher from scratch.
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
from fewstep.utils.manifest import MANIFEST, ShippedModelError, sha256_file, verify_shipped

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = "train"  # FEWSTEP_DEMO_TEACHER value: train the VAE and the teacher from scratch
DEFAULT_TEACHER = TRAIN  # the shipped reference, once committed: str(ASSETS / "<its folder>")
SHIPPED_TEACHER_YAML = "teacher.yaml"  # fewstep.tools.ship.TEACHER_YAML
IMAGE_FOLDER = "fewstep.data.image_folder.ImageCaptionFolder"  # FEWSTEP_DEMO_DATA's format


@dataclass(frozen=True)
class Profile:
    """A demo profile: its run folder, image size and configs (``<name><suffix>.yaml``)."""

    run_dir: Path
    resolution: int
    suffix: str = ""
    configs_dir: Path = CONFIGS

    def config(self, name: str) -> Path:
        """``configs/<name><suffix>.yaml``, e.g. ``configs/vae/shapes_gpu.yaml`` for gpu."""
        return self.configs_dir / f"{name}{self.suffix}.yaml"

    def configs(self, name: str) -> list[Path]:
        """The ``-c`` chain of stage ``name``: ``config(name)``, preceded by the base
        ``configs/<name>.yaml`` when that file is an overlay (it names no model class)."""
        path = self.config(name)
        raw = yaml.safe_load(path.read_text()) or {}
        model = raw.get("model")
        overlay = isinstance(model, dict) and "class_path" not in model
        return [self.configs_dir / f"{name}.yaml", path] if overlay and self.suffix else [path]

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


def _fit(args: list[str]) -> None:
    """``fewstep fit <args>`` in this process; a fit stopped by SIGINT/SIGTERM (its exact
    ``last.ckpt`` written) ends the demo with 128 + the signal instead of counting as finished,
    so a rerun resumes it rather than evaluating a half-trained model."""
    from fewstep.lightning.interrupt import exit_status

    status = exit_status(getattr(_cli(["fit", *args]), "trainer", None))
    if status:
        print(f"fit interrupted (exit {status}); rerun the demo to resume from last.ckpt")
        raise SystemExit(status)


def _last_checkpoint(log_dir: Path) -> list[str]:
    """``--ckpt_path`` arguments resuming from ``log_dir/checkpoints/last.ckpt`` if present."""
    last = log_dir / "checkpoints" / "last.ckpt"
    return ["--ckpt_path", str(last)] if last.is_file() else []


def _config_args(configs: Path | list[Path]) -> list[str]:
    """``-c`` arguments for one config or a base + overlay chain."""
    chain = configs if isinstance(configs, list) else [configs]
    return [arg for path in chain for arg in ("-c", str(path))]


def _fit_once(
    config: Path | list[Path], log_dir: Path, extra: list[str] | None = None
) -> dict[str, float]:
    """``fewstep fit`` (+ ``extra`` overrides) unless ``log_dir/FINISHED`` says it finished;
    resumes from last.ckpt. Validation is left to ``_validate_metrics`` (run once, after the
    fit). Returns ``{"reused_fit_seconds": s}`` when an earlier fit was reused (its time, if
    recorded)."""
    done = log_dir / "FINISHED"
    if done.is_file():
        return {"reused_fit_seconds": _fit_seconds(log_dir)}
    start = time.time()
    no_val = ["--trainer.limit_val_batches", "0"]
    _fit([*_config_args(config), *(extra or []), *no_val, *_last_checkpoint(log_dir)])
    log_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"fit_seconds": round(time.time() - start, 1)}) + "\n")
    return {}


def _fit_seconds(log_dir: Path) -> float:
    """The fit time ``log_dir/FINISHED`` records (0 when finished by an older fewstep)."""
    try:
        return float(json.loads((log_dir / "FINISHED").read_text())["fit_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _validate_metrics(
    config: Path | list[Path], log_dir: Path | None, extra: list[str] | None = None
) -> dict[str, float]:
    """``fewstep validate`` (+ ``extra`` overrides) of ``log_dir``'s last checkpoint (None: the
    model as the config builds it, e.g. a shipped teacher); the logged metrics."""
    ckpt = ["--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")] if log_dir else []
    cli = _cli(["validate", *_config_args(config), *(extra or []), *ckpt])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _load_results() -> dict[str, Any]:
    """Figures of finished stages (so a rerun reports them without recomputing)."""
    path = active_profile().results
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_results(results: dict[str, Any]) -> None:
    """Write ``results.json`` atomically."""
    write_text_atomic(active_profile().results, json.dumps(results, indent=2))


# --- the teacher: trained here, or shipped ------------------------------------------------------


def shipped_teacher() -> Path | None:
    """The shipped teacher folder named by ``FEWSTEP_DEMO_TEACHER`` (None: ``train``)."""
    raw = os.environ.get("FEWSTEP_DEMO_TEACHER", DEFAULT_TEACHER)
    return None if raw == TRAIN else Path(raw)


def check_shipped(folder: Path) -> dict[str, Any]:
    """The manifest of shipped teacher ``folder`` after checking every file's sha256; one clear
    error (naming the file) when it is not a shipped teacher or a file changed."""
    env = f"FEWSTEP_DEMO_TEACHER={folder}"
    if not (folder / MANIFEST).is_file() or not (folder / SHIPPED_TEACHER_YAML).is_file():
        raise SystemExit(
            f"{env}: not a shipped teacher (no {MANIFEST} and {SHIPPED_TEACHER_YAML}); make one "
            f"with `fewstep ship`, or set FEWSTEP_DEMO_TEACHER={TRAIN} to train one"
        )
    try:
        manifest = verify_shipped(folder)
    except ShippedModelError as err:
        raise SystemExit(f"{env}: {err}") from None
    if manifest is None:
        raise SystemExit(f"{env}: {folder / MANIFEST} is not a fewstep shipped-model manifest")
    return manifest


def teacher_source() -> str:
    """What the demo distils, as recorded in results.json: ``train`` or ``shipped:<folder>
    sha256:<manifest's sha256>`` (a changed teacher is another demo)."""
    folder = shipped_teacher()
    if folder is None:
        return TRAIN
    return f"shipped:{folder.resolve()} sha256:{sha256_file(folder / MANIFEST)[:16]}"


def _teacher_overrides() -> list[str]:
    """Student overrides loading the shipped teacher (none when it is trained here), with the
    pooled text vector it was trained on (an MMDiT's: its teacher.yaml's data section)."""
    from fewstep.tools.couplings import data_args

    folder = shipped_teacher()
    if folder is None:
        return []
    pooled = data_args(str(folder / SHIPPED_TEACHER_YAML)).get("pooled_text")
    return [
        f"--model.init_args.teacher_config={folder / SHIPPED_TEACHER_YAML}",
        "--model.init_args.teacher_ckpt=null",
        f"--model.init_args.vae_path={folder / 'vae'}",
        *([f"--data.init_args.pooled_text={pooled}"] if pooled else []),
    ]


def _teacher_key() -> str:
    """Identifies the teacher students are distilled from (their reused figures must match)."""
    folder = shipped_teacher()
    if folder is not None:
        return teacher_source()
    ckpt = active_profile().run_dir / "teacher" / "checkpoints" / "last.ckpt"
    stat = ckpt.stat() if ckpt.is_file() else None
    return f"{TRAIN}:{stat.st_size}:{stat.st_mtime_ns}" if stat else TRAIN


def data_folder() -> Path | None:
    """The image–caption folder named by ``FEWSTEP_DEMO_DATA`` (None: the shapes world)."""
    raw = os.environ.get("FEWSTEP_DEMO_DATA", "")
    return Path(raw) if raw else None


def _folder_dataset(folder: Path) -> str:
    """The ImageCaptionFolder of ``folder`` at the profile's resolution, as a CLI value."""
    init = {"root": str(folder), "resolution": active_profile().resolution}
    return json.dumps({"class_path": IMAGE_FOLDER, "init_args": init})


# --- stages --------------------------------------------------------------------------------------


def stage_shapes() -> dict[str, Any]:
    """Render a captioned grid of the shapes world and score ground-truth renders (with
    FEWSTEP_DEMO_DATA: count the folder's images instead)."""
    from fewstep.data.image_folder import ImageCaptionFolder
    from fewstep.tools.shapes_preview import preview

    profile = active_profile()
    if (folder := data_folder()) is not None:
        return {"data": str(folder), "images": len(ImageCaptionFolder(folder))}
    return preview(out=str(profile.run_dir / "shapes"), resolution=profile.resolution)


def _vae_dir() -> Path:
    """The VAE of the demo: the shipped teacher's, or the one trained under the run folder."""
    folder = shipped_teacher()
    return folder / "vae" if folder is not None else active_profile().run_dir / "vae"


def stage_vae() -> dict[str, Any]:
    """Train the VAE (configs/vae/shapes.yaml; exports <run>/vae), or take the shipped teacher's,
    and measure its semantic fidelity: scorer accuracy on reconstructions of held-out renders
    (issue bar >= 95%)."""
    from fewstep.data.shapes import ShapesWorld
    from fewstep.eval.reconstruction import reconstruction_geneval
    from fewstep.models.vae import VAE

    profile = active_profile()
    vae_dir = _vae_dir()
    folder = data_folder()
    if not (vae_dir / "config.json").is_file():
        config = profile.config("vae/shapes")
        data = []
        if folder is not None:  # train and check on the user's images
            data = [
                f"--data.init_args.{split}={_folder_dataset(folder)}" for split in ("train", "val")
            ]
        _fit(["-c", str(config), *data, *_last_checkpoint(profile.run_dir / "vae_training")])
    if folder is not None:  # the reconstruction score needs shapes-world specs
        return {"data": str(folder), "vae": str(vae_dir)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = VAE.from_pretrained(vae_dir).eval().to(device)
    held_out = ShapesWorld(size=600, resolution=profile.resolution, seed=123)
    shipped = {"shipped": str(vae_dir)} if shipped_teacher() is not None else {}
    return {
        "reconstruction_geneval": reconstruction_geneval(vae, held_out, num_samples=600),
        **shipped,
    }


def stage_cache() -> dict[str, Any]:
    """Encode the shapes world with the demo VAE and the MiniLM text encoder (resumable)."""
    from fewstep.data.cache import read_manifest

    profile = active_profile()
    vae = ["--vae.init_args.pretrained_path", str(_vae_dir())] if shipped_teacher() else []
    folder = data_folder()
    data = ["--dataset", _folder_dataset(folder)] if folder is not None else []
    _cli(["cache", "-c", str(profile.config("cache/shapes")), *vae, *data])
    manifest = read_manifest(profile.run_dir / "cache")
    return {"samples": manifest["num_samples"], "shards": len(manifest["shards"])}


SHIPPED_FIGURES = ("score", "global_step", "train_seconds", "steps", "seconds")


def stage_teacher() -> dict[str, Any]:
    """Train the teacher (configs/teacher/shapes.yaml), or take the shipped one, then validate
    it with the scorer."""
    profile = active_profile()
    configs, log_dir = profile.configs("teacher/shapes"), profile.run_dir / "teacher"
    folder = shipped_teacher()
    if folder is None:
        reused = _fit_once(configs, log_dir)
        metrics = _validate_metrics(configs, log_dir)
        return {"validate": metrics, "fit_seconds": _fit_seconds(log_dir), **reused}
    manifest = check_shipped(folder)
    root = folder.resolve()  # teacher.yaml's paths are relative to it: the CLI gets them whole
    where = [f"--model.init_args.network.init_args.path={root}"]
    where.append(f"--model.init_args.vae_path={root / 'vae'}")
    metrics = _validate_metrics([*configs, folder / SHIPPED_TEACHER_YAML], None, where)
    log_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(log_dir / "SHIPPED", teacher_source() + "\n")
    figures = {k: manifest[k] for k in SHIPPED_FIGURES if k in manifest}
    fit = {"fit_seconds": manifest["train_seconds"]} if "train_seconds" in manifest else {}
    return {"validate": metrics, "shipped": str(folder), "manifest": figures, **fit}


STUDENTS = {  # FEWSTEP_DEMO_STUDENT picks the distillation method(s) (default: ladd, the best)
    "lcm": ("student/lcm_shapes", "student_lcm"),
    "reflow": ("student/reflow_shapes", "student_reflow"),
    "ladd": ("student/ladd_shapes", "student_ladd"),
    "dmd2": ("student/dmd2_shapes", "student_dmd2"),
    "scm": ("student/scm_shapes", "student_scm"),
    "progressive": ("student/progressive_shapes", "student_progressive"),
    "guidance": ("student/guidance_shapes", "student_guidance"),
}
DEFAULT_STUDENT = "ladd"
COUPLINGS = "student/reflow_couplings_shapes"  # the reflow student's teacher couplings
VALIDATED = "VALIDATED.json"  # a student's validation figures, reused on a rerun
REFERENCE_STUDENT = "ladd"  # validates on the cache: its data section is every student's


def student_methods() -> list[str]:
    """The methods named by ``FEWSTEP_DEMO_STUDENT``: one, a comma list, or ``all``."""
    raw = os.environ.get("FEWSTEP_DEMO_STUDENT", DEFAULT_STUDENT)
    names = list(STUDENTS) if raw.strip() == "all" else [n.strip() for n in raw.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in STUDENTS]
    if unknown or not names:
        raise SystemExit(
            f"FEWSTEP_DEMO_STUDENT={raw!r}: choose one of {sorted(STUDENTS)}, a comma list of "
            "them, or 'all'"
        )
    return names


def student_method() -> str:
    """The method whose grids and score-vs-NFE plot the report shows (ladd when asked for)."""
    names = student_methods()
    return DEFAULT_STUDENT if DEFAULT_STUDENT in names else names[0]


def _merged_config(configs: list[Path]) -> dict[str, Any]:
    """A ``-c`` chain as one dict (mappings merged key by key, as the CLI layers them)."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in over.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
        return out

    merged: dict[str, Any] = {}
    for path in configs:
        merged = merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def _reflow_on_cache(log_dir: Path) -> tuple[list[str], str]:
    """Validate the reflow student on the cache's held-out prompts and noise, as every other
    student (its own data are couplings, whose held-out prompts differ): a ``-c`` overlay with
    the reference student's data section, and a note counting the held-out (prompt, noise)
    pairs that were among its training couplings (their noise is the validation noise)."""
    from fewstep.data.cache import read_manifest
    from fewstep.data.datamodule import split_indices
    from fewstep.tools.couplings import data_section_args

    profile = active_profile()
    data = _merged_config(profile.configs(STUDENTS[REFERENCE_STUDENT][0]))["data"]
    overlay = log_dir / "validate_on_cache.yaml"
    log_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(overlay, yaml.safe_dump({"data": data}, sort_keys=False))
    cache, couplings = (
        data_section_args({"data": data}),
        _merged_config([profile.config(COUPLINGS)]),
    )
    reflow = data_section_args(_merged_config(profile.configs(STUDENTS["reflow"][0])))
    size = read_manifest(profile.run_dir / "cache")["num_samples"]
    held_out = split_indices(size, cache["val_fraction"], cache.get("seed", 0))[1]
    n = min(int(couplings["num_samples"]), size)
    trained = split_indices(n, reflow["val_fraction"], reflow.get("seed", 0))[0]
    seen = len(set(held_out.tolist()) & set(trained.tolist()))
    note = (
        f"validated on the cache's held-out prompts and noise like every method (its own data "
        f"are teacher couplings); {seen} of those {len(held_out)} (prompt, noise) pairs were "
        "among its training couplings. Training s includes sampling the couplings."
    )
    return ["-c", str(overlay)], note


def _couplings_teacher() -> list[str]:
    """`fewstep couplings` overrides drawing from the shipped teacher (none when trained here)."""
    folder = shipped_teacher()
    if folder is None:
        return []
    return ["--teacher_config", str(folder / SHIPPED_TEACHER_YAML), "--teacher_ckpt", "null"]


def _couplings(log_dir: Path) -> float:
    """Make (or finish) the reflow couplings unless its fit finished; their total sampling time
    so far, in seconds."""
    record = log_dir / "couplings_seconds.json"
    before = json.loads(record.read_text())["seconds"] if record.is_file() else 0.0
    if (log_dir / "FINISHED").is_file():
        return before
    start = time.time()
    _cli(["couplings", "-c", str(active_profile().config(COUPLINGS)), *_couplings_teacher()])
    total = round(before + time.time() - start, 1)
    log_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps({"seconds": total}) + "\n")
    return total


def _rerun_named() -> bool:
    """Whether FEWSTEP_DEMO_STAGES names the student stage (then every method validates again)."""
    return "student" in os.environ.get("FEWSTEP_DEMO_STAGES", "").split(",")


def distil(name: str) -> dict[str, Any]:
    """Distill the teacher with method ``name`` (fit reused once finished), then validate the
    student beside the teacher on the shared prompts and noise; figures reused when recorded
    for this fit and teacher."""
    profile = active_profile()
    config_name, log_name = STUDENTS[name]
    config, log_dir = profile.configs(config_name), profile.run_dir / log_name
    saved = log_dir / VALIDATED
    if (log_dir / "FINISHED").is_file() and saved.is_file() and not _rerun_named():
        entry = json.loads(saved.read_text())
        if entry.get("teacher") == _teacher_key():
            return entry
    saved.unlink(missing_ok=True)
    extra, validate_extra, note = _teacher_overrides(), [], None
    entry: dict[str, Any] = {"log_dir": str(log_dir)}
    if name == "reflow":
        entry["extra_seconds"] = _couplings(log_dir)
        validate_extra, note = _reflow_on_cache(log_dir)
    reused = _fit_once(config, log_dir, extra)
    metrics = _validate_metrics(config, log_dir, [*validate_extra, *extra])
    entry |= {"validate": metrics, "fit_seconds": _fit_seconds(log_dir), **reused}
    entry |= {"teacher": _teacher_key(), **({"note": note} if note else {})}
    write_text_atomic(saved, json.dumps(entry, indent=2))
    return entry


def stage_student() -> dict[str, Any]:
    """Distill the teacher into a 1-4 step student with each method asked for, then evaluate
    each side by side with the teacher (same prompts and noise): scores, fidelity to the
    teacher, NFE, ms per image."""
    names, primary = student_methods(), student_method()
    runs = {}
    for name in names:
        print(f"--- student {name} ({names.index(name) + 1}/{len(names)})", flush=True)
        runs[name] = distil(name)
    reused = [e["reused_fit_seconds"] for e in runs.values() if "reused_fit_seconds" in e]
    main_run = runs[primary]
    return {
        "method": primary,
        "log_dir": main_run["log_dir"],
        "validate": main_run.get("validate", {}),
        "methods": runs,
        "methods_order": names,
        **({"reused_fit_seconds": sum(reused)} if reused else {}),
    }


def stage_report() -> dict[str, Any]:
    """Write <run>/report.md (and methods_table.md): tables, teacher-vs-student grids,
    score-vs-NFE plot, the methods compared on the same teacher."""
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
    """The file whose presence shows that stage ``name`` finished (None: the stage always runs;
    the student stage's are its methods' FINISHED files, see ``reusable``)."""
    shipped = shipped_teacher() is not None
    outputs = {
        "shapes": "shapes/scores.json",
        "vae": "vae/config.json",
        "cache": "cache/manifest.json",
        "teacher": "teacher/SHIPPED" if shipped else "teacher/FINISHED",
        "student": f"{STUDENTS[student_method()][1]}/FINISHED",
    }
    if name == "vae" and shipped:
        return _vae_dir() / "config.json"
    return active_profile().run_dir / outputs[name] if name in outputs else None


def reusable(name: str, results: dict[str, Any]) -> bool:
    """Whether a full run may reuse stage ``name``: its figures are recorded (for the student,
    those of every method asked for now) and its outputs are still there."""
    output = stage_output(name)
    if name not in results or output is None or not output.is_file():
        return False
    if name != "student":
        return True
    stage = results[name]
    recorded = stage.get("methods") or {stage.get("method"): {}}
    run_dir = active_profile().run_dir
    return all(
        m in recorded and (run_dir / STUDENTS[m][1] / "FINISHED").is_file()
        for m in student_methods()
    )


def demo_source() -> str:
    """The teacher and data of this demo, as results.json records them."""
    data = data_folder()
    return teacher_source() + (f" data:{data.resolve()}" if data is not None else "")


def _check_source(results: dict[str, Any], run_dir: Path) -> None:
    """Refuse to mix demos of two teachers or data sets in one run folder (its cache, students
    and figures belong to the ones recorded there)."""
    recorded, current = results.get("source", TRAIN), demo_source()
    if recorded != current and any(stage in results for stage in STAGES):
        raise SystemExit(
            f"{run_dir} holds the demo of {recorded!r}, not of {current!r} "
            f"(FEWSTEP_DEMO_TEACHER, FEWSTEP_DEMO_DATA): move it away first "
            f"(mv {run_dir} {run_dir}_old)"
        )


def main() -> None:
    """Run the stages in order, printing what each did and wrote."""
    torch.set_float32_matmul_precision("high")
    profile = active_profile()
    chosen = os.environ.get("FEWSTEP_DEMO_STAGES", ",".join(STAGES)).split(",")
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise SystemExit(
            f"FEWSTEP_DEMO_STAGES: unknown stage(s) {unknown}; choose from {list(STAGES)}"
        )
    student_methods()  # a bad FEWSTEP_DEMO_STUDENT fails now, not after the teacher
    if (folder := shipped_teacher()) is not None:
        check_shipped(folder)
    profile.run_dir.mkdir(parents=True, exist_ok=True)
    explicit = "FEWSTEP_DEMO_STAGES" in os.environ  # named stages always run again
    results = _load_results()
    _check_source(results, profile.run_dir)
    results["source"] = demo_source()
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
