"""Images of a trained teacher or student (fit YAML + checkpoint, EMA weights) for a prompt
file, written as an image-caption folder (``metadata.jsonl`` keeps each prompt's GenEval
requirements) for ``fewstep evaluate``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fewstep.data.image_folder import write_image_folder
from fewstep.eval.metrics.geneval_prompts import read_prompts
from fewstep.lightning.checkpoints import load_trained
from fewstep.lightning.sampling import as_null_text
from fewstep.models.text_encoder import TextEncoder
from fewstep.utils.seeding import fixed_noise, mix_seed


def latent_shape(module: Any) -> tuple[int, int, int]:
    """(C, h, w) the module's network samples (teacher ``network`` or student ``student``)."""
    net = getattr(module, "student", None) or module.network
    side = net.base_size * net.patch_size
    return (net.in_channels, side, side)


def sample(module: Any, text: Any, mask: Any, noise: Any, steps: int | None, seed: int) -> Any:
    """Latents of a teacher (its sampler and CFG) or a student (``steps`` steps)."""
    if hasattr(module, "student_latents"):
        n = steps if steps is not None else module.eval_steps[0]
        generator = torch.Generator(device=noise.device).manual_seed(mix_seed(seed, n))
        return module.student_latents(text, mask, noise, n, generator)
    sampler = module.sampler.with_steps(steps) if steps is not None else None
    return module.sample_latents(text, mask, noise, sampler=sampler)


def generate_images(
    fit_config: str,
    ckpt_path: str,
    prompts: str,
    text_encoder_path: str | None,
    out: str | Path,
    steps: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write one image per prompt of ``prompts`` (text or GenEval .jsonl) to ``out``, the
    prompts encoded by ``text_encoder_path`` (None: the default, as the cache config's)."""
    module, _, _ = load_trained(fit_config, ckpt_path)
    module = module.to(device).eval()
    encoder = TextEncoder(text_encoder_path).to(device)
    module._null_text = as_null_text(tuple(t.cpu() for t in encoder.null_embedding()))
    records = read_prompts(prompts)
    shape = latent_shape(module)

    def samples() -> Iterator[dict[str, Any]]:
        for start in tqdm(range(0, len(records), batch_size), disable=not progress):
            chunk = records[start : start + batch_size]
            with torch.no_grad():
                text, mask = encoder([r["prompt"] for r in chunk])
                noise = fixed_noise(shape, range(start, start + len(chunk)), seed, device)
                images = module.decode(sample(module, text, mask.bool(), noise, steps, seed))
            for record, image in zip(chunk, images, strict=True):
                meta = {k: v for k, v in record.items() if k != "prompt"}
                yield {"image": image, "caption": record["prompt"], "metadata": meta}

    return write_image_folder(samples(), out, progress=False, overwrite=True)
