"""Does a teacher's text refiner see word order? Two probes on a checkpoint's weights.

    python bench/refiner_order_probe.py CKPT [CKPT ...] [--raw]

- swap: how much the refiner's residual (refined - MiniLM token) for a shape word differs
  between two captions that hold the same words in another order ("a red square and a green
  circle" / "a green square and a red circle", "left of" / "right of", "above" / "below"),
  relative to its norm. Near 0: the refiner treats the caption as a set of words.
- attention: each block's mean attention entropy (nats; uniform = log L) and what "square"
  attends to, averaged over heads.
"""

from __future__ import annotations

import argparse

import torch

from fewstep.lightning.checkpoints import network_weights
from fewstep.models.text_encoder import TextEncoder
from fewstep.models.text_refiner import TextRefiner

PAIRS = [
    (
        "a photo of a red square and a green circle",
        "a photo of a green square and a red circle",
        "square",
    ),
    ("a photo of a square left of a circle", "a photo of a square right of a circle", "square"),
    ("a photo of a circle above a triangle", "a photo of a circle below a triangle", "triangle"),
]


def load_refiner(ckpt: str, ema: bool, num_heads: int, alibi: bool) -> TextRefiner:
    """The checkpoint's ``text_refiner`` (shapes read off its weights)."""
    weights = network_weights(ckpt, ema)
    state = {
        k[len("text_refiner.") :]: v for k, v in weights.items() if k.startswith("text_refiner.")
    }
    if not state:
        raise ValueError(f"{ckpt} has no text refiner")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    dim, tokens = state["proj_in.weight"].shape[0], state["positions"].shape[0]
    relative = "relative_bias.table" in state  # a learned relative bias replaces ALiBi
    conv = state["mixer.conv.weight"].shape[-1] if "mixer.conv.weight" in state else 0
    refiner = TextRefiner(
        state["proj_in.weight"].shape[1],
        dim,
        num_heads,
        depth,
        tokens,
        alibi=alibi and not relative,
        relative=relative,
        conv=conv,
    )
    refiner.load_state_dict(state)
    return refiner.eval()


@torch.no_grad()
def swap_differences(refiner: TextRefiner, encoder: TextEncoder) -> list[float]:
    """Relative residual difference of the probed word across each caption pair."""
    out = []
    for first, second, word in PAIRS:
        residuals = []
        for caption in (first, second):
            tokens, _ = encoder([caption])
            ids = encoder.tokenizer(caption)["input_ids"]
            index = ids.index(encoder.tokenizer.convert_tokens_to_ids(word))
            residuals.append((refiner(tokens, None) - tokens)[0, index])
        out.append(((residuals[0] - residuals[1]).norm() / residuals[0].norm()).item())
    return out


@torch.no_grad()
def attention_summary(refiner: TextRefiner, encoder: TextEncoder) -> list[str]:
    """Per block: mean attention entropy and the head-averaged top targets of "square"."""
    caption = PAIRS[0][0]
    tokens, _ = encoder([caption])
    words = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(caption)["input_ids"])
    h = refiner.proj_in(tokens) + refiner.positions[: tokens.shape[1]]
    if refiner.mixer is not None:
        h = refiner.mixer(h, None)
    bias = refiner.position_bias(tokens.shape[1], tokens.device)
    lines = []
    for i, block in enumerate(refiner.blocks):
        b, n, d = h.shape
        qkv = block.qkv(block.norm1(h)).reshape(b, n, 3, block.num_heads, d // block.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q @ k.transpose(-1, -2)) / (d // block.num_heads) ** 0.5
        attn = (logits if bias is None else logits + bias).softmax(-1)[0]
        entropy = -(attn * attn.clamp_min(1e-9).log()).sum(-1).mean().item()
        row = attn[:, words.index("square")].mean(0)
        top = ", ".join(f"{words[j]} {row[j]:.2f}" for j in row.argsort(descending=True)[:4])
        uniform = torch.log(torch.tensor(float(n))).item()
        lines.append(f"block {i}: entropy {entropy:.2f} (uniform {uniform:.2f}); square -> {top}")
        h = block(h, bias)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--raw", action="store_true", help="raw weights, not the EMA average")
    parser.add_argument("--heads", type=int, default=6, help="the DiT's num_heads")
    parser.add_argument("--alibi", action="store_true", help="the refiner was trained with ALiBi")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    encoder = TextEncoder(max_length=32)
    for ckpt in args.ckpts:
        refiner = load_refiner(ckpt, not args.raw, args.heads, args.alibi)
        swaps = ", ".join(f"{d:.3f}" for d in swap_differences(refiner, encoder))
        rms = refiner.positions.pow(2).mean().sqrt().item()
        print(f"{ckpt}: positions rms {rms:.3f}; residual swap differences {swaps}")
        for line in attention_summary(refiner, encoder):
            print("  " + line)


if __name__ == "__main__":
    main()
