"""CLIPScore and HPSv2 from tiny local weights: each equals the score its reference pipeline
computes (transformers' CLIPModel + CLIPProcessor; open_clip's own model, transforms and
tokenizer on PIL images, as the hpsv2 package scores), merges across ranks, and a missing
weights path is one clear error."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_metric_models import make_tiny_clip, make_tiny_hps
from transformers import CLIPModel, CLIPProcessor

from fewstep.eval.metrics import CLIPScore, HPSv2
from fewstep.eval.metrics.features import to_uint8
from fewstep.eval.metrics.weights import MissingWeightsError

PROMPTS = ["a red cat", "two dogs on a bench", "a blue vase", "a photo of a clock"]


def batch(seed: int = 0) -> torch.Tensor:
    """Four 32 px images in [-1, 1], exactly representable as uint8."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 3, 32, 32), generator=g).float() / 127.5 - 1


def pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]


def test_clip_score_equals_transformers_clip(tmp_path) -> None:
    folder = make_tiny_clip(tmp_path / "clip")
    images = batch()
    metric = CLIPScore(str(folder))
    metric.update(images, PROMPTS)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=PROMPTS, images=pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()  # [B]
    expected = torch.clamp(100 * cosine.mean(), min=0)  # Hessel et al. 2021, w = 100
    assert torch.allclose(metric.compute(), expected, rtol=1e-4, atol=1e-4)
    rank0, rank1 = CLIPScore(str(folder)), CLIPScore(str(folder))
    rank0.update(images[:2], PROMPTS[:2])
    rank1.update(images[2:], PROMPTS[2:])
    rank0.merge_state(rank1)
    assert torch.allclose(rank0.compute(), metric.compute(), rtol=1e-5, atol=1e-5)


def test_hpsv2_equals_the_open_clip_pipeline(tmp_path) -> None:
    import open_clip

    folder = make_tiny_hps(tmp_path / "hps")
    images = batch(1)
    metric = HPSv2(str(folder))  # the folder: finds HPS_v2.1_compressed.pt
    metric.update(images, PROMPTS)
    name = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, load_weights=False)
    state = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    pixels = torch.stack([preprocess(p) for p in pil(images)])
    with torch.no_grad():
        out = model(pixels, open_clip.get_tokenizer(name)(PROMPTS))
    image_f, text_f = out[0], out[1]  # L2-normalised by open_clip
    expected = (image_f @ text_f.T).diagonal().mean()  # hpsv2: diag(image_f @ text_f.T)
    assert torch.allclose(metric.compute(), expected, atol=1e-5)
    rank0, rank1 = HPSv2(str(folder / "HPS_v2.1_compressed.pt")), HPSv2(str(folder))
    rank0.update(images[:1], PROMPTS[:1])
    rank1.update(images[1:], PROMPTS[1:])
    rank0.merge_state(rank1)
    assert torch.allclose(rank0.compute(), metric.compute(), atol=1e-6)


@pytest.mark.parametrize(
    "build, expected",
    [(CLIPScore, "tokenizer_config.json"), (HPSv2, "HPS_v2.1_compressed.pt")],
)
def test_missing_weights_is_one_clear_error(tmp_path, build, expected) -> None:
    with pytest.raises(MissingWeightsError) as err:
        build(str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(err.value) and expected in str(err.value)
