"""The fewstep console script: LightningCLI behaviour and the tool subcommands."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewstep.cli import run

ROOT = Path(__file__).parents[1]


def test_shapes_tool_from_config(tmp_path, capsys):
    run(
        [
            "shapes",
            "-c",
            str(ROOT / "configs/shapes/preview.yaml"),
            "--out",
            str(tmp_path),
            "--num_samples",
            "6",
            "--num_scored",
            "30",
        ]
    )
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["clean"]["overall"] >= 0.99
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert len((tmp_path / "images/metadata.jsonl").read_text().splitlines()) == 6
    assert '"overall"' in capsys.readouterr().out


def test_console_script_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "fewstep.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("fit", "validate", "test", "predict", "shapes", "cache", "couplings"):
        assert command in out
    flat = re.sub(r"-\s+", "-", out)  # argparse wraps long help at hyphens
    for tool in ("export", "shapes-features", "ship", "ship-vae"):
        assert tool in flat


def test_bad_tool_argument_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        run(["shapes", "--resolution", "abc"])
    assert "resolution" in capsys.readouterr().err


def _console(*args: str) -> list[str]:
    """The console script as a subprocess command (``python -m fewstep.cli`` runs ``main``)."""
    return [sys.executable, "-m", "fewstep.cli", *args]


def test_console_script_exits_zero_on_success(tmp_path):
    done = subprocess.run(
        _console("shapes", "--out", str(tmp_path), "--num_samples", "2", "--num_scored", "6"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LightningCLI" not in done.stderr and "{'" not in done.stderr


def test_console_script_exits_nonzero_on_bad_argument():
    done = subprocess.run(_console("shapes", "--resolution", "abc"), capture_output=True)
    assert done.returncode != 0


def _vae_fit(tmp_path: Path) -> list[str]:
    """A tiny VAE fit that would run for a long time, checkpointing every step."""
    every_step = {"every_n_train_steps": 1, "save_last": True}
    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    callback = {"class_path": checkpoint, "init_args": every_step}
    overlay = tmp_path / "every_step.yaml"  # JSON is YAML
    overlay.write_text(json.dumps({"trainer": {"callbacks": [callback]}}))
    return _console(
        "fit",
        "-c",
        str(ROOT / "configs/vae/shapes.yaml"),
        "-c",
        str(overlay),
        "--trainer.max_steps=100000",
        "--trainer.val_check_interval=100000",
        "--trainer.limit_val_batches=0",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.batch_size=2",
        "--data.init_args.val.init_args.size=2",
        "--model.init_args.train_crop=16",
        "--model.init_args.lr_scheduler.init_args.total_steps=100000",
        f"--model.init_args.export_dir={tmp_path / 'export'}",
    )


def _saved_steps(folder: Path) -> list[int]:
    """Steps of the ``epoch=E-step=S.ckpt`` files in ``folder`` (ModelCheckpoint keeps one)."""
    return [int(p.stem.rsplit("step=", 1)[1]) for p in folder.glob("epoch=*-step=*.ckpt")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_fit_writes_last_checkpoint_and_exits_128_plus_signal(tmp_path, signum):
    proc = subprocess.Popen(_vae_fit(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "vae_training" / "checkpoints"
    deadline = time.time() + 300
    while max(_saved_steps(checkpoints), default=0) < 2 and proc.poll() is None:
        assert time.time() < deadline, "the fit did not reach step 2 in 300 s"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(signum), err.decode()[-2000:]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert 2 <= last["global_step"] < 100000
    assert "Traceback" not in err.decode()
    assert "args parameter" not in err.decode()  # LightningCLI reads sys.argv itself


def test_command_line_setting_beats_the_checkpoints_hyperparameters(tmp_path):
    from student_fixtures import build_tiny_teacher

    teacher = build_tiny_teacher(tmp_path)  # trained and saved with guidance_scale 2.0
    stored = torch.load(teacher.ckpt, map_location="cpu", weights_only=True)
    assert stored["hyper_parameters"]["guidance_scale"] == 2.0
    cli = run(
        [
            "validate",
            "-c",
            str(teacher.config),
            "--model.init_args.guidance_scale=1.0",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",  # where LightningCLI saves config.yaml
            "--trainer.enable_progress_bar=false",
            "--ckpt_path",
            str(teacher.ckpt),
        ]
    )
    assert cli.model.guidance_scale == 1.0
    assert cli.trainer.callback_metrics["val/nfe"] == cli.model.sampler.nfe  # unguided: 1 pass


class _RunsCode:
    """A pickle payload that would run code when unpickled."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_checkpoint_is_refused(tmp_path, capsys):
    from fewstep.lightning.checkpoints import load_checkpoint

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, path)
    with pytest.raises(ValueError, match="Refusing to load .*evil.ckpt"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    from fewstep.lightning.checkpoints import load_checkpoint

    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ValueError, match="Cannot read checkpoint .*cut.ckpt"):
        load_checkpoint(path)


