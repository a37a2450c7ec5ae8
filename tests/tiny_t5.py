"""Test helper: a tiny random T5 encoder and a locally built tokenizer saved as an HF folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
VOCAB_SIZE = 128  # embedding rows; the word list uses fewer, like T5's padded vocabulary
WORDS = (
    "a an the photo picture image of with and on in at to is are one two three four five "
    "circle circles square squares triangle triangles star stars shape shapes "
    "red blue green yellow black white orange purple small large big "
    "left right above below top bottom next middle"
).split()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that appends ``</s>`` like T5's."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_t5(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``T5EncoderModel`` and its tokenizer into ``folder``; return it."""
    folder = Path(folder)
    tokenizer = make_tiny_tokenizer()
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    assert len(tokenizer) <= VOCAB_SIZE
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
