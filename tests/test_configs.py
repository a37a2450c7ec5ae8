"""Every YAML in configs/ runs through the CLI on CPU with tiny sizes (test tier 1)."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from student_fixtures import (
    LATENT_CHANNELS,
    base_config,
    build_tiny_cache,
    build_tiny_teacher,
    build_tiny_vae,
    checkpoint_every,
    config_args,
    cpu_student_config,
    is_overlay,
    load_config,
    overlay_chain,
)

from fewstep.cli import run
from fewstep.data.cache import read_manifest
from fewstep.models.adaptive_weight import AdaptiveWeight
from fewstep.models.dit import DiT, PixArtBlock
from fewstep.models.flux import Flux
from fewstep.models.flux_layers import DoubleStreamBlock, SingleStreamBlock
from fewstep.models.ladd_discriminator import FeatureDiscriminatorHeads
from fewstep.models.vae import VAE
from fewstep.tools.couplings import data_section_args

CONFIGS = Path(__file__).parents[1] / "configs"
# configs/model/dit/*.yaml are network presets, instantiated in tests/test_dit.py.
# configs/fsdp/*.yaml are trainer-only overlays on any teacher or student YAML (tested below; the
# sharded training itself runs in tests/test_distributed.py).
RUNNERS = {"shapes", "vae", "cache", "model", "teacher", "student", "fsdp"}


def yamls(stage: str) -> list[Path]:
    return sorted((CONFIGS / stage).rglob("*.yaml"))


FLUX_FOLDER_CLASSES = {
    "fewstep.models.flux_io.PretrainedFlux",
    "fewstep.models.flux_text.FluxTextEncoder",
}


def class_paths(node: object) -> set[str]:
    """Every class_path in a parsed YAML."""
    if isinstance(node, dict):
        own = {node["class_path"]} if isinstance(node.get("class_path"), str) else set()
        return own.union(*(class_paths(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(class_paths(value) for value in node))
    return set()


def needs_a_flux_folder(path: Path) -> bool:
    """A YAML that loads a FLUX.1 pipeline folder (PretrainedFlux, FluxTextEncoder), or a
    student of a teacher YAML that does: the tiny shapes cache, VAE and PixArt folder below do
    not fit it, so the test file that names it runs it on a tiny FLUX.1 folder."""
    config = load_config(path)
    if class_paths(config) & FLUX_FOLDER_CLASSES:
        return True
    teacher = ((config.get("model") or {}).get("init_args") or {}).get("teacher_config")
    teacher_path = CONFIGS.parent / teacher if isinstance(teacher, str) else None
    return teacher_path is not None and teacher_path.is_file() and needs_a_flux_folder(teacher_path)


FLUX_FOLDER_YAMLS = [
    p for stage in ("cache", "teacher", "student") for p in yamls(stage) if needs_a_flux_folder(p)
]


def test_teacher_overlay_resolves_to_the_long_recipe(capsys):
    overlay = CONFIGS / "teacher/shapes_long.yaml"
    assert is_overlay(overlay) and not is_overlay(CONFIGS / "teacher/shapes.yaml")
    with pytest.raises(SystemExit):
        run(["fit", *config_args(overlay), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["network"]["init_args"]["hidden_size"] == 192
    assert model["network"]["init_args"]["depth"] == 6
    assert model["optimizer"]["init_args"]["lr"] == 0.0005


def test_every_config_folder_has_a_runner():
    stages = {p.relative_to(CONFIGS).parts[0] for p in CONFIGS.rglob("*.yaml")}
    assert stages <= RUNNERS, stages - RUNNERS


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.mark.parametrize("path", yamls("shapes"), ids=lambda p: p.name)
def test_shapes_configs(path, tmp_path):
    run(
        [
            "shapes",
            "-c",
            str(path),
            "--out",
            str(tmp_path),
            "--num_samples",
            "4",
            "--num_scored",
            "12",
        ]
    )
    assert (tmp_path / "grid.png").exists() and (tmp_path / "scores.json").exists()


@pytest.mark.parametrize("path", yamls("vae"), ids=lambda p: p.name)
def test_vae_configs(path, tmp_path):
    export = tmp_path / "vae"
    run(
        [
            "fit",
            *config_args(path),
            "--trainer.fast_dev_run=true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.accelerator=cpu",
            "--data.init_args.batch_size=2",
            "--data.init_args.train.init_args.size=8",
            "--data.init_args.val.init_args.size=4",
            "--model.init_args.measure_scale_batches=2",
            "--model.init_args.export_dir",
            str(export),
        ]
    )
    restored = VAE.from_pretrained(export)
    assert restored.has_latent_scale


@pytest.mark.parametrize(
    "path", [p for p in yamls("cache") if p not in FLUX_FOLDER_YAMLS], ids=lambda p: p.name
)
def test_cache_configs(path, tmp_path, tiny_vae_dir):
    out = tmp_path / "cache"
    run(
        [
            "cache",
            *config_args(path),
            "--out",
            str(out),
            "--device=cpu",
            "--vae.init_args.pretrained_path",
            str(tiny_vae_dir),
            "--dataset.init_args.size=10",
            "--shard_size=4",
            "--batch_size=4",
        ]
    )
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 10 and len(manifest["shards"]) == 3


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_vae_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    return build_tiny_cache(out, tiny_vae_dir, num_samples=48, shard_size=24)


# *pretrained* teachers load a PixArt folder: tested with a tiny one below.
STUDENT_OVERLAYS = [p for p in yamls("student") if is_overlay(p)]


@pytest.mark.parametrize("path", STUDENT_OVERLAYS, ids=lambda p: p.name)
def test_student_overlays_layer_on_their_method_config_as_the_cli_does(path, capsys):
    """``-c <method>_shapes.yaml -c <method>_shapes_gpu.yaml`` resolves to what the tests'
    load_config merges (the configs tests then run that merged config on CPU)."""
    assert base_config(path) != CONFIGS / "student/shapes.yaml" and base_config(path).exists()
    with pytest.raises(SystemExit):
        run(["fit", *config_args(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    merged = load_config(path)
    for section in ("model", "data"):
        for key, value in (
            (yaml.safe_load(path.read_text()).get(section) or {}).get("init_args", {}).items()
        ):
            if not isinstance(value, dict):
                assert printed[section]["init_args"][key] == merged[section]["init_args"][key]
    assert printed["trainer"]["precision"] == merged["trainer"]["precision"]


CPU_TEACHERS = [p for p in yamls("teacher") if "xl2" not in p.name and "pretrained" not in p.name]
PRETRAINED_TEACHERS = [  # a PixArt folder (Flux ones: FLUX_FOLDER_YAMLS)
    p for p in yamls("teacher") if "pretrained" in p.name and p not in FLUX_FOLDER_YAMLS
]


def cpu_sized(path: Path, tmp_path: Path) -> Path:
    """A copy of ``path`` whose CFG-evaluation callback draws 2 prompts at 2 steps (CPU tests)."""
    config = yaml.safe_load(path.read_text())
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("CFGEvalCallback"):
            args = callback.setdefault("init_args", {})
            args.update(num_prompts=2, steps=[2], guidance_scales=args["guidance_scales"][:2])
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(config))
    return copy


def teacher_args(path: Path, tmp_path: Path, cache: Path, vae_dir: Path) -> list[str]:
    """CLI arguments running a teacher YAML on CPU with the tiny cache and VAE, cheaply."""
    base, *overlays = overlay_chain(path)
    base = cpu_sized(base, tmp_path)
    overlay = [arg for p in overlays for arg in ("-c", str(p))]
    raw = yaml.safe_load(path.read_text())
    model = (raw.get("model") or {}).get("init_args") or {}
    # a graft names a run's checkpoint; grafting is tested in tests/test_text_refiner.py
    graft = ["--model.init_args.init_weights=null"] if model.get("init_weights") else []
    data = data_section_args(raw)
    # a recipe validating on its own cache (val_path) validates on the tiny cache here
    val = [f"--data.init_args.val_path={cache}"] if data.get("val_path") else []
    return [
        "-c",
        str(base),
        *overlay,
        *graft,
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--data.init_args.path",
        str(cache),
        "--data.init_args.batch_size=8",
        *(val or ["--data.init_args.val_fraction=0.25"]),
        "--data.init_args.num_workers=0",
        "--model.init_args.vae_path",
        str(vae_dir),
        "--model.init_args.val_num_samples=4",
        "--model.init_args.sampler.init_args.steps=2",
    ]


@pytest.mark.parametrize("path", CPU_TEACHERS, ids=lambda p: p.name)
def test_teacher_configs_fit_and_validate(path, tmp_path, tiny_cache, tiny_vae_dir):
    common = teacher_args(path, tmp_path, tiny_cache, tiny_vae_dir)
    run(["fit", *common, "--trainer.fast_dev_run=true"])
    run(["validate", *common, "--trainer.limit_val_batches=1"])


def tiny_pixart_folder(folder: Path, vae_dir: Path) -> Path:
    """A PixArt-Σ pipeline layout (transformer/ + vae/) sized for the tiny cache."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=1,
        cross_attention_dim=32,
        caption_channels=384,
        sample_size=16,
        patch_size=2,
        use_additional_conditions=False,
    )
    transformer.save_pretrained(folder / "transformer")
    shutil.copytree(vae_dir, folder / "vae")
    return folder


