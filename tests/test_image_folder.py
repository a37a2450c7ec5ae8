"""Tests for the captioned image-folder dataset and writer."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data.image_folder import ImageCaptionFolder, write_image_folder


def _png_bytes(w: int, h: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """Encode a random image of size ``w x h`` as PNG bytes."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w, channels) if channels else (h, w)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_png(path: Path, w: int = 8, h: int = 8, seed: int = 0, mode: str = "RGB") -> Path:
    """Write a random PNG to ``path``."""
    path.write_bytes(_png_bytes(w, h, seed, mode))
    return path


def _write_metadata(root: Path, records: list[dict]) -> None:
    """Write ``records`` as ``root/metadata.jsonl``."""
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _folder_with_bad_images(root: Path) -> None:
    """Two good images, a truncated PNG and a garbage .jpg, all with sidecar captions."""
    for name, seed in [("a_good", 1), ("d_good", 2)]:
        _write_png(root / f"{name}.png", seed=seed)
    truncated = _png_bytes(32, 32, seed=3)
    (root / "b_trunc.png").write_bytes(truncated[: len(truncated) // 2])
    (root / "c_garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    for stem in ["a_good", "b_trunc", "c_garbage", "d_good"]:
        (root / f"{stem}.txt").write_text(f"caption {stem}")


def test_metadata_jsonl_captions_and_extra_keys(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write_png(tmp_path / "x.png", seed=1)
    _write_png(tmp_path / "sub" / "y.jpg.png", seed=2)
    _write_metadata(
        tmp_path,
        [
            {"file_name": "x.png", "text": "a red square", "label": 3},
            {"file_name": "sub/y.jpg.png", "text": "a blue circle", "shape": "circle"},
        ],
    )
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["caption"] == "a red square" and first["metadata"] == {"label": 3}
    assert second["caption"] == "a blue circle" and second["metadata"] == {"shape": "circle"}
    assert first["index"] == 0 and second["index"] == 1
    assert first["image"].shape == (3, 8, 8) and first["image"].dtype == torch.float32


def test_metadata_missing_file_is_error(tmp_path: Path) -> None:
    _write_metadata(tmp_path, [{"file_name": "nope.png", "text": "t"}])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ImageCaptionFolder(tmp_path)


@pytest.mark.parametrize(
    "bad_line",
    ['{"file_name": "x.png"', '{"file_name": "x.png"}', '["x.png", "text"]'],
    ids=["not-json", "missing-text", "not-object"],
)
def test_bad_metadata_line_names_line_number(tmp_path: Path, bad_line: str) -> None:
    _write_png(tmp_path / "x.png")
    good = json.dumps({"file_name": "x.png", "text": "ok"})
    (tmp_path / "metadata.jsonl").write_text(f"{good}\n{good}\n{bad_line}\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3"):
        ImageCaptionFolder(tmp_path)


def test_txt_sidecar_captions(tmp_path: Path) -> None:
    _write_png(tmp_path / "b.png", seed=1)
    _write_png(tmp_path / "a.JPEG.png", seed=2)
    (tmp_path / "b.txt").write_text("caption b\n")
    (tmp_path / "a.JPEG.txt").write_text("caption a")
    (tmp_path / "notes.md").write_text("not an image")
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    assert len(ds) == 2
    assert [ds[i]["caption"] for i in range(2)] == ["caption a", "caption b"]
    assert ds[0]["metadata"] == {}


def test_uppercase_extension_is_found(tmp_path: Path) -> None:
    _write_png(tmp_path / "UP.PNG")
    (tmp_path / "UP.txt").write_text("upper")
    assert ImageCaptionFolder(tmp_path, resolution=8)[0]["caption"] == "upper"


def test_missing_caption_names_image(tmp_path: Path) -> None:
    _write_png(tmp_path / "has.png")
    (tmp_path / "has.txt").write_text("ok")
    _write_png(tmp_path / "lonely_cat.png")
    with pytest.raises(FileNotFoundError, match="lonely_cat.png") as info:
        ImageCaptionFolder(tmp_path)
    assert "lonely_cat.txt" in str(info.value) and "metadata.jsonl" in str(info.value)


def test_empty_folder_is_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="No images") as info:
        ImageCaptionFolder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_metadata_is_error(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="lists no images"):
        ImageCaptionFolder(tmp_path)


def test_nonexistent_root_is_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "missing")


def test_resize_and_center_crop_non_square(tmp_path: Path) -> None:
    # 40 wide x 20 tall: red outer strips (cropped away), black, and a white centre band.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :4, 0] = array[:, 36:, 0] = 255
    array[:, 16:24] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    image = ImageCaptionFolder(tmp_path, resolution=16)[0]["image"]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    # 40x20 -> 32x16, crop keeps original x in [10, 30): white centre, black edges, no red.
    assert image[:, :, 7:9].min() > 0.9
    assert image[:, :, 0].max() < -0.9 and image[:, :, 15].max() < -0.9


def test_no_center_crop_squashes_whole_image(tmp_path: Path) -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :4] = 255  # white strip at the far left, lost by a centre crop
    Image.fromarray(array).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    squashed = ImageCaptionFolder(tmp_path, resolution=16, center_crop=False)[0]["image"]
    cropped = ImageCaptionFolder(tmp_path, resolution=16, center_crop=True)[0]["image"]
    assert squashed.shape == cropped.shape == (3, 16, 16)
    assert squashed[:, :, 0].min() > 0.5
    assert cropped[:, :, 0].max() < -0.9


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_non_rgb_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    _write_png(tmp_path / "m.png", mode=mode)
    (tmp_path / "m.txt").write_text("mode")
    image = ImageCaptionFolder(tmp_path, resolution=8)[0]["image"]
    assert image.shape == (3, 8, 8) and -1.0 <= image.min() and image.max() <= 1.0


def test_palette_image_becomes_rgb(tmp_path: Path) -> None:
    Image.new("P", (10, 10), color=5).save(tmp_path / "p.png")
    (tmp_path / "p.txt").write_text("palette")
    assert ImageCaptionFolder(tmp_path, resolution=8)[0]["image"].shape == (3, 8, 8)


def test_unreadable_images_are_dropped_never_substituted(tmp_path: Path) -> None:
    _folder_with_bad_images(tmp_path)
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    assert len(ds) == 4
    with pytest.warns(UserWarning) as record:
        samples = [ds[i] for i in range(4)]
    assert [s.get("caption") for s in samples] == ["caption a_good", None, None, "caption d_good"]
    assert samples[1]["index"] == 1 and "b_trunc.png" in samples[1]["skipped"]
    assert "truncated" in samples[1]["skipped"] and "c_garbage.jpg" in samples[2]["skipped"]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "b_trunc.png" in messages[0] and "truncated" in messages[0]
    assert "c_garbage.jpg" in messages[1]
    assert sorted(p.name for p in ds.skipped) == ["b_trunc.png", "c_garbage.jpg"]
    summary = ds.summary()
    assert summary.startswith("4 images, 2 skipped (unreadable)")
    assert "b_trunc.png (" in summary and "c_garbage.jpg (" in summary  # with the reason
    # Already-known bad images are skipped silently and not double counted.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "skipped" in ds[2]
    assert len(ds.skipped) == 2


def test_a_batch_keeps_only_readable_images(tmp_path: Path) -> None:
    from fewstep.data.images import collate_samples

    _folder_with_bad_images(tmp_path)
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    with pytest.warns(UserWarning):
        batch = collate_samples([ds[i] for i in range(4)])
    assert batch["caption"] == ["caption a_good", "caption d_good"]
    assert batch["index"].tolist() == [0, 3] and batch["image"].shape[0] == 2


def test_all_unreadable_batch_is_an_error_naming_the_files(tmp_path: Path) -> None:
    from fewstep.data.images import collate_samples

    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "x.txt").write_text("x")
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    with pytest.warns(UserWarning, match="x.png"), pytest.raises(ValueError, match="x.png"):
        collate_samples([ds[0]])


