"""Shapes-world vocabulary and GenEval-style prompt specs (Ghosh et al. 2023, GenEval).

A *spec* is a JSON-serialisable dict that says what an image must show::

    {"category": "position",
     "objects": [{"shape": "square", "count": 1, "color": None},
                 {"shape": "circle", "count": 1, "color": None}],
     "relation": "left of"}          # objects[0] <relation> objects[1]

Captions are rendered from specs and parsed back, so a caption alone is enough to score
an image.
"""

from __future__ import annotations

import re
from typing import Any

Spec = dict[str, Any]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Six saturated colours 60 degrees apart in hue (RGB in [0, 1]); backgrounds are grey.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "yellow": (0.92, 0.86, 0.10),
    "green": (0.12, 0.78, 0.14),
    "cyan": (0.10, 0.80, 0.88),
    "blue": (0.14, 0.24, 0.92),
    "magenta": (0.86, 0.14, 0.86),
}
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PREFIX = "a photo of "


def obj(shape: str, count: int = 1, color: str | None = None) -> dict[str, Any]:
    """One object requirement of a spec."""
    return {"shape": shape, "count": count, "color": color}


def make_spec(category: str, objects: list[dict[str, Any]], relation: str | None = None) -> Spec:
    """Build a validated spec."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    spec: Spec = {"category": category, "objects": objects}
    if relation is not None:
        spec["relation"] = relation
    return spec


def _phrase(o: dict[str, Any]) -> str:
    """'a red circle' / 'three squares'."""
    color = f"{o['color']} " if o.get("color") else ""
    if o["count"] == 1:
        return f"a {color}{o['shape']}"
    return f"{NUMBERS[o['count']]} {color}{o['shape']}s"


def caption_of(spec: Spec) -> str:
    """Render a spec as a GenEval-style caption."""
    objects = spec["objects"]
    if spec["category"] == "position":
        return f"{PREFIX}{_phrase(objects[0])} {spec['relation']} {_phrase(objects[1])}"
    return PREFIX + " and ".join(_phrase(o) for o in objects)


_WORD_TO_COUNT = {w: n for n, w in NUMBERS.items()} | {"a": 1, "an": 1}
_PHRASE = re.compile(r"^(a|an|one|two|three|four|five) (?:(\w+) )?(\w+?)s?$")


def _parse_phrase(text: str, caption: str) -> dict[str, Any]:
    match = _PHRASE.match(text.strip())
    if not match:
        raise ValueError(f"cannot parse {text!r} in caption {caption!r}")
    count_word, color, shape = match.groups()
    if shape not in SHAPES or (color is not None and color not in COLORS):
        raise ValueError(f"unknown shape or colour in {text!r} (caption {caption!r})")
    return obj(shape, _WORD_TO_COUNT[count_word], color)


def spec_of(caption: str) -> Spec:
    """Parse a caption written by :func:`caption_of` back into its spec."""
    text = caption.strip().lower().rstrip(".")
    if not text.startswith(PREFIX):
        raise ValueError(f"caption {caption!r} does not start with {PREFIX!r}")
    body = text[len(PREFIX) :]
    for relation in RELATIONS:
        if f" {relation} " in body:
            left, right = body.split(f" {relation} ", 1)
            objects = [_parse_phrase(left, caption), _parse_phrase(right, caption)]
            return make_spec("position", objects, relation)
    objects = [_parse_phrase(part, caption) for part in body.split(" and ")]
    return make_spec(_infer_category(objects), objects)


def _infer_category(objects: list[dict[str, Any]]) -> str:
    if len(objects) == 2:
        return "color_attr" if all(o["color"] for o in objects) else "two_object"
    (only,) = objects
    if only["count"] > 1:
        return "counting"
    return "colors" if only["color"] else "single_object"


def minimal_alterations(spec: Spec) -> list[Spec]:
    """Every spec that differs from ``spec`` in one colour, shape, count or relation.

    Shapes change only to shapes the spec does not name, and counts stay in 2..5 for
    counting prompts, so that an image of ``spec`` never satisfies an alteration.
    """
    named = {o["shape"] for o in spec["objects"]}
    out: list[Spec] = []
    for i, o in enumerate(spec["objects"]):
        for shape in SHAPES:
            if shape not in named:
                out.append(_replace(spec, i, shape=shape))
        if o.get("color"):
            out += [_replace(spec, i, color=c) for c in COLORS if c != o["color"]]
        if spec["category"] == "counting":
            out += [_replace(spec, i, count=n) for n in (o["count"] - 1, o["count"] + 1) if n >= 2]
    if spec.get("relation"):
        out += [
            make_spec(spec["category"], [dict(o) for o in spec["objects"]], r)
            for r in RELATIONS
            if r != spec["relation"]
        ]
    return out


def _replace(spec: Spec, i: int, **change: Any) -> Spec:
    objects = [dict(o) for o in spec["objects"]]
    objects[i].update(change)
    return make_spec(spec["category"], objects, spec.get("relation"))