@pytest.mark.parametrize("path", PRETRAINED_TEACHERS, ids=lambda p: p.name)
def test_pretrained_teacher_configs_fit_and_validate(path, tmp_path, tiny_cache, tiny_vae_dir):
    folder = tiny_pixart_folder(tmp_path / "PixArt-Sigma-tiny", tiny_vae_dir)
    common = [
        *teacher_args(path, tmp_path, tiny_cache, folder / "vae"),
        "--model.init_args.network.init_args.path",
        str(folder),
    ]
    run(["fit", *common, "--trainer.fast_dev_run=true"])
    run(["validate", *common, "--trainer.limit_val_batches=1"])


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny trained rectified-flow teacher (YAML + checkpoint), its cache and VAE."""
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


def trains_on_a_latent_cache(path: Path) -> bool:
    """A fit YAML (model: section) whose data is the plain CachedLatentDataModule."""
    raw = load_config(path)
    data = (raw.get("data") or {}).get("class_path", "")
    return isinstance(raw.get("model"), dict) and data.endswith("CachedLatentDataModule")


CACHE_STUDENTS = [
    p for p in yamls("student") if trains_on_a_latent_cache(p) and p not in FLUX_FOLDER_YAMLS
]
OTHER_STUDENT_YAMLS = [p for p in yamls("student") if not trains_on_a_latent_cache(p)]


@pytest.mark.parametrize("path", CACHE_STUDENTS, ids=lambda p: p.name)
def test_student_configs_fit_and_validate(path, tmp_path, tiny_teacher):
    config = cpu_student_config(path, tiny_teacher, tmp_path)
    run(["fit", "-c", str(config), "--trainer.fast_dev_run=true"])
    run(["validate", "-c", str(config), "--trainer.limit_val_batches=1"])


@pytest.mark.parametrize("path", OTHER_STUDENT_YAMLS + FLUX_FOLDER_YAMLS, ids=lambda p: p.name)
def test_configs_needing_more_are_run_by_a_test_file_that_names_them(path):
    """YAMLs needing more than the tiny shapes cache (e.g. teacher couplings, a tool's config, or
    a FLUX.1 folder) are run by their method's or recipe's test file, which must name them."""
    here = Path(__file__)
    named = [t for t in here.parent.glob("test_*.py") if t != here and path.name in t.read_text()]
    assert named, f"{path.name}: no test file runs it (name it in its method's tests)"


def test_xl2_teacher_config_parses_and_builds_exact_size(capsys):
    from jsonargparse import ArgumentParser

    path = CONFIGS / "teacher/pixart_sigma_xl2.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "-c", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "hidden_size: 1152" in printed and "FSDPStrategy" in printed
    network = yaml.safe_load(path.read_text())["model"]["init_args"]["network"]
    parser = ArgumentParser()
    parser.add_argument("--net", type=DiT)
    with torch.device("meta"):
        net = parser.instantiate(parser.parse_object({"net": network})).net
    assert 600e6 < sum(p.numel() for p in net.parameters()) < 620e6


def test_last_checkpoint_holds_the_final_step(tmp_path, tiny_cache, tiny_vae_dir):
    """max_steps=3 with every_n_train_steps=2: Lightning alone leaves last.ckpt at step 2."""
    path = CONFIGS / "teacher/shapes.yaml"
    args = teacher_args(path, tmp_path, tiny_cache, tiny_vae_dir)
    checkpoint_every(tmp_path / path.name, 2)  # the CPU-sized copy teacher_args points at
    run(["fit", *args, "--trainer.max_steps=3", "--trainer.limit_val_batches=0"])
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    steps = {p.name: torch.load(p, weights_only=False)["global_step"] for p in checkpoints}
    assert steps["last.ckpt"] == 3 and 2 in steps.values()  # the step-2 save is kept
    last = torch.load(next(p for p in checkpoints if p.name == "last.ckpt"), weights_only=False)
    assert any("ModelCheckpoint" in key for key in last["callbacks"])  # callback states too


def test_a_plain_trainer_gets_the_final_step_with_the_callback(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from fewstep.lightning.final_checkpoint import FinalLastCheckpoint

    every_two = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=2, save_last=True)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[every_two, FinalLastCheckpoint()],
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(BoringModel())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


FSDP_BLOCKS = {
    "pixart_xl.yaml": {PixArtBlock},
    "flux.yaml": {DoubleStreamBlock, SingleStreamBlock},
}
# two-optimiser overlays: also a unit per network and per trainable head set (no trainable
# parameter left to the root unit), still checkpointed per block
FSDP_BLOCKS["pixart_xl_two_optimizers.yaml"] = FSDP_BLOCKS["pixart_xl.yaml"]
FSDP_BLOCKS["flux_two_optimizers.yaml"] = FSDP_BLOCKS["flux.yaml"]
HEADS = {FeatureDiscriminatorHeads, AdaptiveWeight}
FSDP_UNITS = {
    **FSDP_BLOCKS,
    "pixart_xl_two_optimizers.yaml": {PixArtBlock, DiT, *HEADS},
    "flux_two_optimizers.yaml": {DoubleStreamBlock, SingleStreamBlock, Flux, *HEADS},
}


@pytest.mark.parametrize("path", yamls("fsdp"), ids=lambda p: p.name)
@pytest.mark.parametrize("base", ["teacher/pixart_sigma_xl2.yaml", "student/dmd2_shapes.yaml"])
def test_fsdp_overlays_shard_every_block_with_checkpointing(path, base, capsys):
    """``-c <teacher or student yaml> -c configs/fsdp/<x>.yaml`` resolves to an FSDPStrategy
    whose activation-checkpointing policy is the network's block classes and whose wrap policy
    is those blocks (plus, in the two-optimiser overlays, the network and head classes), with
    bf16-mixed precision and one-file (exportable) checkpoints."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with pytest.raises(SystemExit):
        run(["fit", "-c", str(CONFIGS / base), "-c", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "bf16-mixed"
    base_model = yaml.safe_load((CONFIGS / base).read_text())["model"]
    assert printed["model"]["class_path"] == base_model["class_path"]  # the overlay keeps it
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Strategy, "strategy")
    overlay = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    strategy = parser.instantiate(parser.parse_object({"strategy": overlay})).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    wrap = strategy.kwargs["auto_wrap_policy"]
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    for policy, classes in ((wrap, FSDP_UNITS), (checkpointing, FSDP_BLOCKS)):
        assert isinstance(policy, ModuleWrapPolicy)
        assert set(policy._module_classes) == classes[path.name]
    assert strategy.kwargs["use_orig_params"]  # the EMA callback's FSDP path needs it
