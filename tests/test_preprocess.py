import builtins
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from captioner.data.karpathy import read_karpathy
from captioner.data.images import load_image
from captioner.data.preprocess import create_input_files, data_name, main, split_files, word_map_file
from captioner.vocab import UNK, WordMap

S = 16  # image side in these tests
SPLIT_OF = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
WORDS = ["a", "dog", "cat", "runs", "on", "grass", "red", "ball", "big", "small"]


def make_dataset(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Ten small images (one grayscale JPEG, one palette PNG) and a Karpathy JSON.

    Images have 1..6 captions; image #3 also has a caption longer than max_len=8.
    """
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    entries = []
    for i, split in enumerate(SPLIT_OF):
        coarse = nprng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((25 + i, 20 + 2 * i), Image.Resampling.BILINEAR)
        filename = f"{i}.jpg"
        if i == 1:
            img = img.convert("L")
        if i == 2:
            img, filename = img.convert("P"), f"{i}.png"
        img.save(folder / "sub" / filename)
        sentences = []
        for _ in range(1 + i % 6):
            tokens = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
            sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + "."})
        if i == 3:
            sentences.append({"tokens": ["a"] * 9, "raw": "long"})
        entries.append({"filepath": "sub", "filename": filename, "imgid": i, "cocoid": 100 + i,
                        "split": split, "sentences": sentences})
    json_path = root / "dataset_tiny.json"
    json_path.write_text(json.dumps({"dataset": "tiny", "images": entries}))
    return json_path, folder


@pytest.fixture
def raw(tmp_path):
    return make_dataset(tmp_path / "raw")


def run(raw, out: Path, **kwargs):
    json_path, folder = raw
    settings = dict(captions_per_image=3, min_word_freq=1, max_len=8, image_size=S,
                    num_workers=0, progress=False)
    settings.update(kwargs)
    return create_input_files("tiny", json_path, folder, output_folder=out, **settings)


def load_split(out: Path, name: str, split: str):
    files = split_files(out, name, split)
    with h5py.File(files.images, "r") as h:
        images, attrs = h["images"][:], dict(h.attrs)
    captions = json.loads(files.captions.read_text())
    caplens = json.loads(files.caplens.read_text())
    references = json.loads(files.references.read_text())
    return images, attrs, captions, caplens, references


def output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_rows_padded_and_counted(raw, tmp_path):
    result = run(raw, tmp_path / "out")
    wm = WordMap.load(result.word_map_path)
    assert result.num_images == {"train": 6, "val": 2, "test": 2} and not result.noop
    for split in ("train", "val", "test"):
        images, attrs, captions, caplens, refs = load_split(tmp_path / "out", result.data_name, split)
        assert images.dtype == np.uint8 and images.shape == (result.num_images[split], 3, S, S)
        assert attrs["captions_per_image"] == 3 and attrs["complete"] and attrs["image_size"] == S
        assert len(captions) == len(caplens) == 3 * len(images) == 3 * len(refs["image_ids"])
        for row, length in zip(captions, caplens):
            assert len(row) == 8 + 2
            assert row[0] == wm.start_id and row[length - 1] == wm.end_id
            assert all(t == wm.pad_id for t in row[length:])
            assert wm.end_id not in row[1:length - 1] and wm.pad_id not in row[:length]


def test_sampling_matches_the_tutorial(raw, tmp_path):
    """Re-implements the tutorial's create_input_files caption loop (seed 123, choice/sample)."""
    result = run(raw, tmp_path / "out")
    wm = WordMap.load(result.word_map_path)
    images = read_karpathy(*raw)
    rng = random.Random(123)  # the tutorial calls random.seed(123): the same stream
    for split in ("train", "val", "test"):
        expected_rows, expected_lens = [], []
        for image in (im for im in images if im.split == split):
            caps = [t for t in image.tokens if len(t) <= 8]
            if len(caps) < 3:
                caps = caps + [rng.choice(caps) for _ in range(3 - len(caps))]
            else:
                caps = rng.sample(caps, k=3)
            for c in caps:
                expected_rows.append([wm.start_id] + [wm.to_dict().get(w, wm.unk_id) for w in c]
                                     + [wm.end_id] + [wm.pad_id] * (8 - len(c)))
                expected_lens.append(len(c) + 2)
        _, _, captions, caplens, _ = load_split(tmp_path / "out", result.data_name, split)
        assert captions == expected_rows and caplens == expected_lens


def test_cpi_with_and_without_replacement(raw, tmp_path):
    result = run(raw, tmp_path / "out")
    wm = WordMap.load(result.word_map_path)
    images = [im for im in read_karpathy(*raw) if im.split == "train"]
    _, _, captions, _, refs = load_split(tmp_path / "out", result.data_name, "train")
    for i, image in enumerate(images):
        rows = [tuple(wm.decode(r)) for r in captions[3 * i:3 * i + 3]]
        usable = [tuple(t) for t in image.tokens if len(t) <= 8]
        assert set(rows) <= set(usable)  # the too-long caption of image #3 never appears
        if len(usable) >= 3:
            positions = [usable.index(r) for r in rows]  # captions of an image are distinct here
            assert len(set(positions)) == 3  # without replacement
        else:
            assert set(rows) == set(usable)  # every caption, then repeats
    again = run(raw, tmp_path / "again")
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "again")
    other_seed = run(raw, tmp_path / "seed7", seed=7)
    _, _, other, _, _ = load_split(tmp_path / "seed7", other_seed.data_name, "train")
    assert other != captions and sorted(map(tuple, other)) != sorted(map(tuple, captions))
    assert again.fingerprint == result.fingerprint != other_seed.fingerprint


