"""`fewstep shapes-features`: train the shapes feature network (count every shape and colour in
shapes-world renders, blurred and noised like generated images) and write it with a manifest."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from fewstep.data.shapes import ShapesWorld
from fewstep.models.shapes_features import HEADS, ShapesFeatureNet, count_targets
from fewstep.utils.manifest import write_manifest


def _batch(world: ShapesWorld, indices: np.ndarray, rng: np.random.Generator | None) -> tuple:
    """(images [B, 3, R, R] in [-1, 1], count targets [B, heads]); ``rng`` degrades each image
    with a Gaussian blur (sigma 0-1.5 px) and noise (sigma 0-0.08), as generators do."""
    images, targets = [], []
    for i in indices:
        image, _, placed = world.render(int(i))
        if rng is not None:
            sigma = rng.uniform(0.0, 1.5)
            image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
            image = image + rng.normal(0.0, rng.uniform(0.0, 0.08), image.shape)
        images.append(torch.from_numpy(np.clip(image, 0, 1)).permute(2, 0, 1).float() * 2 - 1)
        targets.append(count_targets([p.__dict__ for p in placed]))
    return torch.stack(images), torch.stack(targets)


@torch.no_grad()
def count_accuracy(net: ShapesFeatureNet, world: ShapesWorld, n: int, degrade: bool) -> float:
    """Fraction of held-out renders whose every shape and colour count is right."""
    rng = np.random.default_rng(7) if degrade else None
    right = 0
    for start in range(0, n, 100):
        images, targets = _batch(world, np.arange(start, min(start + 100, n)), rng)
        right += int((net.count_logits(images).argmax(-1) == targets).all(-1).sum())
    return right / n


def train(
    out: str = "fewstep/assets/shapes_features",
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 128,
    seed: int = 0,
    eval_samples: int = 1000,
    progress: bool = True,
) -> dict[str, object]:
    """Train on fresh renders of ShapesWorld(seed=seed) for ``steps`` steps (AdamW, cosine lr),
    score on ``eval_samples`` renders of another seed, and write the network and its manifest
    (recipe, accuracy, time) to ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    world, held_out = ShapesWorld(size=None, seed=seed), ShapesWorld(size=None, seed=seed + 1)
    net = ShapesFeatureNet(width=width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start, losses = time.time(), []
    for _ in tqdm(range(steps), desc="shapes features", disable=not progress):
        images, targets = _batch(world, rng.integers(0, 2**40, batch_size), rng)
        logits = net.count_logits(images)  # [B, heads, MAX + 1]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
    net.eval()
    accuracy = {
        "clean": count_accuracy(net, held_out, eval_samples, degrade=False),
        "blur_noise": count_accuracy(net, held_out, eval_samples, degrade=True),
    }
    net.save(out)
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, width=width, seed=seed)
    write_manifest(
        out,
        {
            "what": "shapes feature network: counts of " + ", ".join(HEADS),
            "recipe": {"command": "fewstep shapes-features", **recipe},
            "all_counts_right": {**accuracy, "held_out_renders": eval_samples},
            "train_seconds": round(time.time() - start, 1),
        },
    )
    window = max(1, min(20, steps // 4))  # mean training loss over the first / last steps
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    return {"out": str(Path(out)), **accuracy, "loss_first": first, "loss_last": last}
