"""Tests for the latent cache format (writer, manifest, reader) and the cache builder."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.data.cache import CacheError, LatentCache
from fewstep.data.cache_builder import build_cache
from fewstep.data.cache_write import merge_manifest
from fewstep.data.image_folder import ImageCaptionFolder, write_image_folder
from fewstep.data.shapes import ShapesWorld

SHARD, BATCH, N = 8, 4, 20  # 3 shards: 8, 8, 4 samples


class FakeVAE(nn.Module):
    """Avg-pool by 4 and a 1x1 conv: mean; sigmoid of it: std. Optionally fails on a call."""

    scaling_factor = 0.5
    shift_factor = 0.25

    def __init__(self, seed: int = 0, fail_on_call: int | None = None, gain: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Conv2d(3, 4, 1)
        self.seed, self.fail_on_call, self.gain, self.calls = seed, fail_on_call, gain, 0

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        mean = self.proj(F.avg_pool2d(images, 4)) * self.gain  # [B,3,R,R] -> [B,4,R/4,R/4]
        return mean, torch.sigmoid(mean) * 0.1 + 0.01

    def fingerprint(self) -> dict[str, str]:
        return {"config": "fake-vae", "weights": f"seed{self.seed}"}


class FakeText:
    """Embeds hashed words (+ an end token), padded to ``max_length`` with a mask."""

    def __init__(self, dim: int = 8, seed: int = 0, max_length: int = 16):
        self.table = torch.randn(1000, dim, generator=torch.Generator().manual_seed(seed))
        self.seed, self.max_length = seed, max_length

    def ids(self, caption: str) -> list[int]:
        return [zlib.crc32(w.encode()) % 999 + 1 for w in caption.split()][: self.max_length - 1]

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        for b, caption in enumerate(captions):
            tokens = self.ids(caption) + [0]  # end token
            ids[b, : len(tokens)] = torch.tensor(tokens)
            mask[b, : len(tokens)] = True
        return self.table[ids] * mask[..., None], mask

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        return self([""])

    def fingerprint(self) -> dict[str, str]:
        return {"config": "fake-text", "weights": f"seed{self.seed}"}


def shapes(n: int = N) -> ShapesWorld:
    return ShapesWorld(size=n, resolution=32, seed=0)


def build(out: Path, n: int = N, **kwargs) -> Path:
    args = {"vae": FakeVAE(), "text_encoder": FakeText(), "shard_size": SHARD}
    args.update(kwargs)
    return build_cache(shapes(n), out_dir=out, batch_size=BATCH, progress=False, **args)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("cache") / "c")


def copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "c"))


def test_round_trip_matches_direct_encoding(built: Path) -> None:
    cache, data, vae, text = LatentCache(built, verify="all"), shapes(), FakeVAE(), FakeText()
    assert len(cache) == N
    for i in range(N):
        sample, got = data[i], cache[i]
        mean, std = vae.encode_moments(sample["image"][None])
        emb, mask = text([sample["caption"]])
        torch.testing.assert_close(got["latent_mean"].float(), mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got["latent_std"].float(), std[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got["text"].float(), emb[0][mask[0]], atol=2e-3, rtol=2e-3)
        assert got["latent_mean"].dtype == torch.float16
        assert got["caption"] == sample["caption"]
        assert got["metadata"] == json.loads(json.dumps(sample["metadata"]))  # tuples -> lists


def test_manifest_contents(built: Path) -> None:
    m = json.loads((built / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["num_samples"] == N and m["dtype"] == "float16"
    assert [s["num_samples"] for s in m["shards"]] == [8, 8, 4]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["vae"] == {
        "fingerprint": FakeVAE().fingerprint(),
        "scaling_factor": 0.5,
        "shift_factor": 0.25,
    }
    assert m["text_encoder"]["fingerprint"] == FakeText().fingerprint()
    assert m["latent_shape"] == [4, 8, 8] and m["text_dim"] == 8
    pre = m["preprocessing"]
    assert pre["resolution"] == 32 and pre["crop"] == "none"
    assert pre["dataset"]["class"] == "fewstep.data.shapes.ShapesWorld"
    assert pre["dataset"]["seed"] == 0 and pre["dataset"]["size"] == N


def test_only_valid_tokens_are_stored(built: Path) -> None:
    data, text = shapes(), FakeText()
    m = json.loads((built / "manifest.json").read_text())
    for k, shard in enumerate(m["shards"]):
        captions = [data[i]["caption"] for i in range(k * SHARD, k * SHARD + shard["num_samples"])]
        valid = int(text(captions)[1].sum())
        assert np.load(built / shard["name"] / "text.npy").shape == (valid, 8)
        assert shard["num_tokens"] == valid < shard["num_samples"] * text.max_length
    null = LatentCache(built).null_text()
    assert null.shape == (1, 8)  # the end token only, no padding


def test_resume_after_interruption_is_byte_identical(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash") as info:
        build(out, vae=FakeVAE(fail_on_call=5))  # 2 batches per shard: dies in the 3rd shard
    assert "Rerun the same build to resume" in "".join(getattr(info.value, "__notes__", []))
    assert (out / "shard-00001").is_dir() and not (out / "shard-00002").exists()
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="did not finish"):
        LatentCache(out)
    (out / "shard-00002.tmp").mkdir()
    (out / "shard-00002.tmp" / "junk.npy").write_bytes(b"half written")
    vae = FakeVAE()
    build(out, vae=vae)
    assert vae.calls == 1  # only the last shard (4 samples = 1 batch) was encoded
    assert tree(out) == tree(built)
    build(out)  # rerunning a finished build changes nothing
    assert tree(out) == tree(built)


def test_multi_rank_build_then_merge_equals_single_process(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    build(out, rank=0, world_size=2)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000", "shard-00002"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="shard-00001"):
        merge_manifest(out)
    build(out, rank=1, world_size=2)  # the last rank to finish writes the manifest
    assert tree(out) == tree(built)
    (out / "manifest.json").unlink()
    merge_manifest(out)
    assert tree(out) == tree(built)


@pytest.mark.parametrize(("verify", "shard"), [("all", 1), ("first", 0)])
def test_corrupt_shard_fails_on_open(built: Path, tmp_path: Path, verify: str, shard: int) -> None:
    root = copy(built, tmp_path)
    path = root / f"shard-0000{shard}" / "latent_mean.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"shard-0000{shard} is corrupt.*latent_mean.npy.*Delete"):
        LatentCache(root, verify=verify)


def test_verify_first_checks_other_shards_on_first_read(built: Path, tmp_path: Path) -> None:
    root = copy(built, tmp_path)
    path = root / "shard-00002" / "records.jsonl"
    path.write_bytes(path.read_bytes().replace(b"a photo", b"A photo", 1))
    cache = LatentCache(root, verify="first")
    cache[0]
    with pytest.raises(CacheError, match="shard-00002 is corrupt.*records.jsonl"):
        cache[N - 1]
    assert LatentCache(root, verify="none")[2 * SHARD]["caption"].startswith("A photo")


def test_truncated_or_missing_shard_named_even_without_hashing(built: Path, tmp_path: Path) -> None:
    root = copy(built, tmp_path)
    text = root / "shard-00001" / "text.npy"
    text.write_bytes(text.read_bytes()[:-10])
    with pytest.raises(CacheError, match="shard-00001 is corrupt.*text.npy has"):
        LatentCache(root, verify="none")
    shutil.rmtree(root / "shard-00001")
    with pytest.raises(CacheError, match="shard shard-00001 is missing.*rebuilds only missing"):
        LatentCache(root, verify="none")
    vae = FakeVAE()
    build(root, vae=vae)  # the advice works: only the missing shard is rebuilt
    assert vae.calls == 2 and tree(root) == tree(built)


def test_missing_manifest_names_folder(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=f"No latent cache at {tmp_path}.*fewstep cache"):
        LatentCache(tmp_path)


def test_fingerprint_mismatch_names_encoder_and_hashes(built: Path) -> None:
    other_vae, other_text = FakeVAE(seed=1).fingerprint(), FakeText(seed=1).fingerprint()
    with pytest.raises(CacheError, match="different VAE.*seed0.*seed1"):
        LatentCache(built, expect_vae=other_vae)
    with pytest.raises(CacheError, match="different text encoder.*seed0.*seed1"):
        LatentCache(built, expect_text=other_text)
    LatentCache(built, expect_vae=FakeVAE().fingerprint(), expect_text=FakeText().fingerprint())


def test_build_refuses_existing_cache_of_other_encoders(built: Path, tmp_path: Path) -> None:
    root = copy(built, tmp_path)
    before = tree(root)
    with pytest.raises(CacheError, match=f"{root} already holds.*different VAE.*delete"):
        build(root, vae=FakeVAE(seed=1))
    with pytest.raises(CacheError, match="different text encoder"):
        build(root, text_encoder=FakeText(seed=1))
    with pytest.raises(CacheError, match="shard_size=8, now shard_size=4"):
        build(root, shard_size=4)
    assert tree(root) == before
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"x")
    with pytest.raises(CacheError, match="not empty and holds no fewstep cache"):
        build(tmp_path / "photos")


def test_a_cache_of_other_category_weights_is_refused(built: Path, tmp_path: Path) -> None:
    """The world's category weights are part of the build: a resume with other weights would
    mix two data distributions in one cache."""
    root = copy(built, tmp_path)
    before = tree(root)
    probs = json.loads((root / "build.json").read_text())["preprocessing"]["dataset"]
    assert probs["category_probs"] == pytest.approx([1 / 6] * 6)
    weighted = ShapesWorld(size=N, resolution=32, seed=0, categories={"position": 2, "colors": 1})
    with pytest.raises(CacheError, match="preprocessing="):
        build_cache(weighted, FakeVAE(), FakeText(), root, shard_size=SHARD, progress=False)
    assert tree(root) == before


def test_float16_overflow_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="VAE posterior mean.*not finite in float16.*float32"):
        build(tmp_path / "c", vae=FakeVAE(gain=1e6))
    build(tmp_path / "c32", vae=FakeVAE(gain=1e6), dtype="float32")
    assert LatentCache(tmp_path / "c32")[0]["latent_mean"].dtype == torch.float32


def test_image_folder_with_workers_and_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_image_folder((shapes(6)[i] for i in range(6)), tmp_path / "images", progress=False)
    folder = ImageCaptionFolder(tmp_path / "images", resolution=32)
    out = build_cache(
        folder, FakeVAE(), FakeText(), tmp_path / "c", shard_size=4, batch_size=3, num_workers=2
    )
    assert "caching latents" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["preprocessing"]["crop"] == "center" and m["num_samples"] == 6
    assert LatentCache(out)[5]["caption"] == shapes(6)[5]["caption"]


def _ddp_build(rank: int, out: Path, rendezvous: str, threads: int) -> None:
    torch.set_num_threads(threads)  # as the parent, so float reductions match bit for bit
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        build(out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_build_with_torch_distributed(built: Path, tmp_path: Path) -> None:
    out, rendezvous = tmp_path / "ddp", f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.start_processes(
        _ddp_build, args=(out, rendezvous, torch.get_num_threads()), nprocs=2, start_method="spawn"
    )
    assert tree(out) == tree(built)


class _WithMetadata(ShapesWorld):
    """ShapesWorld whose metadata holds ``extra``."""

    def __init__(self, extra: object) -> None:
        super().__init__(size=4, resolution=32)
        self.extra = extra

    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "metadata": {"extra": self.extra, "none": None}}


def test_metadata_numpy_values_stored_and_bad_values_named(tmp_path: Path) -> None:
    extra = {"count": np.int64(3), "box": np.array([0.5, 0.25])}
    out = build_cache(_WithMetadata(extra), FakeVAE(), FakeText(), tmp_path / "ok", progress=False)
    assert LatentCache(out)[3]["metadata"] == {
        "extra": {"count": 3, "box": [0.5, 0.25]},
        "none": None,
    }
    with pytest.raises(ValueError, match="dataset sample 0: .*JSON.*object is not JSON"):
        build_cache(
            _WithMetadata(object()), FakeVAE(), FakeText(), tmp_path / "bad", progress=False
        )


def test_invalid_shard_folder_is_rebuilt(built: Path, tmp_path: Path) -> None:
    root = copy(built, tmp_path)
    (root / "manifest.json").unlink()
    (root / "shard-00001" / "shard.json").write_text("{half")
    build(root)
    assert tree(root) == tree(built)


def test_shard_with_a_deleted_file_is_rebuilt(built: Path, tmp_path: Path) -> None:
    root = copy(built, tmp_path)
    (root / "manifest.json").unlink()
    (root / "shard-00001" / "text.npy").unlink()  # shard.json still says finished
    build(root)
    assert tree(root) == tree(built)


def test_unreadable_images_are_dropped_and_listed_in_the_manifest(tmp_path: Path) -> None:
    write_image_folder((shapes(6)[i] for i in range(6)), tmp_path / "images", progress=False)
    (tmp_path / "images" / "00000002.png").write_bytes(b"")  # zero bytes
    data = (tmp_path / "images" / "00000004.png").read_bytes()
    (tmp_path / "images" / "00000004.png").write_bytes(data[: len(data) // 2])  # truncated
    folder = ImageCaptionFolder(tmp_path / "images", resolution=32)
    with pytest.warns(UserWarning, match="00000002.png"):
        out = build_cache(folder, FakeVAE(), FakeText(), tmp_path / "c", shard_size=4, batch_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["num_source"] == 6
    assert [s["index"] for s in manifest["skipped"]] == [2, 4]
    assert "00000002.png" in manifest["skipped"][0]["reason"]
    cache = LatentCache(out)
    captions = [cache[i]["caption"] for i in range(len(cache))]
    assert captions == [shapes(6)[i]["caption"] for i in (0, 1, 3, 5)]  # no substitutes
    assert [r["source_index"] for r in cache.read_records(range(4))] == [0, 1, 3, 5]


def test_long_captions_are_counted_in_the_manifest(tmp_path: Path) -> None:
    from fewstep.models.text_encoder import TextEncoder

    class LongCaptions(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            words = " ".join(["circle"] * (40 if i % 2 else 3))
            return {"image": torch.zeros(3, 32, 32), "caption": words, "metadata": {}, "index": i}

    encoder = TextEncoder(path=None, max_length=16)
    with pytest.warns(UserWarning, match="longer than max_length=16"):
        out = build_cache(LongCaptions(), FakeVAE(), encoder, tmp_path / "c", progress=False)
    assert json.loads((out / "manifest.json").read_text())["truncated_captions"] == 2


def test_a_second_concurrent_build_fails_at_once(tmp_path: Path) -> None:
    from fewstep.data.cache_write import build_lock

    root = tmp_path / "c"
    root.mkdir()
    with build_lock(root / "build-rank0.lock"):  # a live build (this process) holds the folder
        with pytest.raises(CacheError, match="Another build .* is writing into"):
            build(root)
    build(root)  # the lock is released afterwards
    assert (root / "manifest.json").exists() and not (root / "build-rank0.lock").exists()


def test_a_stale_lock_of_a_dead_build_is_taken_over(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    root = tmp_path / "c"
    root.mkdir()
    (root / "build-rank0.lock").write_text(f"{dead} {os.uname().nodename}")
    build(root)
    assert (root / "manifest.json").exists()
