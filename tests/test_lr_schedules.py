"""WarmupStableDecay against its closed form."""

import math

import pytest
import torch
from bench_scripts import load_bench

from fewstep.lightning.lr_schedules import WarmupStableDecay


def _lrs(steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    scheduler = WarmupStableDecay(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_constant_then_cosine_to_final():
    lrs = _lrs(100, total_steps=100, warmup_steps=10, decay_fraction=0.2, final_factor=0.1)
    assert lrs[:10] == pytest.approx([0.5 * (i + 1) / 10 for i in range(10)])
    assert lrs[10:80] == pytest.approx([0.5] * 70)
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 20)) for i in range(20)]
    assert lrs[80:] == pytest.approx([0.5 * c for c in cosine])


def test_state_round_trip_continues_the_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    first = WarmupStableDecay(optimizer, total_steps=50, warmup_steps=5, decay_fraction=0.5)
    for _ in range(30):
        optimizer.step()
        first.step()
    fresh = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    second = WarmupStableDecay(fresh, total_steps=50, warmup_steps=5, decay_fraction=0.5)
    second.load_state_dict(first.state_dict())
    fresh.load_state_dict(optimizer.state_dict())
    optimizer.step(), first.step(), fresh.step(), second.step()
    assert fresh.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] < 1.0


def test_bad_arguments_name_the_fields():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupStableDecay(optimizer, total_steps=10, warmup_steps=10)


def test_cooldown_fork_decays_from_the_checkpoint_step_to_zero():
    """bench/wsd_cooldown_fork.py: a stable-phase state resumed as a cosine over [step, step+n]."""
    fork = load_bench("wsd_cooldown_fork")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    scheduler = WarmupStableDecay(optimizer, total_steps=1000, warmup_steps=10)
    for _ in range(300):
        optimizer.step()
        scheduler.step()
    state = fork.cooldown_state(scheduler.state_dict(), step=300, steps=40)
    scheduler.load_state_dict(state)
    lrs = []
    for _ in range(41):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * i / 40)) for i in range(41)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
