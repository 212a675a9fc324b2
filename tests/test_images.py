"""captioner.data.images: draft decoding, the uint8 resize, and writing straight into the HDF5."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from captioner.data import images
from captioner.data.images import ImageWriter, load_image, resize


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus a little grain: a JPEG-friendly stand-in for a photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-6, 7, (height, width, 3))
    return (np.asarray(img, dtype=np.int16) + grain).clip(0, 255).astype(np.uint8)


def _jpeg(path: Path, width: int, height: int, seed: int = 0) -> Path:
    Image.fromarray(_photo(width, height, seed)).save(path, quality=90)
    return path


def _pil_reference(path: Path, size: int) -> np.ndarray:
    """The tutorial's pixels: full decode, RGB, PIL bilinear resize; (3, S, S)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (20, 90), (9, 7), (32, 32)])
@pytest.mark.parametrize("size", [16, 32])
def test_resize_matches_pil_bilinear_within_one_level(shape, size):
    pixels = _photo(shape[1], shape[0], seed=sum(shape))
    ours = resize(pixels.copy(), size)
    pil = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    assert ours.shape == (3, size, size) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert np.abs(ours.astype(int) - pil.transpose(2, 0, 1)).max() <= 1


def test_resize_to_the_same_size_is_exact():
    pixels = _photo(24, 24)
    np.testing.assert_array_equal(resize(pixels.copy(), 24), pixels.transpose(2, 0, 1))


