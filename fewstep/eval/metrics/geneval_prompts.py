"""GenEval's prompt suite (Ghosh et al. 2023; djghosh13/geneval ``prompts/create_prompts.py``):
its object list (COCO's 80 classes as GenEval names them), colours, relations and the six task
templates, generated with the same random draws so seed 43 gives GenEval's own suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def with_article(name: str) -> str:
    """'a cat' / 'an apple', as GenEval writes it."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """GenEval's plural: 'bus' -> 'buses', else + 's'."""
    return f"{name}es" if name[-1] == "s" else f"{name}s"


def _no_person(index: int, names: tuple[str, ...]) -> int:
    """GenEval's shift that keeps "person" out of colour prompts."""
    return (index + names.index("person")) % len(names) if "person" in names else index


def single_objects(names: tuple[str, ...], rng: np.random.Generator) -> list[dict[str, Any]]:
    """One 'a photo of a X' per class, in a random order."""
    order = rng.choice(len(names), size=len(names), replace=False)
    return [
        {
            "tag": "single_object",
            "include": [{"class": names[i], "count": 1}],
            "prompt": f"a photo of {with_article(names[i])}",
        }
        for i in order
    ]


def two_object(names: tuple[str, ...], rng: np.random.Generator) -> dict[str, Any]:
    """'a photo of a X and a Y'."""
    a, b = rng.choice(len(names), size=2, replace=False)
    return {
        "tag": "two_object",
        "include": [{"class": names[a], "count": 1}, {"class": names[b], "count": 1}],
        "prompt": f"a photo of {with_article(names[a])} and {with_article(names[b])}",
    }


def counting(names: tuple[str, ...], rng: np.random.Generator, max_count: int = 4) -> dict:
    """'a photo of three Xs': exactly N (at least N, fewer than N + 1)."""
    i = rng.choice(len(names))
    n = int(rng.integers(2, max_count, endpoint=True))
    return {
        "tag": "counting",
        "include": [{"class": names[i], "count": n}],
        "exclude": [{"class": names[i], "count": n + 1}],
        "prompt": f"a photo of {NUMBERS[n]} {make_plural(names[i])}",
    }


def colors(names: tuple[str, ...], rng: np.random.Generator) -> dict[str, Any]:
    """'a photo of a red X'."""
    i = _no_person(rng.choice(len(names) - 1) + 1, names)
    color = COLORS[rng.choice(len(COLORS))]
    return {
        "tag": "colors",
        "include": [{"class": names[i], "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {names[i]}",
    }


def position(names: tuple[str, ...], rng: np.random.Generator) -> dict[str, Any]:
    """'a photo of a X left of a Y': X is related to group 0 (Y)."""
    a, b = rng.choice(len(names), size=2, replace=False)
    relation = POSITIONS[rng.choice(len(POSITIONS))]
    return {
        "tag": "position",
        "include": [
            {"class": names[b], "count": 1},
            {"class": names[a], "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of {with_article(names[a])} {relation} {with_article(names[b])}",
    }


def color_attr(names: tuple[str, ...], rng: np.random.Generator) -> dict[str, Any]:
    """'a photo of a red X and a blue Y': each colour bound to its object."""
    idx = rng.choice(len(names) - 1, size=2, replace=False) + 1
    a, b = (_no_person(int(i), names) for i in idx)
    ca, cb = rng.choice(len(COLORS), size=2, replace=False)
    return {
        "tag": "color_attr",
        "include": [
            {"class": names[a], "count": 1, "color": COLORS[ca]},
            {"class": names[b], "count": 1, "color": COLORS[cb]},
        ],
        "prompt": f"a photo of {with_article(COLORS[ca])} {names[a]} and "
        f"{with_article(COLORS[cb])} {names[b]}",
    }


def geneval_suite(
    seed: int = 43, per_task: int = 100, names: tuple[str, ...] = CLASSNAMES
) -> list[dict[str, Any]]:
    """GenEval's evaluation metadata: every class once, then ``per_task`` prompts of each
    other task, de-duplicated in order (553 prompts for the defaults)."""
    rng = np.random.default_rng(seed)
    samples = single_objects(names, rng)
    for make in (two_object, counting, colors, position, color_attr):
        samples += [make(names, rng) for _ in range(per_task)]
    unique, seen = [], set()
    for sample in samples:
        key = json.dumps(sample, sort_keys=True)
        if key not in seen:
            unique.append(sample)
            seen.add(key)
    return unique


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts of a file: GenEval metadata (.jsonl, one JSON object with ``prompt`` per line)
    or plain text (one prompt per line, no GenEval requirements)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if Path(path).suffix == ".jsonl":
        return [json.loads(line) for line in lines]
    return [{"prompt": line.strip()} for line in lines]
