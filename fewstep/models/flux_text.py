"""FLUX.1's two frozen text encoders from a local pipeline folder, encoding as FluxPipeline does:
T5 tokens from ``text_encoder_2``/``tokenizer_2`` (padded to ``max_length``, no attention mask:
FLUX.1 attends to every one of those tokens) and CLIP's pooled vector from
``text_encoder``/``tokenizer`` (77 tokens, ``pooler_output``). The cache builder stores both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from fewstep.models.text_encoder import DTYPES
from fewstep.utils.fingerprint import config_hash, fingerprint

CLIP_MAX_LENGTH = 77  # CLIP's positions (FluxPipeline.tokenizer_max_length)
_FIX = "Point path at a local diffusers FLUX.1 pipeline folder; nothing is downloaded."


def _folder(root: Path, name: str) -> Path:
    """``root/name``, which must hold a config.json or tokenizer files; else an error naming it."""
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"FLUX.1 folder '{root}' has no {name}/ ('{folder}'). {_FIX}")
    return folder


def _load(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` from local files, with an error naming the folder."""
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"Could not load the FLUX.1 {what} in '{folder}': {err}") from None


def _model_fingerprint(model: nn.Module, tokenizer: Any, max_length: int) -> dict[str, str]:
    """Config and weight hashes of one encoder with its tokenizer (location independent)."""
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    return fingerprint(
        model,
        {
            "class": type(model).__name__,
            "model_config": config,
            "tokenizer": type(tokenizer).__name__,
            "vocab": config_hash(tokenizer.get_vocab()),
            "max_length": max_length,
        },
    )


class FluxTextEncoder(nn.Module):
    """Captions -> (T5 tokens [B, max_length, D] float32, mask [B, max_length] all True) and
    ``pooled(captions)`` -> CLIP vector [B, Dv] (FluxPipeline.encode_prompt). ``max_length``:
    512 for FLUX.1-dev, 256 for -schnell."""

    def __init__(self, path: str, max_length: int = 512, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(
                f"FluxTextEncoder dtype must be one of {sorted(DTYPES)}, got {dtype!r}"
            )
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"FLUX.1 folder not found: '{root}'. {_FIX}")
        self.path, self.max_length = str(path), max_length
        self.t5_tokenizer = _load(AutoTokenizer, _folder(root, "tokenizer_2"), "T5 tokenizer")
        self.clip_tokenizer = _load(AutoTokenizer, _folder(root, "tokenizer"), "CLIP tokenizer")
        self.t5 = _load(T5EncoderModel, _folder(root, "text_encoder_2"), "T5", dtype=DTYPES[dtype])
        self.clip = _load(CLIPTextModel, _folder(root, "text_encoder"), "CLIP", dtype=DTYPES[dtype])
        self.clip_length = min(CLIP_MAX_LENGTH, self.clip_tokenizer.model_max_length)
        self.requires_grad_(False)
        self.train(False)
        self._fingerprint: dict[str, str] | None = None

    @property
    def dim(self) -> int:
        """Width of the T5 tokens."""
        return int(self.t5.config.d_model)

    @property
    def pooled_dim(self) -> int:
        """Width of the CLIP pooled vector."""
        return int(self.clip.config.hidden_size)

    def train(self, mode: bool = True) -> FluxTextEncoder:
        """Stay in eval mode whatever is asked: the encoders are frozen."""
        return super().train(False)

    def _ids(self, tokenizer: Any, captions: list[str], length: int) -> Tensor:
        """Token ids [B, length]: padded to ``length`` and cut there (FluxPipeline)."""
        if isinstance(captions, str) or not captions:
            raise ValueError("FluxTextEncoder expects a non-empty list of caption strings")
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]
        return ids.to(self.t5.device)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """T5 last hidden states [B, max_length, D] (FluxPipeline._get_t5_prompt_embeds) and an
        all-True mask: every token, padding included, is part of FLUX.1's text stream."""
        ids = self._ids(self.t5_tokenizer, captions, self.max_length)
        hidden = self.t5(ids, output_hidden_states=False)[0].float()  # [B, L, D]
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)

    @torch.no_grad()
    def pooled(self, captions: list[str]) -> Tensor:
        """CLIP pooled output [B, Dv] (FluxPipeline._get_clip_prompt_embeds)."""
        ids = self._ids(self.clip_tokenizer, captions, self.clip_length)
        return self.clip(ids, output_hidden_states=False).pooler_output.float()

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        """T5 encoding of the empty caption ([1, max_length, D], [1, max_length])."""
        return self([""])

    def null_pooled(self) -> Tensor:
        """CLIP pooled vector of the empty caption [1, Dv]."""
        return self.pooled([""])

    def fingerprint(self) -> dict[str, str]:
        """Config and weight hashes of both encoders: t5_config, t5_weights, clip_config,
        clip_weights (computed once: the encoders are frozen)."""
        if self._fingerprint is None:
            t5 = _model_fingerprint(self.t5, self.t5_tokenizer, self.max_length)
            clip = _model_fingerprint(self.clip, self.clip_tokenizer, self.clip_length)
            self._fingerprint = {
                **{f"t5_{k}": v for k, v in t5.items()},
                **{f"clip_{k}": v for k, v in clip.items()},
            }
        return dict(self._fingerprint)
