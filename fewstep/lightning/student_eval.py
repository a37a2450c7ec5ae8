"""Validating a student against its teacher (the StudentModule's evaluation half): the same
prompts and noise for the teacher at its reference setting and the student at each step count;
GenEval-protocol scores, latent MSE / pixel PSNR to the teacher, NFE, measured latency,
teacher-vs-student grids and a markdown table."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from fewstep.data.prompts import CATEGORIES
from fewstep.diffusion.samplers import Sampler
from fewstep.eval.geneval import ShapesGenEval, specs_of, tensor_to_hwc
from fewstep.eval.grid import captioned_grid
from fewstep.eval.metrics.distribution import KID
from fewstep.eval.metrics.fidelity import mean_pairwise_distance, shapes_fid
from fewstep.lightning.eval_metrics import Metrics, ValidationMetrics
from fewstep.lightning.image_log import log_dir, log_image
from fewstep.models.shapes_features import ShapesFeatureNet
from fewstep.utils.artifacts import FIDELITY_COLUMNS, GRID_FOLDER, student_grid_name
from fewstep.utils.seeding import fixed_noise, mix_seed

FAITHFUL_MAX = 1.10  # a student scoring above 1.10x its teacher is flagged as not faithful


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB [B] of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp(min=1e-10))


def unfaithful_notes(table: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines flagging every student that scores above FAITHFUL_MAX x its teacher."""
    flagged = [k for k, row in table.items() if row.get("score_ratio", 0.0) > FAITHFUL_MAX]
    notes = [
        f"- **{key}: not faithful to the teacher** — it scores "
        f"{100 * table[key]['score_ratio']:.0f} % of the teacher (> {100 * FAITHFUL_MAX:.0f} %): "
        "a distilled student should match its teacher, not beat it; it has moved towards the "
        "data or another mode (compare its FD to the teacher and to the data)."
        for key in flagged
    ]
    return ["", "## Warnings", "", *notes] if notes else []


