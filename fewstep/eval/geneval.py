"""GenEval-protocol scoring of shapes-world images (Ghosh et al. 2023, GenEval §3): object
presence, exact counts, colours, relative position with a margin, colour binding."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from fewstep.data.prompts import CATEGORIES, Spec, spec_of
from fewstep.eval.detect import Detection, Scene, analyse

POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the two boxes' summed sizes


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` to ``b`` from box centres, with GenEval's size-scaled margin."""
    boxes = np.array([a.box, b.box]).reshape(2, 2, 2)  # object, corner, xy
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0)
    revised = revised * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def judge(detections: list[Detection], spec: Spec) -> tuple[bool, str]:
    """Apply GenEval's rules for one image; returns (correct, reason)."""
    groups = []
    for req in spec["objects"]:
        found = [d for d in detections if d.shape == req["shape"]]
        if spec["category"] == "counting" and len(found) != req["count"]:
            return False, f"expected {req['count']} {req['shape']}(s), found {len(found)}"
        if len(found) < req["count"]:
            return False, f"expected {req['count']} {req['shape']}(s), found {len(found)}"
        if req.get("color"):
            found = [d for d in found if d.color == req["color"]]
            if len(found) < req["count"]:
                return False, f"no {req['color']} {req['shape']}"
        groups.append(found)
    relation = spec.get("relation")
    if relation:
        for a in groups[0]:
            for b in groups[1]:
                if relation not in relative_position(a, b):
                    return False, f"{spec['objects'][0]['shape']} not {relation} the other"
    return True, "correct"


def score_image(image: np.ndarray, spec: Spec | str) -> tuple[bool, str]:
    """Judge one HxWx3 image (uint8 or float [0,1]) against a spec or a caption."""
    return score_scene(analyse(image), spec)


def score_scene(scene: Scene, spec: Spec | str) -> tuple[bool, str]:
    """Judge an analysed image (``analyse``) against a spec or a caption."""
    spec = spec_of(spec) if isinstance(spec, str) else spec
    if scene.cluttered:  # a detector sees no scene in speckle: fail, whatever blobs match
        return False, f"cluttered: {scene.stray:.1%} of the image is colour outside objects"
    return judge(scene.objects, spec)


def specs_of(metadata: list[Any]) -> list[dict | None]:
    """The shapes-world spec of each sample's metadata, or None where there is none."""
    return [m.get("spec") if isinstance(m, dict) else None for m in metadata]


@dataclass
class GenEvalReport:
    """Per-category accuracy and the overall mean over categories, as GenEval reports."""

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, category: str, ok: bool) -> None:
        self.total[category] += 1
        self.correct[category] += int(ok)

    @property
    def per_category(self) -> dict[str, float]:
        return {c: self.correct[c] / self.total[c] for c in CATEGORIES if self.total[c]}

    @property
    def overall(self) -> float:
        scores = list(self.per_category.values())
        return float(np.mean(scores)) if scores else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**self.per_category, "overall": self.overall}

    def table(self) -> str:
        """Markdown table of the scores."""
        lines = ["| category | accuracy | n |", "|---|---|---|"]
        for c, acc in self.per_category.items():
            lines.append(f"| {c} | {acc:.3f} | {self.total[c]} |")
        lines.append(f"| **overall** | **{self.overall:.3f}** | {sum(self.total.values())} |")
        return "\n".join(lines)


def evaluate(images: Iterable[np.ndarray], specs: Iterable[Spec | str]) -> GenEvalReport:
    """Score a set of images against their specs (or captions)."""
    report = GenEvalReport()
    for image, spec in zip(images, specs, strict=True):
        spec = spec_of(spec) if isinstance(spec, str) else spec
        report.add(spec["category"], score_image(image, spec)[0])
    return report


def tensor_to_hwc(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] tensor in [-1,1] -> HxWx3 float array in [0,1]."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


class ShapesGenEval(Metric):
    """torchmetrics wrapper: accumulates per-category correctness across batches and ranks."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(CATEGORIES)
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: list[Spec | str]) -> None:
        """images: [B,3,H,W] in [-1,1]; prompts: specs or captions."""
        for image, prompt in zip(images, prompts, strict=True):
            spec = spec_of(prompt) if isinstance(prompt, str) else prompt
            k = CATEGORIES.index(spec["category"])
            self.total[k] += 1
            self.correct[k] += int(score_image(tensor_to_hwc(image), spec)[0])

    def compute(self) -> dict[str, torch.Tensor]:
        """Accuracy per category, ``overall`` (their mean, as GenEval) and ``overall_se``, its
        standard error over prompts: sqrt(sum_c p_c (1 - p_c) / n_c) / C."""
        seen = self.total > 0
        acc = self.correct.float() / self.total.clamp(min=1)
        out = {c: acc[k] for k, c in enumerate(CATEGORIES) if seen[k]}
        nan = torch.tensor(float("nan"))
        out["overall"] = acc[seen].mean() if seen.any() else nan
        variance = (acc * (1 - acc) / self.total.clamp(min=1))[seen]  # binomial, per category
        out["overall_se"] = variance.sum().sqrt() / seen.sum() if seen.any() else nan
        return out