def test_truncated_ckpt_path_is_one_clear_error(tmp_path):
    from student_fixtures import build_tiny_teacher

    teacher = build_tiny_teacher(tmp_path)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(teacher.ckpt.read_bytes()[:4000])
    with pytest.raises(SystemExit, match="cut.ckpt: not a complete checkpoint"):
        run(["validate", "-c", str(teacher.config), "--ckpt_path", str(cut)])


def test_a_fresh_fit_into_a_used_folder_moves_the_earlier_run_aside(tmp_path):
    from student_fixtures import build_tiny_teacher

    teacher = build_tiny_teacher(tmp_path / "t")
    logger = {"save_dir": str(tmp_path), "name": "run", "version": ""}
    common = [
        "fit",
        "-c",
        str(teacher.config),
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        *(f"--trainer.logger.init_args.{k}={v}" for k, v in logger.items()),
    ]
    run(common)
    folder = tmp_path / "run"
    first = sorted(p.name for p in folder.glob("events.out.tfevents*"))
    assert first and list((folder / "checkpoints").glob("*.ckpt"))
    run(common)  # fresh again: the first run moves to previous/<time>/
    archived = list((folder / "previous").iterdir())
    assert len(archived) == 1
    assert sorted(p.name for p in archived[0].glob("events.out.tfevents*")) == first
    assert list((archived[0] / "checkpoints").glob("*.ckpt"))
    assert len(list(folder.glob("events.out.tfevents*"))) == 1  # only the new run's curves
    last = next((folder / "checkpoints").glob("*.ckpt"))
    run([*common, "--ckpt_path", str(last), "--trainer.max_steps=2"])
    assert len(list((folder / "previous").iterdir())) == 1  # a resume keeps the folder


def _two_fresh_fits(rank: int, out: Path) -> None:
    """Two fresh fits into one run folder in the same 2 DDP processes (gloo): the second finds a
    process group and the first run's files. SIGALRM ends a rank left waiting in a collective."""
    signal.alarm(120)
    logger = {"save_dir": str(out), "name": "run", "version": ""}
    fit = [
        "fit",
        "--model=lightning.pytorch.demos.boring_classes.BoringModel",
        "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        *(f"--trainer.logger.init_args.{k}={v}" for k, v in logger.items()),
    ]
    for _ in range(2):
        run(fit)
    signal.alarm(0)


def test_a_second_fit_in_the_same_processes_archives_on_rank_zero_without_a_hang(tmp_path):
    """``trainer.log_dir`` is a collective once a process group exists: every rank asks it, rank
    0 alone moves the first run aside, and the second fit completes on both ranks."""
    from test_distributed import on_two_ranks

    on_two_ranks(_two_fresh_fits, tmp_path)
    folder = tmp_path / "run"
    (archived,) = list((folder / "previous").iterdir())  # the first run, moved once
    assert list(archived.glob("events.out.tfevents*")) and list(archived.rglob("*.ckpt"))
    assert len(list(folder.glob("events.out.tfevents*"))) == 1  # the second run's curves
    assert list((folder / "checkpoints").glob("*.ckpt"))
