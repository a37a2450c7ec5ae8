"""bench/bench_fsdp_memory.py: counts from meta-built networks against real ones, the LoRA count
against peft, the total against its terms, and the FLUX.1-dev figures of docs/distributed.md."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from bench_scripts import forget_bench, load_bench

from fewstep.models.dit import PixArtBlock
from fewstep.models.flux import Flux
from fewstep.models.flux_layers import DoubleStreamBlock, SingleStreamBlock
from fewstep.models.lora import LoraSettings, add_lora

ROOT = Path(__file__).parents[1]
BENCH = ROOT / "bench" / "bench_fsdp_memory.py"
TINY_DIT = "configs/model/dit/tiny.yaml"
TINY_FLUX = dict(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=3, context_in_dim=24)
TINY_FLUX |= dict(vec_in_dim=12, axes_dim=(4, 6, 6))


@pytest.fixture(scope="module")
def bench():
    """The benchmark script imported as a module (bench/ is not a package)."""
    yield load_bench("bench_fsdp_memory")
    forget_bench("bench_fsdp_memory")


def tiny_flux(device: str) -> Flux:
    with torch.device(device):
        return Flux(**TINY_FLUX)


def numel(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("family", ["flux", "dit"])
def test_meta_counts_equal_the_real_built_network(bench, family):
    settings = LoraSettings(rank=4)
    if family == "flux":
        meta, real = tiny_flux("meta"), tiny_flux("cpu")
        d, h = TINY_FLUX["hidden_size"], TINY_FLUX["num_heads"]
        unit = max(numel(DoubleStreamBlock(d, h)), numel(SingleStreamBlock(d, h)))
        blocks = ("double_blocks.", "single_blocks.")
    else:
        meta, real = bench.build_network(TINY_DIT), bench.build_network(TINY_DIT, "cpu")
        block = real.blocks[0]
        unit = numel(PixArtBlock(real.hidden_size, 2, real.mlp_hidden, real.context_dim))
        assert unit == numel(block)
        blocks = ("blocks.",)
    c = bench.count(meta, settings)
    assert c.total == numel(real)
    assert c.largest_unit == unit
    assert c.root == sum(p.numel() for n, p in real.named_parameters() if not n.startswith(blocks))
    assert c.blocks == len(real.token_features().blocks)


@pytest.mark.parametrize(
    ("family", "targets"),
    [("flux", None), ("flux", ["img_attn.qkv", "linear2"]), ("dit", None), ("dit", ["mlp.fc2"])],
)
def test_lora_count_equals_the_trainable_count_of_the_peft_wrapped_network(bench, family, targets):
    net = tiny_flux("cpu") if family == "flux" else bench.build_network(TINY_DIT, "cpu")
    settings = LoraSettings(rank=3, target_modules=targets)
    expected = bench.count(net, settings).lora
    add_lora(net, settings)  # fewstep's LoRA code: peft adapters, only they trainable
    assert expected == numel(net, trainable=True) > 0


@pytest.mark.parametrize("method", ["teacher", "lcm_lora", "dmd2_lora", "dmd2_full"])
@pytest.mark.parametrize("gan", [False, True])
def test_total_is_the_sum_of_the_terms_and_each_term_its_formula(bench, method, gan):
    args = ["--network", TINY_DIT, "--method", method, "--gpus", "4", "--px", "128", "--batch", "3"]
    extra = ["--lora-rank", "2", "--weights", "fp32", "--ema"] + ["--gan"] * gan
    a = bench.parse(args + extra)
    report = bench.estimate(bench.build_network(TINY_DIT), a)
    c = report["counts"]
    assert report["total_gb"] == pytest.approx(sum(t["gb"] for t in report["terms"]))
    symbols = {"P": c["total"], "L": c["lora"], "U": c["largest_unit"], "R": c["root"]}
    checked = 0
    for term in report["terms"]:  # "k·X / N" or "k·X": recompute from the written formula
        m = re.fullmatch(r"([\d.]+)·([PLURH])(?: / (\d+))?", term["formula"])
        if m and m[2] != "H":
            value = float(m[1]) * symbols[m[2]] / (int(m[3]) if m[3] else 1) / 1e9
            assert term["gb"] == pytest.approx(value)
            checked += 1
    assert checked >= 3
    # activations: (2 blocks + 28 recompute widths) x (128 / 8 / 2)^2 = 64 patch tokens x width
    # 32 x 2 B per sample
    act = next(t for t in report["terms"] if t["name"].startswith("activations"))
    forwards = 3 if gan and method.startswith("dmd2") else 1
    assert act["gb"] == pytest.approx(forwards * 3 * (2 + 28) * 64 * 32 * 2 / 1e9)
    small = bench.parse([*args[:-4], *extra, "--px", "64", "--vae-factor", "4", "--batch", "3"])
    small_act = bench.estimate(bench.build_network(TINY_DIT), small)["terms"][-2]
    assert small_act["gb"] == pytest.approx(act["gb"])  # (64 / 4 / 2)^2: the same 64 tokens


def test_flux_dev_counts_equal_diffusers_and_peft(bench):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # FLUX.1-dev's transformer config (diffusers defaults + guidance)
        reference = FluxTransformer2DModel(guidance_embeds=True)
    c = bench.count(bench.build_network("flux_dev"), LoraSettings(rank=64))
    assert c.total == numel(reference) == 11_901_408_320
    assert c.largest_unit == numel(reference.transformer_blocks[0])
    assert c.lora == 224_133_120  # the recipe's trainable count (lcm_flux_dev_lora.yaml)


def test_every_figure_in_the_docs_table_is_the_scripts(bench):
    doc = (ROOT / "docs" / "distributed.md").read_text()
    rows = re.findall(r"^\| `(--network [^`]+)`[^|]*\| ([\d.]+) GB \|$", doc, re.MULTILINE)
    nets, totals = {}, {}
    for args, figure in rows:
        a = bench.parse(args.split())
        net = nets.setdefault(a.network, bench.build_network(a.network))
        totals[args] = bench.estimate(net, a)["total_gb"]
        assert f"{totals[args]:.1f}" == figure, args
    lcm, dmd2 = (
        "--network flux_dev --method lcm_lora --batch 2",
        "--network flux_dev --method dmd2_lora",
    )
    assert {lcm, f"{dmd2} --batch 2", f"{dmd2} --batch 2 --gan"} <= set(totals)
    assert f"**{totals[lcm]:.1f} GB**" in doc  # the LCM-LoRA recipe's total, ≈ 18 GB
    assert totals[lcm] == pytest.approx(18, abs=1)
    assert max(totals[f"{dmd2} --batch 2"], totals[f"{dmd2} --batch 2 --gan"]) <= bench.BAR_GB


def test_measure_without_cuda_stops_with_one_clear_message(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "has_cuda", lambda: False)
    with pytest.raises(SystemExit, match="--measure needs CUDA GPUs"):
        bench.main(["--network", TINY_DIT, "--method", "lcm_lora", "--measure"])
    assert "total (estimate)" in capsys.readouterr().out


def test_fit_configs_resolve_to_their_network(bench):
    flux_shapes = yaml.safe_load((ROOT / "configs/teacher/flux_shapes.yaml").read_text())
    real = Flux(**flux_shapes["model"]["init_args"]["network"]["init_args"])
    assert numel(bench.build_network("configs/teacher/flux_shapes.yaml")) == numel(real)
    # a student: its teacher_config's network; PretrainedFlux without its folder: FLUX.1-dev
    student = bench.build_network("configs/student/lcm_flux_dev_lora.yaml")
    assert numel(student) == 11_901_408_320
    pixart = bench.build_network("configs/teacher/pixart_sigma_xl2.yaml")
    assert numel(pixart) == numel(bench.build_network("pixart_sigma_xl2")) == 610_856_096
    assert bench.parse(["-c", "configs/teacher/flux_shapes.yaml"]).network.endswith(
        "flux_shapes.yaml"
    )
    with pytest.raises(ValueError, match="--network nowhere.yaml: not"):
        bench.build_network("nowhere.yaml")
