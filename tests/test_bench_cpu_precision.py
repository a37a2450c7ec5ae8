"""bench/bench_cpu_precision.py: its bf16-attention case really runs attention in bf16, and a
step runs in every case."""

import torch
from bench_scripts import forget_bench, load_bench


def _tiny_flux(bench):
    torch.manual_seed(0)
    kwargs = dict(bench.REFERENCE_MMDIT, hidden_size=48, num_heads=2, axes_dim=(8, 8, 8))
    return bench.Flux(**{**kwargs, "depth": 1, "depth_single_blocks": 1})


def test_the_bf16_attention_case_changes_only_the_attention_precision():
    bench = load_bench("bench_cpu_precision")
    try:
        net = _tiny_flux(bench)
        g = torch.Generator().manual_seed(1)
        x, text = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 5, 384, generator=g)
        pooled, t = torch.randn(2, 384, generator=g), torch.tensor([100.0, 900.0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = net(x, t, text, cond=pooled)
            with bench.bf16_attention():
                plain = net(x, t, text, cond=pooled)
            again = net(x, t, text, cond=pooled)  # the patch is undone on exit
        assert not torch.equal(ours, plain)
        torch.testing.assert_close(ours, plain, atol=0.1, rtol=0.1)
        assert torch.equal(ours, again)
    finally:
        forget_bench("bench_cpu_precision")


def test_a_training_step_is_timed_in_float32_and_bf16():
    bench = load_bench("bench_cpu_precision")
    try:
        net = _tiny_flux(bench)
        before = [p.detach().clone() for p in net.parameters()]
        for bf16 in (False, True):
            assert bench.step_seconds(net, batch=2, bf16=bf16, steps=1, warmup=0) > 0
        assert all(p.dtype == torch.float32 for p in net.parameters())  # float32 masters
        assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    finally:
        forget_bench("bench_cpu_precision")