def test_tutorial_caption_dataset_indexing(raw, tmp_path):
    """The tutorial's CaptionDataset.__getitem__ reads our files correctly."""
    result = run(raw, tmp_path / "out")
    wm = WordMap.load(result.word_map_path)
    for split in ("TRAIN", "VAL"):
        name = result.data_name
        h = h5py.File(tmp_path / "out" / f"{split}_IMAGES_{name}.hdf5", "r")
        imgs, cpi = h["images"], h.attrs["captions_per_image"]
        captions = json.loads((tmp_path / "out" / f"{split}_CAPTIONS_{name}.json").read_text())
        caplens = json.loads((tmp_path / "out" / f"{split}_CAPLENS_{name}.json").read_text())
        refs = json.loads((tmp_path / "out" / f"{split}_REFERENCES_{name}.json").read_text())
        for i in range(len(captions)):
            img = imgs[i // cpi] / 255.0
            caption, caplen = captions[i], caplens[i]
            np.testing.assert_array_equal(img * 255.0, load_image(refs["paths"][i // cpi], S))
            words = wm.decode(caption)
            assert len(words) + 2 == caplen
            known = [[w if w in wm else UNK for w in t] for t in refs["tokens"][i // cpi]]
            assert words in known
            if split != "TRAIN":
                start = (i // cpi) * cpi
                all_captions = captions[start:start + cpi]
                assert caption in all_captions and len(all_captions) == cpi
        h.close()
        assert refs["image_ids"] == [100 + k for k, s in enumerate(SPLIT_OF) if s == split.lower()]
    val_refs = json.loads(split_files(tmp_path / "out", name, "val").references.read_text())
    entries = json.loads(raw[0].read_text())["images"]
    assert val_refs["raw"] == [[s["raw"] for s in e["sentences"]] for e in entries[6:8]]


def test_rerun_is_noop_and_settings_change_needs_overwrite(raw, tmp_path):
    out = tmp_path / "out"
    first = run(raw, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = run(raw, out)
    assert second.noop and second.num_images == first.num_images
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(ValueError, match="overwrite=True"):
        run(raw, out, max_len=7)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    rebuilt = run(raw, out, max_len=7, overwrite=True)
    assert not rebuilt.noop and rebuilt.fingerprint != first.fingerprint
    _, attrs, captions, _, _ = load_split(out, first.data_name, "train")
    assert attrs["fingerprint"] == rebuilt.fingerprint and all(len(r) == 9 for r in captions)
    assert run(raw, out, max_len=7).noop


def test_concurrent_calls_serialise_and_later_ones_are_noops(raw, tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(run(raw, tmp_path / "out")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.noop for r in results) == [False, True, True]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import captioner.data.images as images
    import captioner.data.preprocess as pp
    hook, ready, json_path, folder, out = sys.argv[1:]

    def pause():
        Path(ready).touch()
        time.sleep(120)

    if hook == "decode":
        decode, calls = images._write_task, []
        def slow_decode(task):
            calls.append(task)
            if len(calls) == 3:
                pause()
            return decode(task)
        images._write_task = slow_decode
    elif hook == "commit":  # after the word map, before any caption JSON is in place
        write = pp.write_json_atomic
        def slow_write(path, obj):
            write(path, obj)
            pause()
        pp.write_json_atomic = slow_write
    else:  # "rename": word map, TRAIN captions and caplens renamed into place, the rest not
        import os
        replace, renames = os.replace, []
        def slow_replace(src, dst):
            replace(src, dst)
            renames.append(dst)
            if len(renames) == 3:
                pause()
        os.replace = slow_replace
    pp.create_input_files("tiny", json_path, folder, captions_per_image=3, min_word_freq=1,
                          output_folder=out, max_len=8, image_size=16, num_workers=0,
                          progress=False)
""")


@pytest.mark.parametrize("hook", ["decode", "commit", "rename"])
def test_sigkill_mid_write_then_rerun_gives_complete_files(raw, tmp_path, hook):
    out, ready = tmp_path / "out", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, hook, str(ready), str(raw[0]),
                             str(raw[1]), str(out)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "preprocess subprocess exited before the pause"
            assert time.monotonic() < deadline, "preprocess subprocess never reached the pause"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    name = data_name("tiny", 3, 1)
    assert not any(split_files(out, name, s).images.exists() for s in ("train", "val", "test"))
    assert any(p.suffix == ".tmp" for p in out.iterdir())  # killed mid-write
    result = run(raw, out)
    assert not result.noop and result.num_images == {"train": 6, "val": 2, "test": 2}
    assert not any(p.suffix == ".tmp" for p in out.iterdir())
    run(raw, tmp_path / "clean")
    assert output_bytes(out) == output_bytes(tmp_path / "clean")


def _break(raw, kind: str) -> Path:
    """Damage image #7 (val) in place; returns its path."""
    path = raw[1] / "sub" / "7.jpg"
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text("this is not an image\n")
    return path


@pytest.mark.parametrize("kind", ["missing", "truncated", "text"])
def test_bad_image_errors_naming_file_and_entry_and_leaves_nothing(raw, tmp_path, kind):
    path = _break(raw, kind)
    out = tmp_path / "out"
    with pytest.raises(OSError) as err:
        run(raw, out)
    message = str(err.value)
    assert str(path) in message and "image #7" in message and "id 107" in message
    assert "'val'" in message and "skip_bad_images" in message
    assert [p.name for p in out.iterdir()] == [".preprocess.lock"]


@pytest.mark.parametrize("kind", ["missing", "truncated", "text"])
def test_skip_bad_images_drops_them(raw, tmp_path, kind, caplog):
    path = _break(raw, kind)
    out = tmp_path / "out"
    result = run(raw, out, skip_bad_images=True)
    assert result.num_images == {"train": 6, "val": 1, "test": 2}
    assert [(s.path, s.image_id, s.split) for s in result.skipped] == [(str(path), 107, "val")]
    assert "skipped 1 bad image" in caplog.text and str(path) in caplog.text
    images, _, captions, caplens, refs = load_split(out, result.data_name, "val")
    assert images.shape[0] == 1 and len(captions) == len(caplens) == 3
    assert refs["image_ids"] == [106]
    np.testing.assert_array_equal(images[0], load_image(refs["paths"][0], S))
    again = run(raw, out, skip_bad_images=True)
    assert again.noop and again.skipped == result.skipped


def test_image_without_short_caption(raw, tmp_path):
    with pytest.raises(ValueError, match=r"image #0 \('0.jpg'.*max_len=1"):
        run(raw, tmp_path / "out", max_len=1)
    result = run(raw, tmp_path / "out", max_len=2, skip_bad_images=True)
    kept = sum(result.num_images.values())
    assert kept + len(result.skipped) == 10 and all("max_len=2" in s.reason for s in result.skipped)


def test_workers_give_byte_identical_output(raw, tmp_path):
    run(raw, tmp_path / "w0", num_workers=0)
    run(raw, tmp_path / "w2", num_workers=2)
    assert output_bytes(tmp_path / "w0") == output_bytes(tmp_path / "w2")


def test_workers_start_from_a_script_on_stdin(raw, tmp_path):
    """Workers must not re-import __main__ (spawn would crash and respawn them forever)."""
    script = (f"from captioner.data.preprocess import create_input_files\n"
              f"create_input_files('tiny', {str(raw[0])!r}, {str(raw[1])!r}, 3, 1, "
              f"{str(tmp_path / 'stdin')!r}, max_len=8, image_size={S}, num_workers=2, progress=False)\n")
    proc = subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run(raw, tmp_path / "w0")
    assert output_bytes(tmp_path / "stdin") == output_bytes(tmp_path / "w0")


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def test_colour_modes_convert_to_correct_rgb(tmp_path):
    size = (4, 4)  # load_image(path, 4) then does not resample
    gray = _save(Image.new("L", size, 100), tmp_path / "gray.png")
    cmyk = _save(Image.new("CMYK", size, (0, 255, 0, 0)), tmp_path / "cmyk.tif")
    rgba = _save(Image.new("RGBA", size, (10, 20, 30, 0)), tmp_path / "rgba.png")
    palette = Image.new("P", size, 0)
    palette.putpalette([200, 10, 10, 5, 250, 5] + [0] * 762)
    palette.putpixel((3, 0), 1)
    pal = _save(palette, tmp_path / "pal.png", transparency=0)
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535, 65535]] * 4, dtype=np.uint16))
    deep16 = _save(deep, tmp_path / "deep.png")
    assert Image.open(deep16).mode.startswith("I") and Image.open(pal).info.get("transparency") == 0

    def pixels(path):
        out = load_image(path, 4)
        assert out.shape == (3, 4, 4) and out.dtype == np.uint8
        return out.transpose(1, 2, 0)  # (H, W, 3)

    assert (pixels(gray) == 100).all()
    assert (pixels(cmyk) == (255, 0, 255)).all()
    assert (pixels(rgba) == (10, 20, 30)).all()  # alpha dropped, stored colour kept
    assert tuple(pixels(pal)[0, 3]) == (5, 250, 5) and tuple(pixels(pal)[2, 1]) == (200, 10, 10)
    assert [tuple(p) for p in pixels(deep16)[1]] == [(0, 0, 0), (100,) * 3, (255,) * 3, (255,) * 3]


def test_jpeg_colour_modes_and_draft(tmp_path):
    gray = _save(Image.new("L", (40, 40), 128), tmp_path / "gray.jpg")
    cmyk = _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert np.abs(load_image(gray, 8).astype(int) - 128).max() <= 2
    assert np.abs(load_image(cmyk, 8).transpose(1, 2, 0).astype(int) - (255, 0, 0)).max() <= 6
    # draft decoding at reduced scale stays close to a full decode + resize
    yy, xx = np.mgrid[0:256, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.uint8)
    path = _save(Image.fromarray(smooth), tmp_path / "smooth.jpg", quality=95)
    full = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(load_image(path, 64).transpose(1, 2, 0).astype(int) - full).mean() < 2


def test_cli_writes_the_same_files(raw, tmp_path):
    run(raw, tmp_path / "api")
    result = main(["--dataset", "tiny", "--karpathy_json_path", str(raw[0]), "--image_folder",
                   str(raw[1]), "--output_folder", str(tmp_path / "cli"), "--captions_per_image", "3",
                   "--min_word_freq", "1", "--max_len", "8", "--image_size", str(S),
                   "--num_workers", "0", "--no_progress"])
    assert result.word_map_path == word_map_file(tmp_path / "cli", result.data_name)
    assert output_bytes(tmp_path / "api") == output_bytes(tmp_path / "cli")


def test_hydra_route_prepares_the_training_data_config(tmp_path):
    """`python -m captioner.data.preprocess data=shapes` writes the files train.py would use."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "captioner.data.preprocess", "data=shapes",
           f"paths.data_dir={tmp_path / 'data'}", f"paths.output_root={tmp_path / 'outputs'}",
           "data.synthetic.num_train=12", "data.synthetic.num_val=4", "data.synthetic.num_test=4"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    prepared = tmp_path / "data" / "shapes" / "prepared"
    name = "shapes_5_cap_per_img_1_min_word_freq"
    for split, count in (("TRAIN", 12), ("VAL", 4), ("TEST", 4)):
        with h5py.File(prepared / f"{split}_IMAGES_{name}.hdf5") as f:
            assert f["images"].shape == (count, 3, 64, 64)
    assert (prepared / f"WORDMAP_{name}.json").is_file()


def _expected_outputs(json_path: Path, folder: Path, cpi: int, max_len: int, seed: int,
                      unreadable: set[int]) -> dict[str, bytes]:
    """The output JSONs built in memory from json.load, as the pre-streaming code did."""
    entries = json.loads(json_path.read_text())["images"]
    split_of = {"train": "train", "restval": "train", "val": "val", "test": "test"}
    train = [s["tokens"] for e in entries if split_of[e["split"]] == "train" for s in e["sentences"]]
    wm = WordMap.build(train, min_word_freq=1)
    name = data_name("tiny", cpi, 1)
    expected = {f"WORDMAP_{name}.json": json.dumps(wm.to_dict()).encode()}
    rng = random.Random(seed)
    for split in ("train", "val", "test"):
        rows, lengths, refs = [], [], {"image_ids": [], "paths": [], "tokens": [], "raw": []}
        for e in (e for e in entries if split_of[e["split"]] == split):
            usable = [s["tokens"] for s in e["sentences"] if len(s["tokens"]) <= max_len]
            if not usable:
                continue  # no random draw for an image without a usable caption
            if len(usable) < cpi:
                chosen = usable + [rng.choice(usable) for _ in range(cpi - len(usable))]
            else:
                chosen = rng.sample(usable, k=cpi)
            if e["cocoid"] in unreadable:
                continue  # sampled (the draws happen before decoding), then dropped
            rows += [wm.encode(t, max_len) for t in chosen]
            lengths += [len(t) + 2 for t in chosen]
            refs["image_ids"].append(e["cocoid"])
            refs["paths"].append(str(folder / e["filepath"] / e["filename"]))
            refs["tokens"].append([s["tokens"] for s in e["sentences"]])
            refs["raw"].append([s["raw"] for s in e["sentences"]])
        upper = split.upper()
        expected[f"{upper}_CAPTIONS_{name}.json"] = json.dumps(rows).encode()
        expected[f"{upper}_CAPLENS_{name}.json"] = json.dumps(lengths).encode()
        expected[f"{upper}_REFERENCES_{name}.json"] = json.dumps(refs).encode()
    return expected


@pytest.mark.parametrize("cpi, seed", [(3, 123), (5, 7)])
def test_json_outputs_byte_identical_to_in_memory_reference(raw, tmp_path, cpi, seed):
    """Streamed outputs equal json.dumps of the whole objects, byte for byte, also when an
    image has no usable caption (train) and another cannot be decoded (val)."""
    json_path, folder = raw
    data = json.loads(json_path.read_text())
    data["images"][4]["sentences"] = [{"tokens": ["a"] * 9, "raw": "too long \u00e9\n"}]
    data["images"][0]["sentences"][0]["raw"] = "Unicode \u00fc\u2603 \"quotes\" \\ tab\t"
    json_path.write_text(json.dumps(data))
    bad = _break(raw, "text")  # image #7, id 107
    result = run(raw, tmp_path / "out", captions_per_image=cpi, seed=seed, skip_bad_images=True)
    assert [(s.image_id, s.split) for s in result.skipped] == [(104, "train"), (107, "val")]
    assert result.num_images == {"train": 5, "val": 1, "test": 2}
    written = {name: data for name, data in output_bytes(tmp_path / "out").items()
               if name.endswith(".json")}
    assert written == _expected_outputs(json_path, folder, cpi, 8, seed, unreadable={107})
    assert str(bad) not in written[f"VAL_REFERENCES_{result.data_name}.json"].decode()


def test_invalid_entry_late_in_the_json_fails_before_any_decode(raw, tmp_path, monkeypatch):
    """The validating pass reads the whole JSON first: an error in the last entry, or an
    image without a short caption, stops preprocessing before any image is decoded."""
    import captioner.data.images as images

    decoded = []
    write_task = images._write_task
    monkeypatch.setattr(images, "_write_task", lambda task: decoded.append(task) or write_task(task))
    json_path = raw[0]
    data = json.loads(json_path.read_text())
    data["images"][-1]["split"] = "holdout"
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"image #9 \('9.jpg'\): field 'split'"):
        run(raw, tmp_path / "out")
    data["images"][-1]["split"] = "test"
    data["images"][-1]["sentences"] = [{"tokens": ["a"] * 9, "raw": "long"}]
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"image #9 \('9.jpg'.*max_len=8"):
        run(raw, tmp_path / "out")
    assert decoded == [] and [p.name for p in (tmp_path / "out").iterdir()] == [".preprocess.lock"]
    run(raw, tmp_path / "out", skip_bad_images=True)
    assert len(decoded) == 9


def test_json_replaced_mid_run_does_not_mix_in(raw, tmp_path, monkeypatch):
    """Every pass reads the handle opened (and hashed) at the start."""
    import captioner.data.preprocess as pp

    run(raw, tmp_path / "clean")
    json_path = raw[0]
    changed = json.loads(json_path.read_text())
    for entry in changed["images"]:
        entry["sentences"] = list(reversed(entry["sentences"]))
        entry["cocoid"] += 1000
    build = pp.build_word_map

    def build_then_replace(images, min_word_freq):
        word_map = build(images, min_word_freq)
        staged = json_path.with_suffix(".new")
        staged.write_text(json.dumps(changed))
        os.replace(staged, json_path)  # after the validating pass, before the split passes
        return word_map

    monkeypatch.setattr(pp, "build_word_map", build_then_replace)
    run(raw, tmp_path / "out")
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "clean")


def _many_entries(root: Path, n: int) -> tuple[Path, Path]:
    """A Karpathy JSON of ``n`` entries (unique ids, 5 captions each) over one tiny JPEG."""
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "img" / "0.jpg")
    rng = random.Random(n)
    entries = []
    for i in range(n):
        sentences = [{"tokens": (t := [rng.choice(WORDS) + str(rng.randrange(20)) for _ in range(12)]),
                      "raw": " ".join(t)} for _ in range(5)]
        entries.append({"filepath": "img", "filename": "0.jpg", "cocoid": i,
                        "split": ("train", "train", "val", "test")[i % 4], "sentences": sentences})
    json_path = root / "dataset_tiny.json"
    json_path.write_text(json.dumps({"images": entries}))
    return json_path, root


def test_peak_memory_does_not_grow_with_the_captions(tmp_path):
    """Python heap peak (tracemalloc) for 4N images stays within ~0.5 KB per extra image of
    N's (paths and ids of the split being decoded); holding every image's captions, as
    json.load and full caption lists do, costs about 8 KB per image here."""
    import tracemalloc

    def peak(n: int) -> int:
        raw_n = _many_entries(tmp_path / f"raw{n}", n)
        tracemalloc.start()
        try:
            run(raw_n, tmp_path / f"out{n}", captions_per_image=5, max_len=20, image_size=4)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(8)  # warm-up: lazily imported modules and caches
    small, large = peak(100), peak(400)
    assert large - small < 300 * 512, (small, large)


# --------------------------------------------------------------------------- temp files after a kill
def test_compaction_temp_left_by_a_kill_is_swept_by_the_next_build(raw, tmp_path, monkeypatch):
    """skip_bad_images compacts a split's HDF5 through a temp copy (as big as the split: ~22 GB
    for COCO train); the copy a kill leaves behind is removed by the next build's sweep."""
    import captioner.data.images as images

    (raw[1] / "sub" / "4.jpg").write_bytes(b"not an image")  # a bad train image: compaction
    made = []
    create = images._create_contiguous
    monkeypatch.setattr(images, "_create_contiguous",
                        lambda path, *args: made.append(path) or create(path, *args))
    out = tmp_path / "out"
    first = run(raw, out, skip_bad_images=True)
    compact = [Path(path) for path in made if "compact" in Path(path).name]
    assert len(compact) == 1 and compact[0].parent == out and not compact[0].exists()

    compact[0].write_bytes(b"\0" * 4096)  # what SIGKILL mid-compaction leaves behind
    split_files(out, first.data_name, "train").images.unlink()  # ... before the commit
    second = run(raw, out, skip_bad_images=True)
    assert not second.noop and second.num_images == first.num_images == {"train": 5, "val": 2,
                                                                          "test": 2}
    assert not compact[0].exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".preprocess.lock"]


# --------------------------------------------------------------------------- decode workers
def test_default_workers_without_sched_getaffinity(raw, tmp_path, monkeypatch):
    """macOS and Windows have no os.sched_getaffinity: num_workers=None uses os.cpu_count()."""
    import captioner.data.preprocess as pp

    run(raw, tmp_path / "serial")
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(pp, "CHUNKSIZE", 1)  # so 10 images count as enough for workers
    workers = []

    class RecordingWriter(pp.ImageWriter):
        def __enter__(self):
            workers.append(self.num_workers)
            return super().__enter__()

    monkeypatch.setattr(pp, "ImageWriter", RecordingWriter)
    run(raw, tmp_path / "default", num_workers=None)
    assert workers == [2]
    assert output_bytes(tmp_path / "default") == output_bytes(tmp_path / "serial")
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    run(raw, tmp_path / "unknown", num_workers=None)
    assert workers == [2, 1]


# --------------------------------------------------------------------------- read-only output folder
def _deny_writes_in(monkeypatch, folder: Path, error: int) -> None:
    """Make every open() for writing of a file in ``folder`` fail with errno ``error``, as a
    folder and files this process may not write (EACCES) or a read-only mount (EROFS) do."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if (isinstance(file, (str, os.PathLike)) and Path(file).parent == folder
                and any(c in mode for c in "awx+")):
            raise OSError(error, os.strerror(error), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("lock_file", [True, False])
@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS])
def test_complete_files_in_a_read_only_folder_are_used(raw, tmp_path, monkeypatch, lock_file,
                                                         error):
    """A shared dataset folder: complete prepared files beside their raw inputs are used
    read-only, with or without a lock file there; building there names the folder."""
    out = tmp_path / "out"
    first = run(raw, out)
    if not lock_file:
        (out / ".preprocess.lock").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _deny_writes_in(monkeypatch, out, error)
    again = run(raw, out)
    assert again.noop and again.num_images == first.num_images
    assert again.fingerprint == first.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    if not lock_file:  # no lock can be had: only the no-op is allowed
        with pytest.raises(PermissionError, match=f"{out} is not writable.*overwrite=True"):
            run(raw, out, overwrite=True)
        split_files(out, first.data_name, "val").images.unlink()
        with pytest.raises(PermissionError, match=f"{out} is not writable.*incomplete"):
            run(raw, out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
@pytest.mark.parametrize("lock_file", [True, False])
def test_complete_files_in_a_chmod_read_only_folder_are_used(raw, tmp_path, lock_file):
    out = tmp_path / "out"
    first = run(raw, out)
    lock = out / ".preprocess.lock"
    if lock_file:
        lock.chmod(0o444)
    else:
        lock.unlink()
    out.chmod(0o555)
    try:
        again = run(raw, out)
        assert again.noop and again.num_images == first.num_images
    finally:
        out.chmod(0o755)


# --------------------------------------------------------------------------- CLI routing
@pytest.mark.parametrize("argv, hydra", [
    (["data=coco"], True),
    (["data=coco", "data.overwrite=true", "data.preprocess_workers=4"], True),
    (["data=coco", "--cfg", "job"], True),  # Hydra's own flags among overrides
    (["-m", "data=flickr8k,flickr30k"], True),
    (["+data.extra=1", "~data.synthetic"], True),
    (["data=coco", "--help"], True),  # Hydra's help of the preprocess config
    ([], False),
    (["--help"], False),
    (["--dataset", "coco", "--output_folder", "out/lr=0.1"], False),  # '=' in a flag's value
    (["--output_folder=out/lr=0.1", "--dataset=coco"], False),
    (["--karpathy_json_path", "a=b.json", "--out", "x=y"], False),  # argparse's prefixes
])
def test_cli_routes_overrides_to_hydra_and_flags_to_argparse(argv, hydra):
    import captioner.data.preprocess as pp

    assert pp.uses_hydra(argv) is hydra


def test_cli_flag_value_with_equals_sign(raw, tmp_path):
    """`python -m captioner.data.preprocess --output_folder out/lr=0.1 ...` is the argparse CLI."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out" / "lr=0.1"
    cmd = [sys.executable, "-m", "captioner.data.preprocess", "--dataset", "tiny",
           "--karpathy_json_path", str(raw[0]), "--image_folder", str(raw[1]),
           "--output_folder", str(out), "--captions_per_image", "3", "--min_word_freq", "1",
           "--max_len", "8", "--image_size", str(S), "--num_workers", "0", "--no_progress"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    run(raw, tmp_path / "api")
    assert output_bytes(out) == output_bytes(tmp_path / "api")
