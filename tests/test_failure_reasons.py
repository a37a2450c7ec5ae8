"""bench/failure_reasons.py: the scorer's reasons fall in the right groups, and the prompt set
holds each category equally, reproducibly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_scripts import load_bench

from fewstep.data.prompts import CATEGORIES, RELATIONS, caption_of, make_spec, obj, spec_of
from fewstep.eval.detect import Detection
from fewstep.eval.geneval import judge, score_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reasons():
    return load_bench("failure_reasons")


def _detection(shape: str, color: str, x: float, y: float) -> Detection:
    return Detection(shape, color, 100.0, x, y, (x - 5, y - 5, x + 5, y + 5), 1.0, 0.0)


def test_each_scorer_reason_lands_in_its_group(reasons):
    circle_left = make_spec("position", [obj("circle"), obj("square")], "left of")
    red_circle = make_spec("colors", [obj("circle", color="red")])
    cases = {
        "objects": judge([], red_circle)[1],
        "colour": judge([_detection("circle", "blue", 30, 30)], red_circle)[1],
        "relation": judge(
            [_detection("circle", "red", 50, 30), _detection("square", "blue", 10, 30)],
            circle_left,
        )[1],
        "correct": judge(
            [_detection("circle", "red", 10, 30), _detection("square", "blue", 50, 30)],
            circle_left,
        )[1],
    }
    for group, reason in cases.items():
        assert reasons.reason_group(reason) == group, reason
    speckle = np.random.default_rng(0).random((64, 64, 3))
    ok, reason = score_image(speckle, red_circle)
    assert not ok and reasons.reason_group(reason) == "clutter", reason


def test_prompts_hold_each_category_equally_and_reproducibly(reasons):
    pairs = reasons.prompts(5, seed=3)
    assert Counter(spec["category"] for _, spec in pairs) == {c: 5 for c in CATEGORIES}
    assert pairs == reasons.prompts(5, seed=3) and pairs != reasons.prompts(5, seed=4)
    only = reasons.prompts(5, seed=3, categories=("position",))
    assert only == [p for p in pairs if p[1]["category"] == "position"]
    for caption, spec in pairs:
        assert caption == caption_of(spec) and spec_of(caption)["category"] == spec["category"]


def test_drawn_relation_tells_the_mirror_from_the_other_axis(reasons):
    spec = make_spec("position", [obj("circle"), obj("square")], "left of")
    circle, square = "circle", "square"
    layouts = {
        "asked": [_detection(circle, "red", 10, 30), _detection(square, "blue", 50, 30)],
        "mirrored": [_detection(circle, "red", 50, 30), _detection(square, "blue", 10, 30)],
        "other axis": [_detection(circle, "red", 30, 10), _detection(square, "blue", 30, 50)],
        "none clear": [_detection(circle, "red", 30, 30), _detection(square, "blue", 31, 31)],
    }
    for expected, detections in layouts.items():
        assert reasons.drawn_relation(detections, spec) == expected
    assert reasons.drawn_relation(layouts["asked"][:1], spec) is None
    below = make_spec("position", [obj("square"), obj("circle")], "below")
    assert reasons.drawn_relation(layouts["other axis"], below) == "asked"
    assert set(reasons.MIRROR) == set(reasons.MIRROR.values()) == set(RELATIONS)


def test_tally_scores_every_prompt_and_tracks_the_drawn_relation(reasons, tmp_path):
    from student_fixtures import build_tiny_teacher

    teacher = build_tiny_teacher(tmp_path)
    categories = ("position", "colors")
    counts, details = reasons.tally(
        str(teacher.config), str(teacher.ckpt), 3, seed=0, batch=4, categories=categories
    )
    assert {c: sum(counts[c].values()) for c in categories} == {c: 3 for c in categories}
    assert sum(details["drawn relation"].values()) == 3  # one per position prompt
    assert set(details["drawn relation"]) <= {*reasons.DRAWN, "a shape missing"}


def test_an_mmdit_teacher_gets_its_pooled_text(reasons, tmp_path):
    """A teacher trained on the mean MiniLM token as its pooled vector (the MMDiT recipe) is
    sampled with it, for the prompts and the null caption; it equals the datamodule's."""
    from student_fixtures import build_tiny_cache, build_tiny_vae, train_flux_teacher

    from fewstep.models.text_encoder import TextEncoder

    vae = build_tiny_vae(tmp_path / "vae")
    teacher = train_flux_teacher(tmp_path, build_tiny_cache(tmp_path / "c", vae, 8), vae, False)
    assert reasons.takes_mean_tokens(str(teacher.config))
    counts, _ = reasons.tally(str(teacher.config), str(teacher.ckpt), 2, 0, 4, ("colors",))
    assert sum(counts["colors"].values()) == 2
    text, mask = TextEncoder(None, max_length=32)(["a photo of a red circle", "a square"])
    mine = reasons.pooled(text, mask)
    for row, tokens, valid in zip(mine, text, mask, strict=True):
        assert torch.allclose(row, tokens[: int(valid.sum())].mean(0), atol=1e-6)
