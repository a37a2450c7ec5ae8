"""bench/sweep.py: plan substitution, dotted patches, dependency scheduling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    return load_bench("sweep")


def test_substitute_parses_whole_placeholders(sweep) -> None:
    names = {"steps": "650", "name": "t1", "enc": "null"}
    assert sweep.substitute("{steps}", names) == 650
    assert sweep.substitute("{enc}", names) is None
    assert sweep.substitute("runs/{name}/vae", names) == "runs/t1/vae"
    assert sweep.substitute({"a": ["{steps}", 2]}, names) == {"a": [650, 2]}


def test_set_dotted_walks_dicts_and_lists(sweep) -> None:
    config = {"trainer": {"callbacks": [{"init_args": {"decay": 0.9}}]}}
    sweep.set_dotted(config, "trainer.callbacks.0.init_args.decay", 0.99)
    sweep.set_dotted(config, "model.init_args.lr", 1e-3)
    assert config["trainer"]["callbacks"][0]["init_args"]["decay"] == 0.99
    assert config["model"] == {"init_args": {"lr": 1e-3}}


def test_job_config_writes_patched_yaml(sweep, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "RUN_ROOT", tmp_path)
    job = {
        "name": "t1",
        "base": "configs/teacher/shapes.yaml",
        "patches": {"trainer.max_steps": "{steps}", "trainer.logger.init_args.name": "{name}"},
    }
    path = sweep.job_config(job, {"steps": "7", "name": "t1"})
    config = yaml.safe_load(path.read_text())
    assert config["trainer"]["max_steps"] == 7
    assert config["trainer"]["logger"]["init_args"]["name"] == "t1"
    assert config["model"]["class_path"].endswith("TeacherModule")  # the rest is the base


def test_layered_base_reproduces_the_long_recipe(sweep, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "RUN_ROOT", tmp_path)
    layered = ["configs/teacher/shapes.yaml", "configs/teacher/shapes_long.yaml"]
    job = {"name": "t1", "base": layered, "patches": {"trainer.val_check_interval": 50}}
    config = yaml.safe_load(sweep.job_config(job, {"name": "t1"}).read_text())
    network = config["model"]["init_args"]["network"]
    assert network["class_path"].endswith("DiT") and network["init_args"]["in_channels"] == 8
    assert network["init_args"]["hidden_size"] == 192 and network["init_args"]["depth"] == 6
    assert config["trainer"]["max_steps"] == 3000 and config["trainer"]["val_check_interval"] == 50
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.0005
    assert sweep.merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_schedule_runs_dependents_after_success_and_skips_after_failure(
    sweep, tmp_path, monkeypatch
) -> None:
    order: list[str] = []

    def fake_run(job, variables, log_dir):
        order.append(job["name"])
        return {"returncode": 1 if job["name"] == "bad" else 0}

    monkeypatch.setattr(sweep, "run_job", fake_run)
    plan = {
        "jobs": [
            {"name": "child", "after": ["base"]},
            {"name": "base"},
            {"name": "bad"},
            {"name": "orphan", "after": ["bad"]},
            {"name": "grandchild", "after": ["orphan"]},
            {"name": "lost", "after": ["missing"]},
        ]
    }
    out = tmp_path / "results.json"
    sweep.schedule(plan, {}, jobs=1, out=out)
    results = json.loads(out.read_text())
    assert order.index("base") < order.index("child")
    assert "orphan" not in order and "grandchild" not in order and "lost" not in order
    assert "failed" in results["orphan"]["skipped"]
    assert "not in the plan" in results["lost"]["skipped"]
    assert results["child"] == {"returncode": 0}


def test_merge_replaces_a_mapping_of_another_class(sweep) -> None:
    """As a second -c config does: a new class_path does not inherit the old init_args."""
    base = {"lr_scheduler": {"class_path": "LinearLR", "init_args": {"total_iters": 200}}}
    same = {"lr_scheduler": {"class_path": "LinearLR", "init_args": {"start_factor": 0.1}}}
    other = {"lr_scheduler": {"class_path": "WSD", "init_args": {"total_steps": 9}}}
    assert sweep.merge(base, same)["lr_scheduler"]["init_args"] == {
        "total_iters": 200,
        "start_factor": 0.1,
    }
    assert sweep.merge(base, other) == other
    assert sweep.merge(base, {"lr_scheduler": {"init_args": {"x": 1}}})["lr_scheduler"] == {
        "class_path": "LinearLR",
        "init_args": {"total_iters": 200, "x": 1},
    }


@pytest.fixture(scope="module")
def gpu_driver(sweep):
    return load_bench("gpu_reference_teacher")


def test_gpu_driver_config_fits_its_length(gpu_driver, tmp_path: Path) -> None:
    """The layered GPU recipe with a run's length: one WSD schedule (no LinearLR arguments
    left), total_steps = max_steps, validation, CFG grid and checkpoints at the same interval."""
    patches = gpu_driver.schedule_patches(900, 50, 3, tmp_path, "cand")
    config = yaml.safe_load(
        gpu_driver.patched(gpu_driver.TEACHER, patches, tmp_path / "c.yaml").read_text()
    )
    scheduler = config["model"]["init_args"]["lr_scheduler"]
    assert scheduler["class_path"].endswith("WarmupStableDecay")
    assert set(scheduler["init_args"]) == {"total_steps", "warmup_steps", "decay_fraction"}
    assert scheduler["init_args"]["total_steps"] == config["trainer"]["max_steps"] == 900
    callbacks = config["trainer"]["callbacks"]
    assert callbacks[1]["init_args"]["every_n_steps"] == 300
    assert callbacks[2]["init_args"]["every_n_train_steps"] == 300
    assert config["trainer"]["val_check_interval"] == 300
    assert config["model"]["init_args"]["network"]["init_args"]["text_refiner_depth"] == 2


def candidate_config(gpu_driver, name: str, tmp_path: Path) -> dict:
    assert name in gpu_driver.CANDIDATES
    path = gpu_driver.patched(
        gpu_driver.TEACHER, gpu_driver.CANDIDATES[name], tmp_path / f"{name}.yaml"
    )
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", ["gpu_ref", "gpu_ref_conv", "gpu_norefiner"])
def test_every_gpu_candidate_builds_its_network(gpu_driver, tmp_path: Path, name: str) -> None:
    """Each candidate's patches give a DiT config that builds (a misspelt key fails here, not
    minutes into a lent machine's time)."""
    from fewstep.models.dit import DiT

    network = candidate_config(gpu_driver, name, tmp_path)["model"]["init_args"]["network"]
    assert network["class_path"].endswith("DiT")
    dit = DiT(**network["init_args"])
    refiner = dit.text_refiner
    assert (refiner is None) is (name == "gpu_norefiner")
    assert (refiner is not None and refiner.mixer is not None) is (name == "gpu_ref_conv")