def test_full_decode_matches_the_tutorial_pixels(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", 80, 60)
    ours = load_image(path, 32, draft_min_ratio=None)
    assert np.abs(ours.astype(int) - _pil_reference(path, 32)).max() <= 1


def test_draft_scale_follows_draft_min_ratio(tmp_path, monkeypatch):
    """80x60 at S=32: 1/2 scale (40x30) keeps >= 0.9*32 = 29 px, 1/4 (20x15) does not."""
    path = _jpeg(tmp_path / "a.jpg", 80, 60)
    decoded = []
    real_resize = images.resize

    def spy(pixels, size):
        decoded.append(pixels.shape[:2])
        return real_resize(pixels, size)

    monkeypatch.setattr(images, "resize", spy)
    for ratio in (None, 1.0, 0.9, 0.45, 0.2):
        load_image(path, 32, draft_min_ratio=ratio)
    # None: full; 1.0: 1/2 gives 30 < 32 rows, so full; 0.9: 1/2; 0.45 (>= 15): 1/4; 0.2: 1/8
    assert decoded == [(60, 80), (60, 80), (30, 40), (15, 20), (8, 10)]


def test_draft_ratio_one_never_goes_below_s(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", 160, 128)  # 1/2 scale = 80x64 >= 64: drafting keeps S
    exact = load_image(path, 64, draft_min_ratio=None)
    drafted = load_image(path, 64, draft_min_ratio=1.0)
    assert np.abs(drafted.astype(int) - exact).mean() < 2.0  # DCT-domain halving, then resize


def test_draft_stays_close_to_full_decode(tmp_path):
    """The default ratio on a 4:3 JPEG: decoded at 1/2 (below S in height) and upsampled."""
    path = _jpeg(tmp_path / "a.jpg", 128, 96)
    full = load_image(path, 64, draft_min_ratio=None).astype(float)
    drafted = load_image(path, 64).astype(float)  # 64x48 decode, 0.75 < 0.8: full decode
    np.testing.assert_array_equal(drafted, full)
    drafted = load_image(path, 56).astype(float)  # 64x48 >= 0.8 * 56 = 45: drafted
    full = load_image(path, 56, draft_min_ratio=None).astype(float)
    psnr = 10 * np.log10(255 ** 2 / np.mean((drafted - full) ** 2))
    assert 0 < np.abs(drafted - full).mean() < 3 and psnr > 30


def test_draft_min_ratio_is_validated(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", 20, 20)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="draft_min_ratio"):
            load_image(path, 8, draft_min_ratio=bad)
        with pytest.raises(ValueError, match="draft_min_ratio"):
            ImageWriter(8, draft_min_ratio=bad)


def _files(tmp_path: Path, n: int, bad=()) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        if i in bad:
            path.write_bytes(b"not a jpeg")
        else:
            _jpeg(path, 30 + 3 * i, 24 + 2 * i, seed=i)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_writer_rows_equal_load_image_and_layout_is_the_tutorials(tmp_path, num_workers):
    paths = _files(tmp_path, 7)
    out = tmp_path / "x.hdf5"
    with ImageWriter(16, num_workers) as writer:
        kept = writer.write(out, paths, attrs={"image_size": 16}, on_error=_no_errors,
                            progress=False)
    assert kept == list(range(7))
    with h5py.File(out, "r") as h:
        data = h["images"]
        assert data.shape == (7, 3, 16, 16) and data.dtype == np.uint8
        assert data.chunks is None and data.compression is None  # contiguous, as the tutorial's
        assert h.attrs["image_size"] == 16
        for i, path in enumerate(paths):
            np.testing.assert_array_equal(data[i], load_image(path, 16))


def _no_errors(index, path, message):
    raise AssertionError(f"unexpected error for image {index}: {message}")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_writer_drops_unreadable_images_and_compacts(tmp_path, num_workers):
    paths = _files(tmp_path, 6, bad={1, 4})
    errors = []
    with ImageWriter(16, num_workers) as writer:
        kept = writer.write(tmp_path / "x.hdf5", paths, attrs={"complete": False},
                            on_error=lambda i, path, msg: errors.append((i, path, msg)),
                            progress=False)
    assert kept == [0, 2, 3, 5]
    assert [(i, path) for i, path, _ in errors] == [(1, paths[1]), (4, paths[4])]
    assert all("UnidentifiedImageError" in m for _, _, m in errors)
    with h5py.File(tmp_path / "x.hdf5", "r") as h:
        assert h["images"].shape == (4, 3, 16, 16) and not h.attrs["complete"]
        for row, i in enumerate(kept):
            np.testing.assert_array_equal(h["images"][row], load_image(paths[i], 16))
    assert sorted(os.listdir(tmp_path)) == sorted([Path(p).name for p in paths] + ["x.hdf5"])


def test_compaction_copy_is_a_hidden_tmp_file_and_keeps_the_mode(tmp_path, monkeypatch):
    """The compacted copy is built as '.{name}.compact.XXXX.tmp' beside the file (the hidden
    '*.tmp' names preprocessing sweeps up after a kill) and renamed over it."""
    made = []
    create = images._create_contiguous
    monkeypatch.setattr(images, "_create_contiguous",
                        lambda path, *args: made.append(Path(path)) or create(path, *args))
    paths = _files(tmp_path, 4, bad={2})
    with ImageWriter(16, 0) as writer:
        writer.write(tmp_path / "plain.hdf5", paths[:2], attrs={}, on_error=_no_errors,
                     progress=False)
        writer.write(tmp_path / "x.hdf5", paths, attrs={}, on_error=lambda *e: None,
                     progress=False)
    compact = made[2]
    assert made[:2] == [tmp_path / "plain.hdf5", tmp_path / "x.hdf5"] and len(made) == 3
    assert compact.parent == tmp_path and compact.suffix == ".tmp"
    assert compact.name.startswith(".x.hdf5.compact.") and not compact.exists()
    with h5py.File(tmp_path / "x.hdf5", "r") as h:
        assert h["images"].shape == (3, 3, 16, 16)
    assert (tmp_path / "x.hdf5").stat().st_mode == (tmp_path / "plain.hdf5").stat().st_mode


def test_on_error_that_raises_aborts(tmp_path):
    paths = _files(tmp_path, 5, bad={2})

    def fail(index, path, message):
        raise OSError(f"image {index}: {message}")

    with ImageWriter(16, 2) as writer, pytest.raises(OSError, match="image 2"):
        writer.write(tmp_path / "x.hdf5", paths, attrs={}, on_error=fail, progress=False)


def test_one_pool_serves_several_files_even_when_a_path_is_reused(tmp_path):
    """Workers keep a file open between tasks; a new file at the same path must not get
    the old file's writes."""
    paths = _files(tmp_path, 4)
    out = tmp_path / "x.hdf5"
    with ImageWriter(16, 1) as writer:
        writer.write(out, paths[:2], attrs={}, on_error=_no_errors, progress=False)
        out.unlink()
        writer.write(out, paths[2:], attrs={}, on_error=_no_errors, progress=False)
        writer.write(tmp_path / "y.hdf5", paths[:1], attrs={}, on_error=_no_errors,
                     progress=False)
    with h5py.File(out, "r") as h:
        np.testing.assert_array_equal(h["images"][:], np.stack([load_image(p, 16) for p in paths[2:]]))
    with h5py.File(tmp_path / "y.hdf5", "r") as h:
        np.testing.assert_array_equal(h["images"][0], load_image(paths[0], 16))


def test_empty_split_writes_an_empty_array(tmp_path):
    with ImageWriter(16, 0) as writer:
        assert writer.write(tmp_path / "x.hdf5", [], attrs={}, on_error=_no_errors,
                            progress=False) == []
    with h5py.File(tmp_path / "x.hdf5", "r") as h:
        assert h["images"].shape == (0, 3, 16, 16)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_writer_takes_a_lazy_iterator_and_checks_its_length(tmp_path, num_workers):
    paths = _files(tmp_path, 5)
    consumed = []

    def lazily():
        for path in paths:
            consumed.append(path)
            yield path

    with ImageWriter(16, num_workers) as writer:
        kept = writer.write(tmp_path / "x.hdf5", lazily(), attrs={}, on_error=_no_errors,
                            progress=False, num_images=5)
        assert kept == list(range(5)) and consumed == paths
        with pytest.raises(ValueError, match="4 image files, but num_images=5"):
            writer.write(tmp_path / "y.hdf5", iter(paths[:4]), attrs={}, on_error=_no_errors,
                         progress=False, num_images=5)
        with pytest.raises(ValueError, match="more than the 3 image files"):
            writer.write(tmp_path / "z.hdf5", iter(paths), attrs={}, on_error=_no_errors,
                         progress=False, num_images=3)
    with h5py.File(tmp_path / "x.hdf5", "r") as h:
        np.testing.assert_array_equal(h["images"][:], np.stack([load_image(p, 16) for p in paths]))


@pytest.mark.parametrize("n", [30, 37, 48])
def test_blocks_and_small_tail_chunks_keep_every_row_in_order(tmp_path, monkeypatch, n):
    """Chunks of 2 (tail chunks of 1) with 2 workers: blocks of 16, the last split into a head
    and a 4-image tail (or all tail, or a full last block); unreadable images in both parts."""
    monkeypatch.setattr(images, "CHUNKSIZE", 2)
    monkeypatch.setattr(images, "TAIL_CHUNKSIZE", 1)
    bad = {3, n - 2}
    paths = _files(tmp_path, n, bad=bad)
    errors = []
    with ImageWriter(16, 2) as writer:
        kept = writer.write(tmp_path / "x.hdf5", paths, attrs={},
                            on_error=lambda i, path, msg: errors.append(i), progress=False)
    assert errors == sorted(bad) and kept == [i for i in range(n) if i not in bad]
    with h5py.File(tmp_path / "x.hdf5", "r") as h:
        np.testing.assert_array_equal(h["images"][:], np.stack([load_image(paths[i], 16) for i in kept]))


# ------------------------------------------------------------------ libjpeg-turbo fast path
def _encoded(path: Path, kind: str, width: int, height: int) -> Path:
    photo = Image.fromarray(_photo(width, height, seed=width))
    save = {"420": {}, "444": {"subsampling": 0}, "422": {"subsampling": 1},
            "progressive": {"progressive": True}}
    if kind == "gray":
        photo.convert("L").save(path, "JPEG", quality=90)
    elif kind == "cmyk":
        photo.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "png":
        photo.save(path, "PNG")
    else:
        photo.save(path, "JPEG", quality=90, **save[kind])
    return path


def _pil_only(monkeypatch, path, size, ratio):
    with monkeypatch.context() as patch:
        patch.setattr(images, "simplejpeg", None)
        return load_image(path, size, draft_min_ratio=ratio)


@pytest.mark.parametrize("kind", ["420", "444", "422", "progressive", "gray"])
@pytest.mark.parametrize("width,height", [(80, 60), (61, 97), (33, 31)])
def test_fast_jpeg_path_gives_pils_pixels_at_pils_scale(tmp_path, monkeypatch, kind, width,
                                                        height):
    path = _encoded(tmp_path / "a.jpg", kind, width, height)
    for size, ratio in ((32, None), (32, 1.0), (32, 0.8), (32, 0.45), (16, 0.2), (64, 0.8)):
        fast = images._decode_jpeg(path, size, ratio)
        assert fast is not None, (kind, size, ratio)  # the fast path really ran
        with Image.open(path) as img:  # PIL's own draft scale for the same request
            if ratio is not None:
                img.draft("RGB", (images._draft_side(size, ratio),) * 2)
            assert fast.shape == (img.size[1], img.size[0], 3)
        np.testing.assert_array_equal(load_image(path, size, draft_min_ratio=ratio),
                                      _pil_only(monkeypatch, path, size, ratio))


@pytest.mark.parametrize("kind", ["cmyk", "png"])
def test_other_files_go_through_pil(tmp_path, monkeypatch, kind):
    path = _encoded(tmp_path / "a.img", kind, 40, 30)
    assert images._decode_jpeg(path, 16, 0.8) is None
    np.testing.assert_array_equal(load_image(path, 16), _pil_only(monkeypatch, path, 16, 0.8))


def test_a_truncated_jpeg_gets_pils_error(tmp_path):
    path = _encoded(tmp_path / "a.jpg", "420", 80, 60)
    path.write_bytes(path.read_bytes()[:300])
    assert images._decode_jpeg(path, 32, 0.8) is None  # libjpeg's warning: PIL decides
    with pytest.raises(OSError, match="(?i)truncated"):
        load_image(path, 32)


def test_images_above_pils_bomb_limit_go_through_pil(tmp_path, monkeypatch):
    path = _encoded(tmp_path / "a.jpg", "420", 80, 60)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80 * 60 - 1)
    assert images._decode_jpeg(path, 32, 0.8) is None


def test_mpo_frames_are_drafted_like_jpegs_on_both_paths(tmp_path, monkeypatch):
    """An MPO (JPEG frames, e.g. from stereo cameras) decodes its first frame at the draft scale."""
    first, second = (Image.fromarray(_photo(80, 60, seed=s)) for s in (1, 2))
    path = tmp_path / "a.mpo"
    first.save(path, "MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(path) as img:
        assert img.format == "MPO"
    fast = images._decode_jpeg(path, 32, 0.9)
    assert fast is not None and fast.shape == (30, 40, 3)
    np.testing.assert_array_equal(load_image(path, 32, draft_min_ratio=0.9),
                                  _pil_only(monkeypatch, path, 32, 0.9))


def test_fast_path_works_with_pils_bomb_check_turned_off(tmp_path, monkeypatch):
    path = _encoded(tmp_path / "a.jpg", "420", 80, 60)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert images._decode_jpeg(path, 32, 0.8) is not None
