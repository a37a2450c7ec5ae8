"""bench/bench_teacher.py: a tiny CPU smoke run of every case, the MFU arithmetic, targets."""

import json
from pathlib import Path

import pytest
from bench_scripts import forget_bench, load_bench

BENCH = Path(__file__).parents[1] / "bench" / "bench_teacher.py"
SMOKE = [
    "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--compile", "off",
    "--steps", "2", "--warmup", "1", "--resolutions", "32,32,64", "--train-batches", "2,2",
    "--fwd-batches", "1,2", "--text-len", "16", "--cpu-threads", "1", "--peak-tflops", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    """The benchmark script imported as a module (bench/ is not a package)."""
    yield load_bench("bench_teacher")
    forget_bench("bench_teacher")


def test_mfu_arithmetic(bench):
    # 1e12 FLOPs forward, 100 images/s, 989 TFLOPS peak: training does 3x the forward work.
    assert bench.mfu(1e12, 100.0, 989.0, train=True) == pytest.approx(300 / 989)
    assert bench.mfu(1e12, 100.0, 989.0, train=False) == pytest.approx(100 / 989)
    assert bench.mfu(2.5e9, 400.0, 1.0, train=True) == pytest.approx(3.0)


def test_cpu_smoke_run_writes_both_implementations(bench, tmp_path, capsys):
    out = tmp_path / "teacher.json"
    report = bench.main([*SMOKE, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    cases = {"train256", "train512", "fwd1024_b1", "fwd1024_b2"}
    assert {(r["case"], r["impl"]) for r in results} == {
        (c, i) for c in cases for i in ("ours", "diffusers")
    }
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 and r["ms"] > 0 for r in results)
    by_key = {(r["case"], r["impl"]): r for r in results}
    assert {r["case"] for r in report["ratios"]} == cases
    for row in report["ratios"]:
        ours, theirs = by_key[(row["case"], "ours")], by_key[(row["case"], "diffusers")]
        assert row["ratio"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    dit = bench.build_dit("tiny", False)
    for r in results:  # MFU from counted FLOPs at the 1-TFLOPS peak given on the command line
        flops = dit.flops_per_sample((r["px"] // 8, r["px"] // 8), 16)
        factor = 3 if r["kind"] == "train" else 1
        assert r["mfu"] == pytest.approx(factor * flops * r["images_per_s"] / 1e12)
    text = capsys.readouterr().out
    assert "ours/diffusers" in text and "targets apply to the XL/2 preset" in text


def test_target_checks(bench):
    result = bench.Result
    results = [
        result("train256", "train", 256, 64, "ours", True, images_per_s=500.0, mfu=0.5),
        result("train256", "train", 256, 64, "ours", False, images_per_s=300.0, mfu=0.3),
        result("train256", "train", 256, 64, "diffusers", False, images_per_s=400.0),
        result("fwd1024_b1", "fwd", 1024, 1, "ours", True, ms=16.0, images_per_s=62.5),
        result("train512", "train", 512, 32, "ours", True, status="oom"),
    ]
    checks = [(c["target"].split()[0], c["value"], c["met"]) for c in bench.targets(results)]
    # MFU of our best (compiled) run; 500/400 over diffusers eager; train512 OOM: no check.
    assert checks == [("train256", 0.5, True), ("train256", 1.25, False), ("fwd1024", 16.0, False)]