def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path: Path) -> None:
    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(np.kron(levels, np.ones((4, 4), np.uint16))).save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("grey")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    image = ImageCaptionFolder(tmp_path, resolution=8, center_crop=False)[0]["image"]
    corners = image[0, [0, 0, 7, 7], [0, 7, 0, 7]]  # the four 4x4 blocks, in [-1, 1]
    expected = torch.tensor([0, 16384, 32768, 65535]) / 65535 * 2 - 1
    assert torch.allclose(corners, expected, atol=0.02)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "sub/../../x.png"])
def test_metadata_paths_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    _write_png(tmp_path / "outside.png")
    _write_png(tmp_path / "x.png")
    _write_metadata(root, [{"file_name": name, "text": "escape"}])
    with pytest.raises(ValueError, match="outside the folder"):
        ImageCaptionFolder(root)


def test_check_finds_bad_images_and_drops_them(tmp_path: Path) -> None:
    _folder_with_bad_images(tmp_path)
    ds = ImageCaptionFolder(tmp_path, resolution=8)
    with pytest.warns(UserWarning) as record:
        bad = ds.check(progress=False)
    assert sorted(p.name for p in bad) == ["b_trunc.png", "c_garbage.jpg"]
    assert any("b_trunc.png" in str(w.message) for w in record)
    assert sorted(p.name for p in ds.skipped) == ["b_trunc.png", "c_garbage.jpg"]
    assert len(ds) == 2
    assert [ds[i]["caption"] for i in range(2)] == ["caption a_good", "caption d_good"]
    assert ds.summary().startswith("4 images, 2 skipped (unreadable)")


