"""The ``fewstep`` command: LightningCLI for fit/validate/test/predict, plus tools.

fewstep fit -c configs/vae/shapes.yaml        # any LightningModule + DataModule
fewstep shapes --out runs/demo/shapes         # render + score the shapes world
fewstep cache -c configs/cache/shapes.yaml    # build a latent/text cache
fewstep export -c FIT.yaml --ckpt_path last.ckpt --out DIR  # teacher/student as a pipeline
fewstep couplings -c configs/student/reflow_couplings_shapes.yaml  # teacher (noise, sample)
fewstep shapes-features --out fewstep/assets/shapes_features  # the FID feature network
fewstep ship --config FIT.yaml --ckpt_path last.ckpt --out fewstep/assets/NAME  # a shipped teacher
fewstep ship-vae --vae runs/x/vae --config runs/x/vae_training/config.yaml --out DIR  # a VAE
fewstep evaluate -c metrics.yaml --images DIR --reference DIR --out DIR  # FID, CLIPScore, ...
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from fewstep.lightning.final_checkpoint import FinalLastCheckpoint
from fewstep.lightning.interrupt import GracefulStop, exit_status
from fewstep.lightning.nonfinite import NonFiniteGuard
from fewstep.lightning.run_folder import archive_previous_run


def _tools() -> dict[str, Callable]:
    from fewstep.tools.shapes_preview import preview

    tools: dict[str, Callable] = {"shapes": preview}
    try:
        from fewstep.tools.build_cache import build

        tools["cache"] = build
    except ImportError:  # pragma: no cover - the cache tool arrives with the cache stage
        pass
    from fewstep.tools.export import export

    tools["export"] = export
    from fewstep.tools.couplings import couplings

    tools["couplings"] = couplings
    from fewstep.tools.shapes_features import train as train_shapes_features

    tools["shapes-features"] = train_shapes_features
    from fewstep.tools.ship import ship

    tools["ship"] = ship
    from fewstep.tools.ship_vae import ship_vae

    tools["ship-vae"] = ship_vae
    from fewstep.tools.evaluate import evaluate

    tools["evaluate"] = evaluate
    return tools


TOOL_NAMES = (
    "shapes",
    "cache",
    "export",
    "couplings",
    "shapes-features",
    "ship",
    "ship-vae",
    "evaluate",
)
TOP_HELP = (
    "fewstep: train a latent DiT teacher and distil it into a 1-4 step student. Training and "
    "evaluation: fit, validate, test, predict (LightningCLI, below). Tools, each with its own "
    "--help: shapes (render and score the shapes world), cache (latent/text cache), couplings "
    "(teacher noise-sample pairs), export (a diffusers pipeline), shapes-features (train the "
    "feature network), ship / ship-vae (package a teacher / a VAE as a shipped model), "
    "evaluate (FID, KID, CMMD, CLIPScore, HPSv2, GenEval of generated images, weights from "
    "local paths)."
)


def run_tool(name: str, args: list[str]) -> object:
    """Run a non-training tool with jsonargparse (``-c config.yaml`` and flags)."""
    tool = _tools()[name]
    parser = ArgumentParser(prog=f"fewstep {name}", description=tool.__doc__)
    own_config = "config" in inspect.signature(tool).parameters  # e.g. export: a fit YAML path
    if own_config:
        args = ["--config" if a == "-c" else a for a in args]
    else:
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config file")
    parser.add_function_arguments(tool, as_positional=False)
    config = parser.instantiate(parser.parse_args(args))
    if not own_config:
        config.pop("config", None)
    result = tool(**vars(config))
    if isinstance(result, dict):
        import json

        print(json.dumps(result, indent=2))
    return result


def check_checkpoint_file(path: str) -> None:
    """Raise one clear error if ``path`` is not a complete checkpoint file (a zip archive, as
    torch.save writes it): missing, a folder, or truncated."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SystemExit(f"error: --ckpt_path {path}: no such checkpoint file")
    if not zipfile.is_zipfile(file):
        raise SystemExit(
            f"error: --ckpt_path {path}: not a complete checkpoint (truncated or corrupt); "
            "use an intact copy or an earlier checkpoint of the run"
        )


class FewstepCLI(LightningCLI):
    """LightningCLI in subclass mode; configs are saved with each run (overwritten on resume)."""

    def _parse_ckpt_path(self) -> None:
        """Keep the YAML and command-line settings: LightningCLI would overwrite them with the
        hyperparameters stored in ``--ckpt_path`` (so ``validate --ckpt_path ...
        --model.init_args.guidance_scale=1`` scored the trained scale). The checkpoint gives
        weights and training state only; a changed architecture fails at load, naming it.
        A missing or truncated checkpoint file is one clear error naming it."""
        subcommand = self.config.get("subcommand")
        path = subcommand and self.config[subcommand].get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(path)

    def _archive_previous_run(self) -> None:
        """A fresh fit (no ``--ckpt_path``) into a folder holding an earlier run moves that run
        to ``<folder>/previous/<time>/`` (rank 0): curves are not mixed, nothing is lost.
        ``trainer.log_dir`` is asked on every rank: once a process group exists (a second fit in
        the same processes) it is a broadcast, and a rank that skipped it would leave the others
        waiting."""
        fresh = self.config[self.subcommand].get("ckpt_path") is None
        log_dir = self.trainer.log_dir if fresh else None  # every rank: a collective
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        if rank == 0 and log_dir is not None:
            moved = archive_previous_run(log_dir)
            if moved is not None:
                print(f"note: the earlier run in {log_dir} moved to {moved}")

    def before_fit(self) -> None:
        """A first SIGINT/SIGTERM ends the fit after the current batch (GracefulStop); steps
        with NaN/inf gradients are skipped (NonFiniteGuard, default settings unless the config
        lists one); ``last.ckpt`` holds the final step (FinalLastCheckpoint: Lightning leaves it
        at the last step-triggered save when max_steps is not a multiple of the interval)."""
        self._archive_previous_run()
        callbacks = self.trainer.callbacks
        for kind in (NonFiniteGuard, FinalLastCheckpoint):
            if not any(isinstance(c, kind) for c in callbacks):
                callbacks.append(kind())
        callbacks.append(GracefulStop())


def run(args: list[str] | None = None) -> object:
    """Run ``fewstep <args>`` in this process; returns the tool's result or the CLI."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOL_NAMES:
        return run_tool(argv[0], argv[1:])
    # Two-optimiser students checkpoint the state after each step on purpose (resume is tested
    # to continue exactly); Lightning's warning about it, with its code sample, is noise here.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # Our datamodules resume mid-epoch exactly (fewstep.data.resumable.ResumableSampler starts at
    # the restored fit loop's batch; tests/test_resume_exact.py), so Lightning's warning that a
    # non-stateful dataloader cannot is wrong for them.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
    if args is not None:  # called from Python with explicit args: the host's sys.argv is not ours
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return FewstepCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": TOP_HELP},
        args=argv if args is not None else None,  # None: LightningCLI reads sys.argv itself
    )


def main(args: list[str] | None = None) -> int:
    """The ``fewstep`` console script: exit status 0 on success, 128 + the signal when a
    SIGINT/SIGTERM interrupted it (a fit first writes its final ``last.ckpt``); errors raise."""
    try:
        result = run(args)
    except KeyboardInterrupt:
        return 128 + int(signal.SIGINT)
    return exit_status(getattr(result, "trainer", None))


if __name__ == "__main__":
    sys.exit(main())
