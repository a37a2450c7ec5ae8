"""Test helper: tiny random metric networks built from configs and saved the way real weights
are laid out (docs/metrics.md): an HF CLIP folder, a DINOv2 folder, an OWLv2 folder, an
open_clip HPS checkpoint, and the torch-fidelity FID Inception state dict (real shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
TEXT.update({"num_attention_heads": 2, "max_position_embeddings": 77})
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
VISION.update({"num_attention_heads": 2, "image_size": 32, "patch_size": 8})


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with one token per byte (and per byte + '</w>'), no merges."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + SPECIALS
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def text_config(tokenizer: CLIPTokenizer) -> dict:
    """The tiny text tower's config for ``tokenizer``'s ids."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    ids = {"vocab_size": len(tokenizer), "eos_token_id": eos, "bos_token_id": bos}
    return {**TEXT, **ids, "pad_token_id": eos}


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel + CLIPProcessor (32 px, 16-d projection) saved at ``folder``."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_config(tokenizer), vision_config=VISION, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A tiny random DINOv2 (32-d CLS) with a 36 px resize and 32 px crop, saved at ``folder``."""
    torch.manual_seed(seed)
    config = Dinov2Config(**{**VISION, "num_hidden_layers": 1})
    Dinov2Model(config).save_pretrained(folder)
    size, crop = {"shortest_edge": 36}, {"height": 32, "width": 32}
    BitImageProcessor(size=size, crop_size=crop, do_convert_rgb=True).save_pretrained(folder)
    return folder


def make_tiny_owlv2(folder: Path, seed: int = 0) -> Path:
    """A tiny random OWLv2 detector (32 px input, 16 patches) and processor at ``folder``."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    vision = {**VISION, "image_size": 32, "patch_size": 8}
    config = Owlv2Config(
        text_config=text_config(tokenizer), vision_config=vision, projection_dim=32
    )
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    image = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image, tokenizer=tokenizer).save_pretrained(folder)
    return folder


OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_hps(folder: Path, seed: int = 0) -> Path:
    """A tiny random open_clip model as an HPS checkpoint (``{"state_dict": ...}``) with its
    architecture in ``open_clip_config.json``, at ``folder``."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return folder


def make_random_inception(file: Path, seed: int = 0) -> Path:
    """torch-fidelity's FID Inception-v3 with random weights (its real shapes), saved as the
    state dict the real ``pt_inception-2015-12-05-6726825d.pth`` is."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    original = tfi.FeatureExtractorInceptionV3.load_state_dict
    fetch = tfi.load_state_dict_from_url
    tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # keep random
    tfi.load_state_dict_from_url = lambda *a, **k: {}  # never reached for the network
    try:
        torch.manual_seed(seed)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        tfi.FeatureExtractorInceptionV3.load_state_dict = original
        tfi.load_state_dict_from_url = fetch
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), file)
    return file