def test_summary_without_skips(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    assert ImageCaptionFolder(tmp_path).summary() == "1 images, 0 skipped (unreadable)"


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tensor = torch.rand(3, 16, 16) * 2 - 1
    pil = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    samples = [
        {"image": tensor, "caption": "from tensor", "metadata": {"shape": "circle", "n": 2}},
        {"image": array, "caption": "from array"},
        {"image": pil, "caption": "from pil", "metadata": {"tags": ["a", "b"]}},
    ]
    out = write_image_folder(iter(samples), tmp_path / "out", progress=False)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "00000000.png",
        "00000001.png",
        "00000002.png",
        "metadata.jsonl",
    ]
    ds = ImageCaptionFolder(out, resolution=16)
    assert [ds[i]["caption"] for i in range(3)] == ["from tensor", "from array", "from pil"]
    metadata = [ds[i]["metadata"] for i in range(3)]
    assert metadata == [{"shape": "circle", "n": 2}, {}, {"tags": ["a", "b"]}]
    expected = [
        tensor,
        torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1,
        torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 127.5 - 1,
    ]
    for i, target in enumerate(expected):
        assert torch.allclose(ds[i]["image"], target, atol=2 / 255 + 1e-6)  # 1/255 in [0, 1]


def test_write_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    sample = {"image": torch.zeros(3, 4, 4), "caption": "c"}
    with pytest.raises(FileExistsError, match="not empty"):
        write_image_folder([sample], out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    assert not (out / "metadata.jsonl").exists()
    write_image_folder([sample], out, progress=False, overwrite=True)
    assert ImageCaptionFolder(out, resolution=4)[0]["caption"] == "c"


def test_write_failure_leaves_no_metadata(tmp_path: Path) -> None:
    def samples():
        yield {"image": torch.zeros(3, 4, 4), "caption": "ok"}
        raise RuntimeError("generator crashed")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="generator crashed"):
        write_image_folder(samples(), out, progress=False)
    assert not (out / "metadata.jsonl").exists()
    assert [p.name for p in out.iterdir()] == ["00000000.png"]  # no leftover temp file


def test_write_rejects_bad_metadata(tmp_path: Path) -> None:
    sample = {"image": torch.zeros(3, 4, 4), "caption": "c", "metadata": {"text": "clash"}}
    with pytest.raises(ValueError, match="reserved"):
        write_image_folder([sample], tmp_path / "a", progress=False)
    sample = {"image": torch.zeros(3, 4, 4), "caption": "c", "metadata": {"obj": object()}}
    with pytest.raises(TypeError, match="JSON"):
        write_image_folder([sample], tmp_path / "b", progress=False)