def metrics_markdown(table: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines of the YAML's validation metrics (one column per value), or none."""
    names = sorted({m for row in table.values() for m in row if m in _metric_names(table)})
    if not names:
        return []
    lines = ["", "## Metrics", "", "| model | " + " | ".join(names) + " |"]
    lines.append("|" + "---|" * (len(names) + 1))
    for key, row in table.items():
        cells = [format(row[m], ".4f") if m in row else "–" for m in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


BUILT_IN = {"nfe", "ms_per_image", "speedup", "latent_mse", "psnr", "score_ratio"}
BUILT_IN |= {"fd_data", "fd_teacher", "kid_data", "kid_teacher", "diversity"}


def _metric_names(table: dict[str, dict[str, float]]) -> set[str]:
    """The row entries that come from the YAML's metrics (not the built-in measures)."""
    keys = {m for row in table.values() for m in row}
    return {m for m in keys if m not in BUILT_IN and not m.startswith("geneval/")}


def teacher_label(identity: dict[str, Any]) -> str:
    """Where the teacher came from: its checkpoint, or its config where it has none (a shipped
    teacher's ``teacher.yaml`` carries its own weights)."""
    ckpt = identity.get("ckpt")
    return str(identity.get("config")) if ckpt in (None, "None") else str(ckpt)


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

    def set_eval_metrics(self, metrics: Metrics | None) -> None:
        """Validation ``metrics`` (the YAML's): per eval key against the data (and the prompts),
        and per student step count against the teacher's samples from the same noise."""
        students = [k for k in self.eval_keys if k != "teacher"]
        keys = [*self.eval_keys, *(f"{k}|teacher" for k in students)]
        self.val_metrics = ValidationMetrics(metrics, keys) if metrics else None

    def _metric_row(self, key: str) -> dict[str, float]:
        """``key``'s metrics vs the data and, as ``<name>_vs_teacher``, vs the teacher."""
        metrics = getattr(self, "val_metrics", None)
        if metrics is None:
            return {}
        vs_teacher = metrics.compute(f"{key}|teacher").items()
        return {**metrics.compute(key), **{f"{k}_vs_teacher": v for k, v in vs_teacher}}

    def on_validation_epoch_start(self) -> None:
        """Reset the sample budget, grids and accumulators."""
        self._val_scored, self._grid, self._captions, self._diversity = 0, {}, [], {}
        for metric in [*self.val_geneval.values(), *self.val_means.values()]:
            metric.reset()
        for metric in [*self._fids().values(), *self._kids().values()]:
            metric.reset()
        if getattr(self, "val_metrics", None) is not None:
            self.val_metrics.to(self.device).reset()

    def _feature_net(self) -> ShapesFeatureNet | None:
        """The frozen shapes feature network of ``fidelity_features`` ("packaged": the shipped
        one), loaded once; None when distribution measures are off. Kept out of the module's
        registered children, so it is never saved, optimised or EMA-averaged."""
        path = self.hparams.get("fidelity_features")
        if path is None:
            return None
        if getattr(self, "_features", None) is None:
            net = ShapesFeatureNet.load(None if path == "packaged" else path)
            self.__dict__["_features"] = net.to(self.device)
        return self.__dict__["_features"]

    def _fids(self) -> dict[str, Any]:
        """Fréchet distances (torchmetrics FID, shapes features) by "<key>|<reference>":
        teacher|data, and student_<n>|data and student_<n>|teacher per step count."""
        net = self._feature_net()
        if net is None:
            return {}
        if getattr(self, "_fid_metrics", None) is None:
            pairs = ["teacher|data"]
            pairs += [f"student_{n}|{ref}" for n in self.eval_steps for ref in ("data", "teacher")]
            self.__dict__["_fid_metrics"] = {p: shapes_fid(net).to(self.device) for p in pairs}
        return self.__dict__["_fid_metrics"]

    def _kids(self) -> dict[str, Any]:
        """Kernel inception distances (torchmetrics KID, shapes features; Bińkowski et al. 2018)
        by the same "<key>|<reference>" pairs as ``_fids``."""
        net = self._feature_net()
        if net is None:
            return {}
        if getattr(self, "_kid_metrics", None) is None:
            kids = {p: KID(net, subsets=50).to(self.device) for p in self._fids()}
            self.__dict__["_kid_metrics"] = kids
        return self.__dict__["_kid_metrics"]

    def _update_fid(self, pair: str, images: Tensor | None, reference: Tensor | None) -> None:
        """Feed one batch of generated images and their reference images to the distances."""
        if images is None or reference is None:
            return
        for metric in (self._fids().get(pair), self._kids().get(pair)):
            if metric is not None:
                metric.update(reference, real=True)
                metric.update(images, real=False)

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
        cond = batch["cond"][rows] if "cond" in batch else None  # pooled text [B, Dv] (Flux)
        indices = batch["index"][rows].tolist()
        noise = fixed_noise(x0.shape[1:], indices, self.seed, x0.device)
        specs = [specs_of(batch["metadata"])[i] for i in rows]
        if self._val_scored == 0:  # warm-up (kernels, caches) outside the timings
            first = None if cond is None else cond[:1]
            self.teacher_latents(text[:1], mask[:1], noise[:1], first)
            for n in self.eval_steps:
                self.student_latents(text[:1], mask[:1], noise[:1], n, cond=first)
            self._measure_diversity(text, mask, tuple(x0.shape[1:]), indices, cond)
        room = self.grid_samples - len(self._captions)
        self._captions += [batch["caption"][i] for i in rows[: max(room, 0)]]
        teacher, ms = self._timed(lambda: self.teacher_latents(text, mask, noise, cond), len(rows))
        teacher_images = self._score("teacher", teacher, ms, specs)
        metrics = getattr(self, "val_metrics", None)
        data_images = self.decode(x0[rows]) if self._fids() or metrics else None
        self._update_fid("teacher|data", teacher_images, data_images)
        inputs = ([batch["caption"][i] for i in rows], [batch["metadata"][i] for i in rows])
        if metrics is not None:
            metrics.update("teacher", teacher_images, data_images, *inputs)
        for n in self.eval_steps:
            generator = torch.Generator(device=x0.device).manual_seed(
                mix_seed(self.seed, 1 << 41, n, indices[0])
            )
            latents, ms = self._timed(
                lambda n=n, g=generator: self.student_latents(text, mask, noise, n, g, cond),
                len(rows),
            )
            images = self._score(f"student_{n}", latents, ms, specs)
            self.val_means[f"student_{n}__latent_mse"].update(
                (latents.float() - teacher.float()).pow(2).flatten(1).mean(1)
            )
            if images is not None and teacher_images is not None:
                self.val_means[f"student_{n}__psnr"].update(psnr(images, teacher_images))
            self._update_fid(f"student_{n}|data", images, data_images)
            self._update_fid(f"student_{n}|teacher", images, teacher_images)
            if metrics is not None:
                metrics.update(f"student_{n}", images, data_images, *inputs)
                metrics.update(f"student_{n}|teacher", images, teacher_images)
        self._val_scored += len(rows)

    def _measure_diversity(
        self,
        text: Tensor,
        mask: Tensor,
        shape: tuple[int, ...],
        indices: list[int],
        cond: Tensor | None = None,
    ) -> None:
        """Mean pairwise feature distance over ``diversity_seeds`` noises of each of the first
        ``diversity_prompts`` prompts (with their pooled vectors ``cond``, if any), per eval key
        (mode collapse shows as a drop)."""
        net, seeds = self._feature_net(), self.hparams.get("diversity_seeds", 8)
        prompts = min(self.hparams.get("diversity_prompts", 4), len(indices))
        if net is None or prompts == 0 or seeds < 2:
            return
        text, mask = (
            text[:prompts].repeat_interleave(seeds, 0),
            mask[:prompts].repeat_interleave(seeds, 0),
        )
        if cond is not None:
            cond = cond[:prompts].repeat_interleave(seeds, 0)  # [P, Dv] -> [P*S, Dv]
        keys = [mix_seed(i, 1 << 42, j) for i in indices[:prompts] for j in range(seeds)]
        noise = fixed_noise(shape, keys, self.seed, text.device)
        for key in self.eval_keys:
            if key == "teacher":
                latents = self.teacher_latents(text, mask, noise, cond)
            else:
                n = int(key.removeprefix("student_"))
                generator = torch.Generator(device=text.device).manual_seed(mix_seed(self.seed, n))
                latents = self.student_latents(text, mask, noise, n, generator, cond)
            images = self.decode(latents)
            if images is None:
                return
            features = net(images).reshape(prompts, seeds, -1)  # [P*S, D] -> [P, S, D]
            spread = [mean_pairwise_distance(f) for f in features]
            self._diversity[key] = float(torch.stack(spread).mean())

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
        folder = log_dir(self.trainer)
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
                row.update(self._distances(key))
                row.update(self._metric_row(key))
                table[key] = row
        teacher = table.get("teacher", {})
        for key, row in table.items():
            if key != "teacher" and "ms_per_image" in teacher:
                row["speedup"] = teacher["ms_per_image"] / max(row["ms_per_image"], 1e-9)
            if key != "teacher" and teacher.get("geneval/overall") and "geneval/overall" in row:
                row["score_ratio"] = row["geneval/overall"] / teacher["geneval/overall"]
        return table

    def _distances(self, key: str) -> dict[str, float]:
        """fd_/kid_data, fd_/kid_teacher (Fréchet and kernel distances in shapes features) and
        diversity of a key."""
        out = {}
        for ref in ("data", "teacher"):
            metric = self._fids().get(f"{key}|{ref}")
            if metric is not None and int(metric.fake_features_num_samples) > 1:
                out[f"fd_{ref}"] = float(metric.compute())
                out[f"kid_{ref}"] = float(self._kids()[f"{key}|{ref}"].compute()[0])
        if key in self._diversity:
            out["diversity"] = self._diversity[key]
        return out

    def _sampler_of(self, key: str) -> Sampler:
        """The sampler behind an eval key ("teacher" or "student_<n>")."""
        if key == "teacher":
            return self.teacher_sampler
        return self.student_sampler(int(key.removeprefix("student_")))

    def _nfe(self, key: str) -> int:
        """Network passes per image for an eval key (the teacher's CFG counts twice)."""
        return self.teacher_nfe if key == "teacher" else self._sampler_of(key).nfe

    def eval_table_markdown(self, table: dict[str, dict[str, float]]) -> str:
        """The validation table as markdown (one row per sampler setting), then the students
        flagged as not faithful to the teacher."""
        cats = [c for c in CATEGORIES if any(f"geneval/{c}" in r for r in table.values())]
        header = [
            "model",
            "sampler",
            "NFE",
            "ms/image",
            "speed-up",
            "GenEval ± SE",
            "% of teacher",
            *cats,
            *(title for _, title, _ in FIDELITY_COLUMNS),
        ]

        def fmt(row: dict[str, float], key: str, spec: str = ".3f") -> str:
            return format(row[key], spec) if key in row else "–"

        lines = [
            f"# Student vs teacher (step {max(self.global_step, self._trained_steps)})",
            "",
            f"Teacher: `{teacher_label(self.teacher_identity)}` (sha256 "
            f"{self.teacher_identity['sha256'][:12]}), CFG scale {self.guidance_scale:g}; "
            f"{self._val_scored} validation prompts, device {self.device.type}. FD: Fréchet "
            "distance in shapes features to the teacher's samples from the same noise and to the "
            "data (VAE reconstructions); KID: kernel distance (mean over subsets) in the same "
            "features; diversity: mean pairwise feature distance over seeds of one prompt.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for key, row in table.items():
            sampler = self._sampler_of(key)
            score = fmt(row, "geneval/overall")
            if "geneval/overall_se" in row:
                score += f" ± {row['geneval/overall_se']:.3f}"
            ratio = f"{100 * row['score_ratio']:.0f} %" if "score_ratio" in row else "–"
            cells = [
                key,
                f"{type(sampler).__name__}({sampler.steps})",
                fmt(row, "nfe", ".0f"),
                fmt(row, "ms_per_image", ".2f"),
                fmt(row, "speedup", ".1f"),
                score,
                "100 %" if key == "teacher" and "geneval/overall" in row else ratio,
                *(fmt(row, f"geneval/{c}") for c in cats),
                *(fmt(row, key, spec) for key, _, spec in FIDELITY_COLUMNS),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + metrics_markdown(table) + unfaithful_notes(table)) + "\n"

    def _log_grids(self) -> None:
        """Teacher | student pairs per step count, as captioned grids: a PNG per step count
        under ``<log_dir>/teacher_vs_student/`` (what the demo report reads) and any logger."""
        teacher = self._grid.get("teacher", [])
        if not teacher:
            return
        folder = log_dir(self.trainer) / GRID_FOLDER
        for n in self.eval_steps:
            student = self._grid.get(f"student_{n}", [])
            tiles, labels = [], []
            for image_t, image_s, caption in zip(teacher, student, self._captions, strict=False):
                tiles += [image_t, image_s]
                labels += [f"teacher: {caption}", f"student {n}-step"]
            grid = captioned_grid(tiles, labels, cols=min(8, len(tiles)), cell=96)
            png = folder / student_grid_name(self.global_step, n)
            log_image(self.trainer, f"val/student_{n}/teacher_vs_student", grid, png)
