"""Validating a student against its teacher (the StudentModule's evaluation half): the same
prompts and noise for the teacher at its reference setting and the student at each step count;
GenEval-protocol scores, latent MSE / pixel PSNR to the teacher, NFE, measured latency,
teacher-vs-student grids and a markdown table."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric

from fewstep.data.prompts import CATEGORIES
from fewstep.diffusion.samplers import Sampler
from fewstep.eval.geneval import ShapesGenEval, specs_of, tensor_to_hwc
from fewstep.eval.grid import captioned_grid
from fewstep.utils.seeding import fixed_noise, mix_seed


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB [B] of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp(min=1e-10))


class StudentEvaluation:
    """Validation hooks of StudentModule (a mixin: it uses the module's teacher, samplers,
    decode, eval_steps, guidance_scale, teacher_identity and logger)."""

    @property
    def eval_keys(self) -> list[str]:
        """Metric prefixes: "teacher", then "student_<n>" per n in eval_steps."""
        return ["teacher", *(f"student_{n}" for n in self.eval_steps)]

    def _build_metrics(self) -> None:
        """Per-key GenEval, fidelity and latency accumulators (synced across ranks)."""
        self.val_geneval = nn.ModuleDict({k: ShapesGenEval() for k in self.eval_keys})
        names = ["latent_mse", "psnr", "ms_per_image"]
        self.val_means = nn.ModuleDict(
            {f"{k}__{m}": MeanMetric() for k in self.eval_keys for m in names}
        )

    def on_validation_epoch_start(self) -> None:
        """Reset the sample budget, grids and accumulators."""
        self._val_scored, self._grid, self._captions = 0, {}, []
        for metric in [*self.val_geneval.values(), *self.val_means.values()]:
            metric.reset()

    def _timed(self, fn: Callable[[], Tensor], count: int) -> tuple[Tensor, float]:
        """fn()'s result and its wall time in ms per image (device-synchronised)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return out, 1000.0 * (time.perf_counter() - start) / count

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Teacher and n-step student samples from the same fixed noise: scores, fidelity, time."""
        budget = self.val_num_samples - self._val_scored
        rows = list(range(min(len(batch["index"]), max(budget, 0))))
        if not rows:
            return
        x0 = batch["latents"]
        text, mask = batch["text"][rows], batch["text_mask"][rows].bool()
        indices = batch["index"][rows].tolist()
        noise = fixed_noise(x0.shape[1:], indices, self.seed, x0.device)
        specs = [specs_of(batch["metadata"])[i] for i in rows]
        if self._val_scored == 0:  # warm-up (kernels, caches) outside the timings
            self.teacher_latents(text[:1], mask[:1], noise[:1])
            for n in self.eval_steps:
                self.student_latents(text[:1], mask[:1], noise[:1], n)
        room = self.grid_samples - len(self._captions)
        self._captions += [batch["caption"][i] for i in rows[: max(room, 0)]]
        teacher, ms = self._timed(lambda: self.teacher_latents(text, mask, noise), len(rows))
        teacher_images = self._score("teacher", teacher, ms, specs)
        for n in self.eval_steps:
            generator = torch.Generator(device=x0.device).manual_seed(
                mix_seed(self.seed, 1 << 41, n, indices[0])
            )
            latents, ms = self._timed(
                lambda n=n, g=generator: self.student_latents(text, mask, noise, n, g), len(rows)
            )
            images = self._score(f"student_{n}", latents, ms, specs)
            self.val_means[f"student_{n}__latent_mse"].update(
                (latents.float() - teacher.float()).pow(2).flatten(1).mean(1)
            )
            if images is not None and teacher_images is not None:
                self.val_means[f"student_{n}__psnr"].update(psnr(images, teacher_images))
        self._val_scored += len(rows)

    def _score(
        self, key: str, latents: Tensor, ms: float, specs: list[dict | None]
    ) -> Tensor | None:
        """Record latency, decode, GenEval-score the shapes-world rows, keep grid tiles."""
        self.val_means[f"{key}__ms_per_image"].update(
            torch.tensor(ms, device=self.device), weight=latents.shape[0]
        )
        images = self.decode(latents)
        if images is None:
            return None
        scored = [i for i, s in enumerate(specs) if s is not None]
        if scored:
            self.val_geneval[key].update(images[scored], [specs[i] for i in scored])
        room = self.grid_samples - len(self._grid.get(key, []))
        if room > 0:
            tiles = [tensor_to_hwc(image) for image in images[:room]]
            self._grid.setdefault(key, []).extend(tiles)
        return images

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<teacher|student_n>/...``, write eval_table.md and the grids (rank 0)."""
        table = self._compute_table()
        if not table:
            return
        flat = {f"val/{k}/{m}": v for k, row in table.items() for m, v in row.items()}
        self.log_dict({k: float(v) for k, v in flat.items()}, sync_dist=False)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval_table.md").write_text(self.eval_table_markdown(table))
        self._log_grids()

    def _compute_table(self) -> dict[str, dict[str, float]]:
        """Per key: geneval/<category|overall>, nfe, ms_per_image, speedup, latent_mse, psnr."""
        table: dict[str, dict[str, float]] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            for key in self.eval_keys:
                row: dict[str, float] = {}
                scores = self.val_geneval[key].compute()
                if not torch.isnan(scores["overall"]):
                    row.update({f"geneval/{c}": float(v) for c, v in scores.items()})
                for metric in ("latent_mse", "psnr", "ms_per_image"):
                    value = self.val_means[f"{key}__{metric}"].compute()
                    if not torch.isnan(value):
                        row[metric] = float(value)
                if "ms_per_image" not in row:
                    continue  # nothing sampled this epoch
                row["nfe"] = float(self._nfe(key))
                table[key] = row
        teacher_ms = table.get("teacher", {}).get("ms_per_image")
        for key, row in table.items():
            if key != "teacher" and teacher_ms is not None:
                row["speedup"] = teacher_ms / max(row["ms_per_image"], 1e-9)
        return table

    def _sampler_of(self, key: str) -> Sampler:
        """The sampler behind an eval key ("teacher" or "student_<n>")."""
        if key == "teacher":
            return self.teacher_sampler
        return self.student_sampler(int(key.removeprefix("student_")))

    def _nfe(self, key: str) -> int:
        """Network passes per image for an eval key (the teacher's CFG counts twice)."""
        return self.teacher_nfe if key == "teacher" else self._sampler_of(key).nfe

    def eval_table_markdown(self, table: dict[str, dict[str, float]]) -> str:
        """The validation table as markdown (one row per sampler setting)."""
        cats = [c for c in CATEGORIES if any(f"geneval/{c}" in r for r in table.values())]
        header = [
            "model",
            "sampler",
            "NFE",
            "ms/image",
            "speed-up",
            "GenEval",
            *cats,
            "latent MSE",
            "PSNR (dB)",
        ]

        def fmt(row: dict[str, float], key: str, spec: str = ".3f") -> str:
            return format(row[key], spec) if key in row else "–"

        lines = [
            f"# Student vs teacher (step {max(self.global_step, self._trained_steps)})",
            "",
            f"Teacher: `{self.teacher_identity['ckpt']}` (sha256 "
            f"{self.teacher_identity['sha256'][:12]}), CFG scale {self.guidance_scale:g}; "
            f"{self._val_scored} validation prompts, device {self.device.type}.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for key, row in table.items():
            sampler = self._sampler_of(key)
            cells = [
                key,
                f"{type(sampler).__name__}({sampler.steps})",
                fmt(row, "nfe", ".0f"),
                fmt(row, "ms_per_image", ".2f"),
                fmt(row, "speedup", ".1f"),
                fmt(row, "geneval/overall"),
                *(fmt(row, f"geneval/{c}") for c in cats),
                fmt(row, "latent_mse", ".4f"),
                fmt(row, "psnr", ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _log_grids(self) -> None:
        """Teacher | student pairs per step count, as captioned grids in TensorBoard."""
        teacher = self._grid.get("teacher", [])
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not teacher or not loggers:
            return
        captions = self._captions
        for n in self.eval_steps:
            student = self._grid.get(f"student_{n}", [])
            tiles, labels = [], []
            for image_t, image_s, caption in zip(teacher, student, captions, strict=False):
                tiles += [image_t, image_s]
                labels += [f"teacher: {caption}", f"student {n}-step"]
            grid = captioned_grid(tiles, labels, cols=min(8, len(tiles)), cell=96)
            for logger in loggers:
                logger.experiment.add_image(
                    f"val/student_{n}/teacher_vs_student",
                    np.asarray(grid),
                    self.global_step,
                    dataformats="HWC",
                )
