"""GenEval with a detector: GenEval's rules on hand-made detection lists (one test per rule),
the detection selection, the prompt suite, and the metric end to end on a tiny OWLv2 + CLIP."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_metric_models import make_tiny_clip, make_tiny_owlv2

from fewstep.eval.metrics import DetectorGenEval
from fewstep.eval.metrics.geneval_prompts import CLASSNAMES, geneval_suite, make_plural
from fewstep.eval.metrics.geneval_rules import BoxDetection, box_iou, judge, select_detections
from fewstep.eval.metrics.weights import MissingWeightsError


def det(label: str, box: tuple[float, float, float, float], score: float = 0.95) -> BoxDetection:
    return BoxDetection(label, score, box)


def painted(colors: dict[tuple, str]):
    """A colour classifier that reads each box's colour from a table (what CLIP would say)."""
    return lambda boxes, name: [colors.get(b.box, "white") for b in boxes]


def verdict(dets: list[BoxDetection], meta: dict, colors: dict | None = None) -> bool:
    chosen = select_detections(dets, meta["tag"])
    return judge(chosen, meta, painted(colors or {}))[0]


CAT, DOG = (10, 10, 30, 30), (60, 10, 80, 30)


def test_presence_single_object() -> None:
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert verdict([det("cat", CAT)], meta)
    assert not verdict([det("dog", DOG)], meta)
    assert not verdict([det("cat", CAT, score=0.2)], meta)  # under GenEval's 0.3 threshold


def test_two_objects_need_both() -> None:
    meta = geneval_meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert verdict([det("cat", CAT), det("dog", DOG)], meta)
    assert not verdict([det("cat", CAT)], meta)


def geneval_meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"tag": tag, "include": include, **({"exclude": exclude} if exclude else {})}


def test_counting_is_exact_with_the_counting_threshold() -> None:
    meta = geneval_meta("counting", [{"class": "cat", "count": 3}], [{"class": "cat", "count": 4}])
    cats = [det("cat", (10 * i, 0, 10 * i + 8, 8), 0.95) for i in range(4)]
    assert verdict(cats[:3], meta)
    assert not verdict(cats, meta)  # four: the exclude clause
    assert not verdict(cats[:2], meta)  # two: too few
    weak = [*cats[:3], det("cat", (90, 0, 98, 8), 0.8)]  # 0.8 < 0.9: not counted
    assert verdict(weak, meta)


def test_colour_is_checked_on_the_most_confident_box() -> None:
    meta = geneval_meta("colors", [{"class": "cat", "count": 1, "color": "red"}])
    red, blue = (0, 0, 10, 10), (50, 50, 60, 60)
    colors = {red: "red", blue: "blue"}
    assert verdict([det("cat", red, 0.9), det("cat", blue, 0.5)], meta, colors)
    assert not verdict([det("cat", red, 0.5), det("cat", blue, 0.9)], meta, colors)


def test_relative_position_with_its_margin() -> None:
    meta = geneval_meta(
        "position",
        [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    )
    assert verdict([det("cat", CAT), det("dog", DOG)], meta)  # cat clearly left of the dog
    assert not verdict([det("cat", DOG), det("dog", CAT)], meta)  # right of it
    # Centres 3 px apart, boxes 20 px wide: inside the 0.1 * (20 + 20) = 4 px margin.
    near = [det("cat", (10, 10, 30, 30)), det("dog", (13, 10, 33, 30))]
    assert not verdict(near, meta)
    meta["include"][1]["position"] = ["above", 0]
    assert not verdict([det("cat", CAT), det("dog", DOG)], meta)  # level: neither above


def test_colour_binding_needs_each_colour_on_its_object() -> None:
    meta = geneval_meta(
        "color_attr",
        [
            {"class": "cat", "count": 1, "color": "red"},
            {"class": "dog", "count": 1, "color": "blue"},
        ],
    )
    dets = [det("cat", CAT), det("dog", DOG)]
    assert verdict(dets, meta, {CAT: "red", DOG: "blue"})
    assert not verdict(dets, meta, {CAT: "blue", DOG: "red"})  # colours swapped


def test_selection_caps_and_suppresses() -> None:
    boxes = [det("cat", (0, 0, 10, 10), 0.9), det("cat", (1, 0, 11, 10), 0.8)]
    assert len(select_detections(boxes, "single_object")["cat"]) == 2  # GenEval: no NMS
    kept = select_detections(boxes, "single_object", nms_threshold=0.5)["cat"]
    assert [d.score for d in kept] == [0.9]
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    many = [det("cat", (i, 0, i + 1, 1), 0.5 + i / 100) for i in range(20)]
    assert len(select_detections(many, "single_object")["cat"]) == 16


def test_suite_follows_geneval_templates() -> None:
    suite = geneval_suite()
    assert len(suite) == 553  # GenEval's published prompt count for seed 43
    tags = Counter(s["tag"] for s in suite)
    assert tags["single_object"] == len(CLASSNAMES) == 80
    counting = next(s for s in suite if s["tag"] == "counting")
    n, name = counting["include"][0]["count"], counting["include"][0]["class"]
    assert counting["exclude"] == [{"class": name, "count": n + 1}]
    assert counting["prompt"].endswith(make_plural(name)) and make_plural("bus") == "buses"
    assert all("person" not in s["prompt"] for s in suite if s["tag"] in ("colors", "color_attr"))


def test_detector_geneval_end_to_end(tmp_path) -> None:
    owl, clip = make_tiny_owlv2(tmp_path / "owl"), make_tiny_clip(tmp_path / "clip")
    metric = DetectorGenEval(str(owl), str(clip), threshold=0.0, counting_threshold=0.0)
    suite = geneval_suite(per_task=2)
    meta = [suite[0], suite[80], suite[83], {"caption only": True}]  # single, two, counting
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metric.update(images, meta)
    pictures = list(((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    raw = metric.detector(pictures[:3], 0.0)
    assert all(raw) and all(d.label in CLASSNAMES for d in raw[0])
    expected = [metric.judge_one(p, d, m) for p, d, m in zip(pictures, raw, meta, strict=False)]
    scores = metric.compute()
    assert set(scores) == {"single_object", "two_object", "counting", "overall"}
    got = [scores[m["tag"]] for m in meta[:3]]
    assert got == [float(e) for e in expected]
    rank0 = DetectorGenEval(str(owl), str(clip), threshold=0.0, counting_threshold=0.0)
    rank1 = DetectorGenEval(str(owl), str(clip), threshold=0.0, counting_threshold=0.0)
    rank0.update(images[:2], meta[:2])
    rank1.update(images[2:], meta[2:])
    rank0.merge_state(rank1)
    assert torch.equal(rank0.total, metric.total) and torch.equal(rank0.correct, metric.correct)


def test_missing_detector_folder(tmp_path) -> None:
    clip = make_tiny_clip(tmp_path / "clip")
    with pytest.raises(MissingWeightsError, match="absent"):
        DetectorGenEval(str(tmp_path / "absent"), str(clip))
