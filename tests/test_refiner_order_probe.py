"""bench/refiner_order_probe.py: a refiner that attends over a set gives equal residuals for
reordered captions (swap difference 0); one whose heads see positions does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench

from fewstep.models.text_refiner import TextRefiner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    return load_bench("refiner_order_probe")


def _checkpoint(path: Path, refiner: TextRefiner) -> None:
    state = {f"network.text_refiner.{k}": v for k, v in refiner.state_dict().items()}
    torch.save({"state_dict": state}, path)


class WordTokenizer:
    """Whitespace words with ids in order of first sight (what the probe asks a tokenizer)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, caption: str) -> dict[str, list[int]]:
        return {"input_ids": [self.convert_tokens_to_ids(w) for w in caption.split()]}

    def convert_tokens_to_ids(self, word: str) -> int:
        return self.ids.setdefault(word, len(self.ids))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        words = {i: w for w, i in self.ids.items()}
        return [words[i] for i in ids]


class ContextFreeEncoder:
    """Each word one fixed random vector, whatever its context: a refiner that attends over a
    set must then give a reordered caption's words exactly the same residuals."""

    def __init__(self, dim: int = 384) -> None:
        self.tokenizer = WordTokenizer()
        self.table = torch.randn(64, dim, generator=torch.Generator().manual_seed(0))

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, None]:
        ids = self.tokenizer(captions[0])["input_ids"]
        return self.table[ids][None], None


def test_a_set_refiner_sees_no_reordering_and_alibi_does(probe, tmp_path):
    """Pair 0 reorders the same words (colour swap): 0 for a set, > 0 with ALiBi. Pairs 1 and
    2 change a word, so even a set refiner differs there."""
    encoder = ContextFreeEncoder()
    torch.manual_seed(0)
    refiner = TextRefiner(384, 16, 8, 1, 32)  # 8 heads: ALiBi slopes 0.5 down to 0.004
    with torch.no_grad():
        for p in refiner.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        refiner.positions.zero_()
    _checkpoint(tmp_path / "set.ckpt", refiner)
    as_set = probe.load_refiner(str(tmp_path / "set.ckpt"), ema=False, num_heads=8, alibi=False)
    local = probe.load_refiner(str(tmp_path / "set.ckpt"), ema=False, num_heads=8, alibi=True)
    set_swaps, local_swaps = (probe.swap_differences(r, encoder) for r in (as_set, local))
    assert set_swaps[0] < 1e-6 and min(set_swaps[1:]) > 1e-3  # float32 rounding vs a change
    assert local_swaps[0] > 1e-4
    lines = probe.attention_summary(local, encoder)
    assert len(lines) == 1 and "square ->" in lines[0]
