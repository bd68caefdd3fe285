"""Bad image input: every odd file is converted or skipped with a warning naming it, counted, and nothing raises."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from region_features.images import (
    ImageFileDataset,
    ImageWarning,
    ProblemLog,
    collate_image_items,
    list_images,
    load_image,
)
from region_features.ids import image_id_from_filename
from vl.errors import UserError


def save(image: Image.Image, path, **options) -> str:
    image.save(path, **options)
    return str(path)


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    pixels = (rng.uniform(0, 60, size=(size[1], size[0], 3)) + np.array(color) * 0.7).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def bad_images(tmp_path):
    """One file per kind of bad input, and the kind its warning must be counted under."""
    folder = tmp_path / "images"
    folder.mkdir()
    files = {}
    (folder / "corrupt.jpg").write_bytes(b"this is not an image at all " * 20)
    files["corrupt.jpg"] = "corrupt"
    (folder / "truncated.jpg").write_bytes(jpeg_bytes((256, 256))[:1500])
    files["truncated.jpg"] = "truncated"
    files["gray.png"] = "grayscale"
    save(Image.new("L", (40, 30), 128), folder / "gray.png")
    files["rgba.png"] = "alpha"
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    save(rgba, folder / "rgba.png")
    files["cmyk.jpg"] = "cmyk"
    save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), folder / "cmyk.jpg")
    files["deep16.png"] = "16-bit"
    ramp = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 65535 // (40 * 30 - 1)).astype(np.uint16)
    save(Image.fromarray(ramp), folder / "deep16.png")
    files["one.png"] = "tiny"
    save(Image.new("RGB", (1, 1), (1, 2, 3)), folder / "one.png")
    files["wide.png"] = "large"
    save(Image.new("RGB", (10_000, 10), (9, 9, 9)), folder / "wide.png")
    return folder, files


def test_each_bad_image_warns_naming_the_file_and_is_counted(bad_images, capsys):
    folder, files = bad_images
    problems = ProblemLog()
    paths = list_images(folder, problems)
    assert [path.name for path in paths] == sorted(files)
    loaded = {}
    for path in paths:
        result = load_image(path)
        assert result.warning is not None, path
        assert result.kind == files[path.name], (path.name, result.warning)
        problems.warn_image(path, result.warning)
        loaded[path.name] = result
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(files)
    for name in files:
        assert any(line.startswith("vl-regions: warning: ") and str(folder / name) in line for line in err), name
    assert dict(problems.counts) == {kind: 1 for kind in files.values()}
    assert problems.summary().startswith(f"{len(files)} problems: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped globally

    assert loaded["corrupt.jpg"].image is None and loaded["truncated.jpg"].image is None
    for name in set(files) - {"corrupt.jpg", "truncated.jpg"}:
        image = loaded[name].image
        assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8, name
    assert loaded["rgba.png"].image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert loaded["rgba.png"].image.getpixel((5, 5)) == (255, 0, 0)
    red = loaded["cmyk.jpg"].image.getpixel((5, 5))  # C=0 M=Y=100% is red
    assert red[0] > 215 and red[1] < 40 and red[2] < 40
    deep = np.asarray(loaded["deep16.png"].image)
    assert deep[0, 0, 0] == 0 and deep[-1, -1, 0] == 255 and deep[15, 20, 0] in range(120, 136)
    assert loaded["gray.png"].image.getpixel((3, 3)) == (128, 128, 128)
    assert loaded["one.png"].image.size == (1, 1) and "tiny image 1x1" in loaded["one.png"].warning
    assert loaded["wide.png"].image.size == (10_000, 10) and "very large image 10000x10" in loaded["wide.png"].warning


def test_max_side_reduces_early_and_keeps_the_original_size(tmp_path):
    wide = save(Image.new("RGB", (10_000, 10), (9, 9, 9)), tmp_path / "wide.png")
    result = load_image(wide, max_side=1333)
    assert result.image.size == (1333, 1) and result.original_size == (10_000, 10)
    assert result.kind == "large" and "decoded at 1333x1" in result.warning
    big_jpeg = tmp_path / "big.jpg"
    big_jpeg.write_bytes(jpeg_bytes((2000, 1200)))
    result = load_image(big_jpeg, max_side=800)
    assert max(result.image.size) == 800 and result.original_size == (2000, 1200) and result.warning is None
    image, warning = load_image(big_jpeg)  # unpacks as (image, warning)
    assert image.size == (2000, 1200) and warning is None


def test_pil_bomb_limit_is_ours_and_not_leaked(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (300, 300), (1, 1, 1)), tmp_path / "square.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would call this a decompression bomb
    result = load_image(path)
    assert result.image is not None and result.image.size == (300, 300)
    assert Image.MAX_IMAGE_PIXELS == 1000
    refused = load_image(path, max_pixels=50_000)
    assert refused.image is None and refused.kind == "too large" and "skipped" in refused.warning


def test_missing_and_directory_paths_do_not_raise(tmp_path):
    assert load_image(tmp_path / "nope.jpg").kind == "unreadable"
    (tmp_path / "dir.jpg").mkdir()
    assert load_image(tmp_path / "dir.jpg").image is None


def test_list_images_recursive_sorted_and_unreadable_directories(tmp_path, monkeypatch, capsys):
    root = tmp_path / "imgs"
    for relative in ("b/2.JPG", "b/1.png", "a.jpeg", "c/deep/x.webp", "notes.txt", ".hidden.jpg", "locked/y.jpg"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):  # tests run as root, so chmod 000 would not stop reads
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems = ProblemLog()
    found = list_images(root, problems)
    assert [path.relative_to(root).as_posix() for path in found] == ["a.jpeg", "b/1.png", "b/2.JPG", "c/deep/x.webp"]
    assert problems.counts == {"unreadable directory": 1}
    err = capsys.readouterr().err
    assert f"vl-regions: warning: {root / 'locked'}: cannot read directory (Permission denied); skipped" in err
    with pytest.raises(UserError, match="does not exist"):
        list_images(tmp_path / "missing", problems)
    with pytest.raises(UserError, match="not a directory"):
        list_images(root / "notes.txt", problems)
    with pytest.raises(UserError, match="cannot read image directory .*locked"):
        list_images(root / "locked", problems)


def test_problem_log_limits_and_summary(capsys):
    problems = ProblemLog(prog="vl-regions extract", max_lines_per_kind=2)
    for index in range(5):
        problems.warn("corrupt", f"/data/{index}.jpg", "cannot decode image")
    problems.warn("no detections", "/data/9.jpg", "no box above the threshold; kept min_boxes")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "vl-regions extract: warning: /data/0.jpg: cannot decode image"
    assert len(err) == 4 and "further 'corrupt' warnings are only counted" in err[2]
    assert problems.counts == {"corrupt": 5, "no detections": 1} and problems.total == 6
    assert problems.summary() == "6 problems: 5 corrupt, 1 no detections"
    assert ProblemLog().summary() == "no problems"


def test_image_ids_from_file_names():
    assert image_id_from_filename("COCO_val2014_000000000042.jpg") == 42
    assert image_id_from_filename("photos/cat.png") == "cat"
    assert image_id_from_filename("img7.jpeg") == 7
    assert image_id_from_filename("COCO_val2014_000000000042") == 42


def test_dataset_in_dataloader_workers_keeps_lists_and_warnings(bad_images):
    folder, files = bad_images
    good = save(Image.new("RGB", (32, 24), (10, 200, 10)), folder / "COCO_x_000000000005.jpg")
    items = [(image_id_from_filename(path), path) for path in list_images(folder) if path.name != "wide.png"]
    dataset = ImageFileDataset(items, max_side=64, transform=lambda image: torch.from_numpy(np.asarray(image).copy()))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, num_workers=2, collate_fn=collate_image_items, multiprocessing_context="fork"
    )
    seen = {}
    for ids, paths, images, warnings in loader:
        assert isinstance(ids, list) and len(ids) == len(paths) == len(images) == len(warnings)
        for image_id, path, image, warning in zip(ids, paths, images, warnings):
            seen[os.path.basename(path)] = (image_id, image, warning)
    assert set(seen) == {path.name for _, path in items}
    image_id, image, warning = seen[os.path.basename(good)]
    assert image_id == 5 and warning is None and image.shape == (24, 32, 3) and image.dtype == torch.uint8
    assert seen["corrupt.jpg"][1] is None and seen["corrupt.jpg"][2].kind == "corrupt"
    assert isinstance(seen["gray.png"][2], ImageWarning) and seen["gray.png"][2].kind == "grayscale"
    sized = ImageFileDataset([(1, folder / "wide.png")], max_side=100, with_original_size=True)[0]
    assert sized[2].size == (100, 1) and sized[4] == (10_000, 10)
    restored = pickle.loads(pickle.dumps(ImageWarning("cmyk", "CMYK image converted to RGB")))
    assert restored.kind == "cmyk" and restored == "CMYK image converted to RGB"
