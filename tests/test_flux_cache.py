"""FLUX.1's two text encoders (T5 tokens + CLIP pooled vector) from a pipeline folder, and the cache
storing both with fingerprints for both; single-encoder caches keep their format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from tiny_t5 import WORDS, make_tiny_t5, make_tiny_tokenizer
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5EncoderModel

from fewstep.data.cache import CacheError, LatentCache
from fewstep.data.cache_builder import build_cache
from fewstep.data.shapes import ShapesWorld
from fewstep.models.flux import Flux
from fewstep.models.flux_convert import to_diffusers
from fewstep.models.flux_io import PretrainedFlux
from fewstep.models.flux_text import FluxTextEncoder

T5_LENGTH, CLIP_DIM = 12, 24
CAPTIONS = ["a red circle", "two blue squares left of a star", ""]


def make_tiny_clip_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer framed like CLIP's: <|startoftext|> words <|endoftext|>, padded
    with <|endoftext|>, 77 positions."""
    specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=77,
    )


def make_tiny_clip(seed: int = 0) -> CLIPTextModel:
    """A tiny random CLIP text model (pooled output at the first <|endoftext|>)."""
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=CLIP_DIM,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def save_tiny_flux_pipeline(root: Path, clip_seed: int = 0) -> Path:
    """A FluxPipeline folder (both text encoders, tokenizers, VAE, transformer, scheduler) written
    by diffusers' save_pretrained."""
    t5 = T5EncoderModel.from_pretrained(make_tiny_t5(root.parent / f"{root.name}-t5"))
    torch.manual_seed(0)
    net = Flux(
        in_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        context_in_dim=t5.config.d_model,
        vec_in_dim=CLIP_DIM,
        axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=make_tiny_clip(clip_seed),
        tokenizer=make_tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=make_tiny_tokenizer(),
        transformer=to_diffusers(net),
    )
    pipe.save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "FLUX.1-tiny")


@pytest.fixture(scope="module")
def encoder(flux_dir: Path) -> FluxTextEncoder:
    return FluxTextEncoder(str(flux_dir), max_length=T5_LENGTH)


@torch.no_grad()
def test_text_encoder_matches_flux_pipeline_encode_prompt(flux_dir: Path, encoder) -> None:
    pipe = FluxPipeline.from_pretrained(flux_dir)
    embeds, pooled, text_ids = pipe.encode_prompt(
        CAPTIONS, prompt_2=None, max_sequence_length=T5_LENGTH
    )
    tokens, mask = encoder(CAPTIONS)
    assert tokens.shape == (3, T5_LENGTH, encoder.dim) and mask.all()
    assert text_ids.shape == (T5_LENGTH, 3)
    torch.testing.assert_close(tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(encoder.pooled(CAPTIONS), pooled, rtol=0, atol=0)
    assert pooled.shape == (3, CLIP_DIM) and not torch.allclose(pooled[0], pooled[1])
    torch.testing.assert_close(encoder.null_pooled(), pooled[2:], rtol=0, atol=0)
    # the folder's transformer takes these as text and cond
    net = PretrainedFlux(str(flux_dir)).eval()
    x = torch.randn(3, 4, 4, 4)
    out = net(x, torch.full((3,), 500.0), tokens, mask, cond=pooled, guidance=torch.full((3,), 3.5))
    assert out.shape == x.shape and torch.isfinite(out).all()


class FakeVAE(nn.Module):
    """Avg-pool by 4 and a 1x1 conv: mean; sigmoid of it: std."""

    scaling_factor, shift_factor = 0.5, 0.25

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 4, 1)

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.proj(F.avg_pool2d(images, 4))  # [B,3,R,R] -> [B,4,R/4,R/4]
        return mean, torch.sigmoid(mean) * 0.1 + 0.01

    def fingerprint(self) -> dict[str, str]:
        return {"config": "fake-vae", "weights": "seed0"}


