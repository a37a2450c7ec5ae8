"""GenEval's decision rules (Ghosh et al. 2023; djghosh13/geneval ``evaluate_images.py``) over
boxes from any detector: which detections count (score thresholds, per-class cap, optional
NMS), then presence, counts, colours, relative position (the shapes scorer's
``relative_position`` with GenEval's margin) and colour binding for one image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fewstep.eval.geneval import relative_position

THRESHOLD = 0.3  # GenEval's detection score threshold
COUNTING_THRESHOLD = 0.9  # ... for counting prompts
MAX_OBJECTS = 16  # detections kept per class
NMS_THRESHOLD = 1.0  # IoU above which a weaker box of the same class is dropped (1: no NMS)


@dataclass(frozen=True)
class BoxDetection:
    """One detected object: class name, confidence, box (x0, y0, x1, y1) in pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU with GenEval's inclusive-pixel areas ((x1 - x0 + 1) * (y1 - y0 + 1))."""

    def area(box: tuple[float, ...]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_detections(
    detections: list[BoxDetection],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[BoxDetection]]:
    """Per class, the detections above the tag's threshold, most confident first, at most
    ``max_objects``, greedily suppressing same-class boxes with IoU >= ``nms_threshold``."""
    cutoff = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[BoxDetection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        if det.score > cutoff:
            by_class.setdefault(det.label, []).append(det)
    kept = {}
    for label, ordered in by_class.items():
        ordered, chosen = ordered[:max_objects], []
        while ordered:
            best = ordered.pop(0)
            chosen.append(best)
            if nms_threshold < 1:
                ordered = [d for d in ordered if box_iou(best.box, d.box) < nms_threshold]
        kept[label] = chosen
    return kept


ColorOf = Callable[[list[BoxDetection], str], list[str]]  # (boxes, class) -> a colour per box


def judge(
    detected: dict[str, list[BoxDetection]], metadata: dict[str, Any], color_of: ColorOf
) -> tuple[bool, list[str]]:
    """GenEval's ``evaluate``: every ``include`` clause must hold on the ``count`` most confident
    boxes of its class (colour on those boxes; position against each box of the target group),
    and no ``exclude`` clause may (at least ``count`` boxes). Returns (correct, reasons)."""
    reasons: list[str] = []
    groups: list[list[BoxDetection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = detected.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if matched and "color" in req:
            colors = color_of(found, name)
            if colors.count(req["color"]) < count:
                matched = False
                reasons.append(f"expected {req['color']} {name}>={count}, found {colors}")
        if matched and "position" in req:
            relation, target = req["position"]
            matched = _positioned(found, groups[target], relation)
            if not matched:
                reasons.append(f"expected {name} {relation} target {target}")
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        found = detected.get(req["class"], [])
        if len(found) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(found)}")
    return not reasons, reasons


def _positioned(
    found: list[BoxDetection], targets: list[BoxDetection] | None, relation: str
) -> bool:
    """Every found box stands in ``relation`` to every target box (False: no target)."""
    if targets is None:
        return False
    return all(relation in relative_position(a, b) for a in found for b in targets)
