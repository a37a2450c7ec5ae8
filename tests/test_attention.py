"""fewstep.models.attention: float32 attention under CPU bf16 autocast, plain SDPA otherwise."""

import math

import torch

from fewstep.models.attention import attention


def _reference(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v, written out in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False  # the second sample's last two keys are padding
    return q, k, v, mask


def test_float32_attention_matches_the_written_out_formula():
    q, k, v, mask = _inputs()
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_bf16_inputs_are_attended_in_float32_and_returned_in_bf16():
    q, k, v, mask = _inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    # exactly the float32 result rounded once to bf16: no bf16 softmax or accumulation inside
    expected = _reference(q, k, v, mask).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_gradients_flow_through_the_float32_path():
    q, k, v, mask = _inputs(torch.bfloat16)
    q.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention(q, k, v, mask).float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_float64_stays_float64():
    q, k, v, mask = _inputs(torch.float64)
    out = attention(q, k, v, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference(q, k, v, mask), atol=1e-12, rtol=1e-12)


def test_an_additive_bf16_bias_is_applied_in_float32():
    q, k, v, mask = _inputs(torch.bfloat16)
    bias = torch.zeros(2, 1, 1, 7).masked_fill(~mask, float("-inf")).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, bias)
    torch.testing.assert_close(out, _reference(q, k, v, mask).to(torch.bfloat16), atol=0, rtol=0)
