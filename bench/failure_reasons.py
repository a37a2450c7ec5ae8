"""Why a teacher fails, per GenEval category: samples ``--per-category`` fresh shapes-world
prompts of each category (seeded), draws one image each at the fit YAML's sampler and CFG (EMA
weights) and tallies the scorer's first failure reason, grouped (missing or extra objects, wrong
colour, wrong relation, clutter). Position at chance with both objects drawn reads as "wrong
relation" ~3/4 of the time; a missing-object teacher reads as "count". For position prompts with
both shapes drawn it also tells which relation was drawn: the asked one, its mirror (the right
axis, the objects swapped: what a bag-of-words text path gets half the time), the other axis, or
none clear. A teacher that reads the relation word but not the word order draws "asked" and
"mirrored" alike and "other axis" never; one that ignores the relation draws all three alike.

    python bench/failure_reasons.py FIT_YAML CKPT [--per-category 64] [--seed 1]
        [--categories counting,position] [--detail 5] [--cfg 1]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import numpy as np
import torch

from fewstep.data.datamodule import mean_tokens
from fewstep.data.prompts import CATEGORIES, caption_of
from fewstep.data.shapes import sample_spec
from fewstep.eval.detect import Detection, analyse
from fewstep.eval.geneval import relative_position, score_scene, tensor_to_hwc
from fewstep.lightning.checkpoints import load_trained
from fewstep.lightning.sampling import as_null_text
from fewstep.models.text_encoder import TextEncoder
from fewstep.tools.couplings import data_args
from fewstep.tools.export import latent_size
from fewstep.tools.generate_images import latent_shape
from fewstep.utils.seeding import fixed_noise

GROUPS = (
    ("correct", r"^correct$"),
    ("objects", r"^expected "),
    ("colour", r"^no "),
    ("relation", r" not "),
    ("clutter", r"^cluttered"),
)
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DRAWN = ("asked", "mirrored", "other axis", "none clear")


def reason_group(reason: str) -> str:
    """The failure group of one scorer reason."""
    return next((name for name, pattern in GROUPS if re.search(pattern, reason)), "other")


def drawn_relation(detections: list[Detection], spec: dict) -> str | None:
    """Which relation a position image drew between its first detected shape of each kind (one
    of ``DRAWN``), or None where either shape is missing."""
    first, second = (
        next((d for d in detections if d.shape == o["shape"]), None) for o in spec["objects"]
    )
    if first is None or second is None:
        return None
    drawn = relative_position(first, second)
    asked = spec["relation"]
    if asked in drawn:
        return "asked"
    if MIRROR[asked] in drawn:
        return "mirrored"
    return "other axis" if drawn else "none clear"


def takes_mean_tokens(config: str) -> bool:
    """Whether the fit YAML's teacher takes the mean text token as its pooled vector (an MMDiT
    trained with ``data.init_args.pooled_text: mean_tokens``)."""
    return data_args(config).get("pooled_text") == "mean_tokens"


def pooled(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each caption's valid tokens [B, D], as the datamodule's ``mean_tokens``."""
    rows = [t[m.bool()].numpy() for t, m in zip(text, mask, strict=True)]
    return torch.from_numpy(mean_tokens(rows, text.shape[-1]))


def sample_shape(module: torch.nn.Module, config: str) -> tuple[int, int, int]:
    """(C, h, w) of the latents to sample: the DiT's own size, or for an MMDiT (no fixed size)
    the size of the cache it trained on."""
    if hasattr(module.network, "base_size"):
        return latent_shape(module)
    return (module.network.in_channels, *latent_size(config))


def prompts(
    per_category: int, seed: int, categories: tuple[str, ...] = CATEGORIES
) -> list[tuple[str, dict]]:
    """(caption, spec) pairs, ``per_category`` of each category, from a seeded generator (one
    per category, so a category's prompts do not depend on which others are asked for)."""
    return [
        (caption_of(spec), spec)
        for category in categories
        for rng in [np.random.default_rng([seed, CATEGORIES.index(category)])]
        for spec in (sample_spec(category, rng) for _ in range(per_category))
    ]


def tally(
    config: str,
    ckpt: str,
    per_category: int,
    seed: int,
    batch: int,
    categories: tuple[str, ...] = CATEGORIES,
    guidance_scale: float | None = None,
) -> tuple[dict[str, Counter], dict[str, Counter]]:
    """({category: Counter(group)}, {category: Counter(reason)}) over the sampled prompts, at
    the fit YAML's CFG scale or ``guidance_scale``; details["drawn relation"] counts
    ``drawn_relation`` over the position prompts."""
    module, _, _ = load_trained(config, ckpt)
    module.eval()
    if guidance_scale is not None:
        module.guidance_scale = guidance_scale
    encoder = TextEncoder(None, max_length=32)  # as configs/cache/shapes.yaml
    with_pooled = takes_mean_tokens(config)
    null_text, null_mask = encoder.null_embedding()
    null_pooled = pooled(null_text, null_mask) if with_pooled else None
    module._null_text = as_null_text((null_text, null_mask, null_pooled))
    pairs, shape = prompts(per_category, seed, categories), sample_shape(module, config)
    counts: dict[str, Counter] = {c: Counter() for c in categories}
    details: dict[str, Counter] = {c: Counter() for c in (*categories, "drawn relation")}
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        with torch.no_grad():
            text, mask = encoder([c for c, _ in chunk])
            noise = fixed_noise(shape, range(start, start + len(chunk)), seed)
            cond = pooled(text, mask) if with_pooled else None
            images = module.decode(module.sample_latents(text, mask.bool(), noise, cond=cond))
        for (_, spec), image in zip(chunk, images, strict=True):
            scene = analyse(tensor_to_hwc(image))
            _, reason = score_scene(scene, spec)
            counts[spec["category"]][reason_group(reason)] += 1
            details[spec["category"]][reason] += 1
            if spec["category"] == "position":
                drawn = drawn_relation(scene.objects, spec)
                details["drawn relation"][drawn or "a shape missing"] += 1
    return counts, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("ckpt")
    parser.add_argument("--per-category", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated")
    parser.add_argument("--detail", type=int, default=0, help="print the N commonest reasons")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the YAML's)")
    args = parser.parse_args()
    categories = tuple(args.categories.split(","))
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        parser.error(f"--categories: unknown {sorted(unknown)}; use {','.join(CATEGORIES)}")
    counts, details = tally(
        args.config, args.ckpt, args.per_category, args.seed, args.batch, categories, args.cfg
    )
    names = [name for name, _ in GROUPS] + ["other"]
    print("| category | n | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for category, counter in counts.items():
        n = sum(counter.values())
        cells = [f"{counter[name] / n:.0%}" for name in names]
        print(f"| {category} | {n} | " + " | ".join(cells) + " |")
    drawn = details.pop("drawn relation")
    both = sum(drawn[name] for name in DRAWN)
    if both:
        cells = ", ".join(f"{name} {drawn[name] / both:.0%}" for name in DRAWN)
        print(f"\nposition, both shapes drawn ({both} of {sum(drawn.values())}): {cells}")
    for category, counter in details.items():
        for reason, k in counter.most_common(args.detail):
            print(f"{category}: {k} x {reason}")


if __name__ == "__main__":
    main()