def test_the_mmdit_candidate_is_r4_on_the_gpu_recipe(gpu_driver, tmp_path: Path) -> None:
    """gpu_mmdit: R4's FLUX.1-block network whole (no DiT argument left in it) and its pooled
    text, on the GPU recipe's batch, lr, precision and schedule."""
    from fewstep.models.flux import Flux

    config = candidate_config(gpu_driver, "gpu_mmdit", tmp_path)
    reference = candidate_config(gpu_driver, "gpu_ref", tmp_path)
    network = config["model"]["init_args"]["network"]
    assert network["class_path"] == "fewstep.models.flux.Flux"
    flux = Flux(**network["init_args"])
    assert 5.0e6 < sum(p.numel() for p in flux.parameters()) < 5.5e6  # R3's DiT: 5.04M
    assert (flux.hidden_size, len(flux.double_blocks), len(flux.single_blocks)) == (192, 2, 4)
    assert config["data"]["init_args"]["pooled_text"] == "mean_tokens"
    for key in ("precision", "max_steps"):
        assert config["trainer"][key] == reference["trainer"][key]
    assert config["data"]["init_args"]["batch_size"] == reference["data"]["init_args"]["batch_size"]
    assert config["model"]["init_args"]["optimizer"] == reference["model"]["init_args"]["optimizer"]


def test_gpu_driver_steps_fit_the_time_left(gpu_driver) -> None:
    """(100 s - 20 s start-up - 2 validations of 5 s) at 90 % of 10 steps/s = 630 -> 600."""
    timing = {"steps_per_s": 10.0, "startup_s": 20.0, "val_s": 5.0}
    assert gpu_driver.steps_for(timing, 100.0, 2, 200) == 600
    assert gpu_driver.steps_for(timing, 10.0, 2, 200) == 200  # never below one multiple


def test_gpu_import_joins_halves_and_points_config_home(tmp_path: Path) -> None:
    """The returned halves join into one state dict (overlap is an error), and the run's config
    reads the local cache and VAE, in float32, without the EMA callback."""
    import io
    import tarfile

    import torch

    module = load_bench("gpu_reference_import")
    meta = {"global_step": 800, "weights": "ema"}
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": meta}, tmp_path / "c_ema_0.pt")
    torch.save({"state_dict": {"b": torch.zeros(3)}, "meta": meta}, tmp_path / "c_ema_1.pt")
    ckpt = module.joined_checkpoint(tmp_path, "c")
    assert set(ckpt["state_dict"]) == {"a", "b"} and ckpt["global_step"] == 800
    config = {
        "trainer": {
            "precision": "bf16-mixed",
            "limit_val_batches": 1,
            "logger": {"init_args": {"save_dir": "/x"}},
            "callbacks": [{"class_path": "fewstep.lightning.ema.EMA"}, {"class_path": "M"}],
        },
        "model": {"init_args": {"vae_path": ".gpu/vae"}},
        "data": {"init_args": {"path": "/x/cache", "batch_size": 256}},
    }
    raw = yaml.safe_dump(config).encode()
    with tarfile.open(tmp_path / "logs.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("runs/c/config.yaml")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    local = module.local_config(tmp_path, "c", tmp_path / "out" / "c")
    assert local["data"]["init_args"]["path"] == "runs/reference/cache"
    assert local["model"]["init_args"]["vae_path"] == "fewstep/assets/reference_vae"
    assert local["trainer"]["precision"] == "32-true"
    assert [c["class_path"] for c in local["trainer"]["callbacks"]] == ["M"]
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": meta}, tmp_path / "c_ema_1.pt")
    with pytest.raises(ValueError, match="overlap"):
        module.joined_checkpoint(tmp_path, "c")
