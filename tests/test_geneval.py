"""The GenEval-protocol scorer must be trustworthy: the accuracy bars of issue 2."""

import numpy as np
import pytest
import torch

from fewstep.data.prompts import CATEGORIES, COLORS, caption_of, minimal_alterations, spec_of
from fewstep.data.shapes import ShapesWorld
from fewstep.eval.detect import Detection, analyse, detect_objects
from fewstep.eval.geneval import (
    GenEvalReport,
    ShapesGenEval,
    evaluate,
    judge,
    relative_position,
    score_image,
)
from fewstep.tools.shapes_preview import score_renders

N = 240  # 40 per category on average


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_clean_renders_at_least_99_percent_every_category(resolution):
    report = score_renders(ShapesWorld(size=N, resolution=resolution, seed=11), N, False)
    assert set(report.per_category) == set(CATEGORIES)
    assert min(report.per_category.values()) >= 0.99, report.table()


@pytest.mark.parametrize("resolution", [64, 128])
def test_degraded_renders_at_least_95_percent_every_category(resolution):
    report = score_renders(ShapesWorld(size=N, resolution=resolution, seed=12), N, True)
    assert min(report.per_category.values()) >= 0.95, report.table()


def test_degraded_32px_is_reported_and_above_chance():
    report = score_renders(ShapesWorld(size=N, resolution=32, seed=12), N, True)
    print("\n32 px blur+noise:\n" + report.table())
    assert report.overall > 0.6


@pytest.mark.parametrize("resolution", [32, 64])
def test_minimally_altered_captions_are_rejected(resolution):
    world = ShapesWorld(size=150, resolution=resolution, seed=13)
    rng = np.random.default_rng(0)
    rejected = []
    for i in range(150):
        image, spec, _ = world.render(i)
        alterations = minimal_alterations(spec)
        assert alterations, spec
        wrong = alterations[rng.integers(len(alterations))]
        rejected.append(not score_image(image, caption_of(wrong))[0])
    assert np.mean(rejected) >= 0.97


def test_alterations_change_exactly_one_thing():
    spec = spec_of("a photo of a red circle and a blue square")
    for alt in minimal_alterations(spec):
        diffs = sum(a != b for a, b in zip(alt["objects"], spec["objects"], strict=True))
        assert diffs == 1


def test_caption_spec_round_trip_all_categories():
    world = ShapesWorld(size=120, resolution=32, seed=4)
    for i in range(120):
        spec = world.render(i)[1]
        assert spec_of(caption_of(spec)) == spec


def test_unparseable_caption_is_a_clear_error():
    with pytest.raises(ValueError, match="a photo of"):
        spec_of("an image of a dog")
    with pytest.raises(ValueError, match="unknown shape"):
        spec_of("a photo of a dog")


def test_blank_image_fails_every_prompt():
    blank = np.full((64, 64, 3), 0.5, np.float32)
    assert detect_objects(blank) == []
    ok, reason = score_image(blank, "a photo of a circle")
    assert not ok and "found 0" in reason


def _det(shape, x, y, size=10.0):
    box = (x - size / 2, y - size / 2, x + size / 2, y + size / 2)
    return Detection(shape, "red", size * size, x, y, box, 1.0, 0.0)


def test_relative_position_follows_geneval_margin():
    assert relative_position(_det("circle", 10, 50), _det("square", 50, 50)) == {"left of"}
    assert relative_position(_det("circle", 50, 90), _det("square", 50, 50)) == {"below"}
    # offsets inside the margin (0.1 x summed box sizes) give no relation
    assert relative_position(_det("circle", 51, 50), _det("square", 50, 50)) == set()


def test_counting_requires_exact_count_and_extra_objects_do_not_hurt_others():
    dets = [_det("square", 10, 10), _det("square", 40, 40), _det("square", 70, 70)]
    assert judge(dets, spec_of("a photo of three squares"))[0]
    assert not judge(dets, spec_of("a photo of two squares"))[0]
    assert judge(dets, spec_of("a photo of a square"))[0]  # GenEval: at least one


def test_report_and_metric_agree():
    world = ShapesWorld(size=30, resolution=32, seed=5)
    samples = [world[i] for i in range(30)]
    # corrupt a third of the images so that scores are not all ones
    images = torch.stack(
        [s["image"] if i % 3 else -torch.ones(3, 32, 32) for i, s in enumerate(samples)]
    )
    metric = ShapesGenEval()
    metric.update(images[:15], [s["caption"] for s in samples[:15]])
    metric.update(images[15:], [s["metadata"]["spec"] for s in samples[15:]])
    result = metric.compute()
    report = evaluate(
        [((im + 1) / 2).permute(1, 2, 0).numpy() for im in images],
        [s["caption"] for s in samples],
    )
    assert isinstance(report, GenEvalReport)
    assert 0 < report.overall < 1
    assert result["overall"].item() == pytest.approx(report.overall)
    for category, acc in report.per_category.items():
        assert result[category].item() == pytest.approx(acc)
    assert "overall" in report.table()


def _speckle(seed: int, size: int = 64) -> np.ndarray:
    """Gray background strewn with small blobs of every palette colour (an untrained model's
    sample): dozens of coloured components, none of them a shapes-world object."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 0.5, np.float32)
    palette = list(COLORS.values())
    for _ in range(40):
        y, x = rng.integers(0, size - 5, size=2)
        image[y : y + 5, x : x + 5] = palette[rng.integers(len(palette))]
    return image


def test_speckle_is_clutter_and_fails_even_lenient_prompts():
    for seed in range(5):
        image = _speckle(seed)
        scene = analyse(image)
        assert scene.cluttered  # overlapping blobs may still form an "object"
        for caption in ("a photo of a circle", "a photo of a red square", "a photo of a triangle"):
            ok, reason = score_image(image, caption)
            assert not ok and "cluttered" in reason


def test_clean_renders_have_no_stray_colour():
    world = ShapesWorld(size=40, resolution=64, seed=9)
    for i in range(40):
        image, spec, _ = world.render(i)
        scene = analyse(image)
        assert not scene.cluttered and scene.stray < 0.005
        assert score_image(image, spec)[0]


def test_overall_standard_error_is_the_binomial_formula():
    import math

    import torch

    from fewstep.data.prompts import CATEGORIES
    from fewstep.eval.geneval import ShapesGenEval

    metric = ShapesGenEval()
    correct, total = [3, 0, 5, 2, 1, 4], [4, 2, 5, 4, 3, 8]
    metric.correct, metric.total = torch.tensor(correct), torch.tensor(total)
    out = metric.compute()
    p = [c / n for c, n in zip(correct, total, strict=True)]
    expected = math.sqrt(sum(q * (1 - q) / n for q, n in zip(p, total, strict=True))) / 6
    assert float(out["overall_se"]) == pytest.approx(expected)
    assert float(out["overall"]) == pytest.approx(sum(p) / len(CATEGORIES))