def build(out: Path, text_encoder, n: int = 6) -> Path:
    dataset = ShapesWorld(size=n, resolution=32, seed=0)
    return build_cache(
        dataset, FakeVAE(), text_encoder, out, shard_size=4, batch_size=3, progress=False
    )


@torch.no_grad()
def test_cache_stores_t5_tokens_and_clip_pooled_with_both_fingerprints(
    flux_dir: Path, encoder, tmp_path: Path
) -> None:
    root = build(tmp_path / "c", encoder)
    cache = LatentCache(root, verify="all", expect_text=encoder.fingerprint())
    entry = cache.manifest["text_encoder"]
    assert sorted(entry["fingerprint"]) == [
        "clip_config",
        "clip_weights",
        "t5_config",
        "t5_weights",
    ]
    assert cache.text_dim == encoder.dim and cache.has_array("pooled_text")
    captions = [r["caption"] for r in cache.read_records(range(len(cache)))]
    tokens, _ = encoder(captions)
    stored = np.stack(cache.read_texts(range(len(cache))))  # every one of the T5 tokens
    np.testing.assert_array_equal(stored, tokens.numpy().astype(np.float16))
    pooled = cache.read_array("pooled_text", range(len(cache)))
    np.testing.assert_array_equal(pooled, encoder.pooled(captions).numpy().astype(np.float16))
    assert entry["pooled"]["dim"] == CLIP_DIM
    null = np.asarray(entry["pooled"]["null"], np.float16)
    np.testing.assert_array_equal(null, encoder.null_pooled()[0].numpy().astype(np.float16))
    before = {p: p.read_bytes() for p in root.rglob("*.npy")}
    build(root, encoder)  # a rerun finds the same build config: nothing rewritten
    assert {p: p.read_bytes() for p in root.rglob("*.npy")} == before


def test_a_different_clip_is_caught_by_its_fingerprint(
    flux_dir: Path, encoder, tmp_path: Path
) -> None:
    other = FluxTextEncoder(
        str(save_tiny_flux_pipeline(tmp_path / "other", clip_seed=1)), max_length=T5_LENGTH
    )
    mine, theirs = encoder.fingerprint(), other.fingerprint()
    assert mine["t5_weights"] == theirs["t5_weights"]
    assert mine["clip_weights"] != theirs["clip_weights"]
    root = build(tmp_path / "c", encoder, n=3)
    with pytest.raises(CacheError, match="different text encoder"):
        LatentCache(root, expect_text=theirs)
    with pytest.raises(CacheError, match="different text encoder"):
        build(root, other, n=3)


class OneOutputText:
    """A single-output text encoder (no pooled vector), like fewstep's TextEncoder."""

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(len(captions))
        mask = torch.arange(5)[None] < torch.tensor([len(c.split()) + 1 for c in captions])[:, None]
        return torch.randn(len(captions), 5, 8, generator=g) * mask[..., None], mask

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        return self([""])

    def fingerprint(self) -> dict[str, str]:
        return {"config": "one", "weights": "one"}


def test_single_encoder_caches_keep_their_format(tmp_path: Path) -> None:
    root = build(tmp_path / "c", OneOutputText())
    build_json = json.loads((root / "build.json").read_text())
    assert build_json["text_encoder"] == {"fingerprint": {"config": "one", "weights": "one"}}
    shard = json.loads((root / "shard-00000" / "shard.json").read_text())
    assert sorted(shard["files"]) == sorted(
        ["latent_mean.npy", "latent_std.npy", "text.npy", "text_offsets.npy", "records.jsonl"]
    )
    assert not LatentCache(root).has_array("pooled_text")


def test_missing_encoder_folders_are_named(flux_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"FLUX.1 folder not found: .*nowhere"):
        FluxTextEncoder(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("tokenizer", "tokenizer_2", "text_encoder"):
        (partial / name).symlink_to(flux_dir / name)
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/ .*partial/text_encoder_2"):
        FluxTextEncoder(str(partial))
