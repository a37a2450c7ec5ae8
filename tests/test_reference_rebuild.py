"""bench/reference_rebuild.sh: the caches its recipe names are built, the teacher resumes from its
exact last.ckpt, and a recipe without a run name or a missing shipped VAE is one clear error."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "reference_rebuild.sh"
OVERLAY = "configs/teacher/r.yaml"
HEADER = f"# fewstep fit -c configs/teacher/base.yaml \\\n#   -c {OVERLAY}\n# what it tests\n"
VAE = "fewstep/assets/reference_vae"
BODY = "trainer:\n  logger:\n    init_args: {name: teacher_x}\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A stand-in checkout: the script under bench/, one recipe overlay, the default cache's
    configs, the shipped VAE, an empty runs store."""
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench" / SCRIPT.name)
    (tmp_path / "configs" / "teacher").mkdir(parents=True)
    (tmp_path / "configs" / "teacher" / "base.yaml").write_text("model: {}\n")
    (tmp_path / "configs" / "cache").mkdir()
    for name in ("shapes", "shapes_reference"):  # the default cache's chain
        (tmp_path / "configs" / "cache" / f"{name}.yaml").write_text("out: x\n")
    (tmp_path / VAE).mkdir(parents=True)
    (tmp_path / VAE / "config.json").write_text("{}")
    (tmp_path / OVERLAY).write_text(f"{HEADER}{BODY}")
    return tmp_path


def rebuild(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "FEWSTEP": "fewstep", "FEWSTEP_RUNS": str(repo / "store")}
    cmd = ["bash", str(repo / "bench" / SCRIPT.name), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def test_a_fresh_machine_builds_the_cache_then_trains(repo: Path) -> None:
    out = rebuild(repo, OVERLAY, "--trainer.max_steps=10")
    assert out.returncode == 0, out.stderr
    cache, teacher = out.stdout.splitlines()  # the VAE is shipped: no VAE stage
    assert cache.startswith("fewstep cache") and "shapes_reference.yaml" in cache
    assert (
        teacher == f"fewstep fit -c configs/teacher/base.yaml -c {OVERLAY} --trainer.max_steps=10"
    )
    assert "--ckpt_path" not in teacher
    assert (repo / "runs" / "reference").resolve() == (repo / "store" / "reference").resolve()


def test_an_existing_run_resumes_from_its_last_checkpoint(repo: Path) -> None:
    ckpts = repo / "store" / "reference" / "teacher_x" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"")
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 0, out.stderr
    cache, teacher = out.stdout.splitlines()
    assert cache.startswith("fewstep cache")
    assert teacher.endswith("--ckpt_path runs/reference/teacher_x/checkpoints/last.ckpt")


def test_a_missing_shipped_vae_is_one_clear_error(repo: Path) -> None:
    (repo / VAE / "config.json").unlink()
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 2 and out.stdout == ""
    assert f"{VAE}: the shipped reference VAE is missing" in out.stderr


def test_a_recipe_without_its_chain_or_run_name_is_refused(repo: Path) -> None:
    (repo / OVERLAY).write_text(BODY)
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 2 and out.stdout == ""
    assert "name its config chain" in out.stderr and OVERLAY in out.stderr
    (repo / OVERLAY).write_text(HEADER.replace("base.yaml", "gone.yaml") + BODY)
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 2 and "configs/teacher/gone.yaml, which does not exist" in out.stderr
    (repo / OVERLAY).write_text(f"{HEADER}model: {{}}\n")
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 2 and out.stdout == ""
    assert "trainer.logger.init_args.name" in out.stderr and OVERLAY in out.stderr
    missing = rebuild(repo, "configs/teacher/none.yaml")
    assert missing.returncode == 2 and "no such recipe overlay" in missing.stderr


def test_caches_named_in_the_header_are_built_before_the_teacher(repo: Path) -> None:
    for name in ("hard", "val"):
        (repo / "configs" / "cache" / f"{name}.yaml").write_text("out: x\n")
    base = "-c configs/cache/shapes.yaml -c configs/cache/shapes_reference.yaml"
    caches = f"# fewstep cache {base} \\\n#   -c configs/cache/hard.yaml\n"
    caches += f"# fewstep cache {base} -c configs/cache/val.yaml\n"
    (repo / OVERLAY).write_text(f"{HEADER}{caches}{BODY}")
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 0, out.stderr
    hard, val, teacher = out.stdout.splitlines()
    assert hard == f"fewstep cache {base} -c configs/cache/hard.yaml"
    assert val == f"fewstep cache {base} -c configs/cache/val.yaml"
    assert teacher == f"fewstep fit -c configs/teacher/base.yaml -c {OVERLAY}"
    (repo / "configs" / "cache" / "val.yaml").unlink()
    out = rebuild(repo, OVERLAY)
    assert out.returncode == 2 and out.stdout == ""
    assert "configs/cache/val.yaml, which does not exist" in out.stderr
