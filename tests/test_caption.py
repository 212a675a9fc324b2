"""The caption CLI: good and bad files, figures, exit codes, and training's exact preprocessing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from captioner.caption import caption, caption_images, figure_names, find_images
from captioner.data.preprocess import create_input_files, data_name
from captioner.lit_module import CaptioningModule
from captioner.vocab import WordMap
from conftest import ROOT, compose

IMAGE_SIZE = 32
CAPTIONS = [["a", "red", "square"], ["two", "blue", "circles", "on", "grey"]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine they thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(image_size: int = IMAGE_SIZE) -> CaptioningModule:
    torch.manual_seed(0)
    word_map = WordMap.build(CAPTIONS, 1)
    model = CaptioningModule(
        vocab_size=len(word_map), **word_map.special_ids,
        encoder={"arch": "resnet18", "encoded_image_size": 2, "pretrained": False},
        decoder={"embed_dim": 8, "decoder_dim": 8, "attention_dim": 8, "dropout": 0.0},
        word_map=word_map, run_config={"data": {"image_size": image_size}})
    with torch.no_grad():  # make <end> likely enough that some captions finish
        model.captioner.decoder.fc.bias[word_map.end_id] = 1.5
    return model.eval()


def save_checkpoint(model: CaptioningModule, path: Path) -> Path:
    """The dict Lightning's checkpointing writes for this module (state, hparams, on_save_checkpoint)."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": L.__version__, "epoch": 0, "global_step": 0}
    model.on_save_checkpoint(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def picture(width: int, height: int) -> np.ndarray:
    """A smooth RGB test picture (uint8 H x W x 3) with a few shapes."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)], axis=-1)
    rgb[height // 4:height // 2, width // 4:width // 2] = (200, 30, 30)
    return rgb.clip(0, 255).astype(np.uint8)


def write_good_images(folder: Path) -> list[Path]:
    """One file per supported kind: RGB JPEG, RGBA PNG, palette PNG, 16-bit PNG, gray JPEG, CMYK JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(picture(61, 47))
    files = {
        "a_rgb.jpg": rgb,
        "b_rgba.png": rgb.convert("RGBA"),
        "c_palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        "d_gray16.png": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257),  # I;16
        "e_gray.jpg": rgb.convert("L"),
        "f_cmyk.jpg": rgb.convert("CMYK"),
        "g_large.png": Image.fromarray(picture(640, 400)),
    }
    for name, image in files.items():
        image.save(folder / name)
    return [folder / name for name in files]


def write_bad_images(folder: Path) -> list[Path]:
    """A truncated JPEG and a text file named .jpg (a missing file is added by the tests)."""
    buffer = folder / "full.tmp"
    Image.fromarray(picture(80, 60)).save(buffer, format="JPEG")
    data = buffer.read_bytes()
    buffer.unlink()
    (folder / "x_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "y_text.jpg").write_text("this is not an image\n")
    return [folder / "x_truncated.jpg", folder / "y_text.jpg"]


def caption_cfg(tmp_path: Path, image, ckpt_path: Path | None, *extra: str):
    overrides = [f"image={image}", f"paths.output_root={tmp_path / 'outputs'}",
                 f"output_dir={tmp_path / 'out'}", "beam=3", "max_len=6", "batch_size=3", *extra]
    if ckpt_path is not None:
        overrides.append(f"ckpt_path={ckpt_path}")
    return compose("caption", overrides)


# ----------------------------------------------------------------------------- the CLI
def test_caption_names_bad_files_captions_the_rest_and_draws_a_figure_each(tmp_path, capsys):
    folder = tmp_path / "images"
    good = write_good_images(folder)
    bad = write_bad_images(folder)
    (folder / "notes.txt").write_text("not listed: no image suffix")
    missing = tmp_path / "missing.jpg"
    ckpt = save_checkpoint(tiny_model(), tmp_path / "model.ckpt")

    failures = caption(caption_cfg(tmp_path, f"['{folder}','{missing}']", ckpt))

    out, err = capsys.readouterr()
    assert failures == 3
    captioned = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                     for line in out.splitlines())
    assert sorted(captioned) == sorted(str(p) for p in good)
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 3
    for path in [*bad, missing]:
        assert sum(str(path) in line for line in error_lines) == 1, path

    figures = sorted((tmp_path / "out" / "attention").glob("*.png"))
    assert [f.name for f in figures] == sorted(p.stem + ".png" for p in good)
    for figure in figures:
        with Image.open(figure) as im:
            assert im.format == "PNG" and im.width > 100
    summary = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert summary["checkpoint"] == str(ckpt) and summary["image_size"] == IMAGE_SIZE
    records = {r["path"]: r for r in summary["results"]}
    assert len(records) == len(good) + 3
    for path in good:
        assert records[str(path)]["caption"] == captioned[str(path)]
    for path in [*bad, missing]:
        assert "error" in records[str(path)] and "caption" not in records[str(path)]


def test_caption_defaults_to_the_best_checkpoint_of_the_latest_run(tmp_path, capsys):
    good = write_good_images(tmp_path / "images")[:2]
    run = tmp_path / "outputs" / "train" / "2024-01-01_00-00-00"
    best = save_checkpoint(tiny_model(), run / "checkpoints" / "best.ckpt")
    (tmp_path / "outputs" / "train" / "latest").symlink_to(run.name)

    assert caption(caption_cfg(tmp_path, f"['{good[0]}','{good[1]}']", None, "attention=false")) == 0
    out, err = capsys.readouterr()
    assert f"Captioning with {best}" in err
    assert [line.split(": ")[0].rstrip(":") for line in out.splitlines()] == [str(p) for p in good]
    assert not (tmp_path / "out" / "attention").exists()


def test_caption_module_exits_with_1_when_an_input_fails(tmp_path):
    good = write_good_images(tmp_path / "images")[0]
    ckpt = save_checkpoint(tiny_model(), tmp_path / "model.ckpt")
    missing = tmp_path / "nope.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "captioner.caption", f"image=['{good}','{missing}']", f"ckpt_path={ckpt}",
         f"paths.output_root={tmp_path / 'outputs'}", "beam=2", "max_len=4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"{good}:")
    assert f"error: {missing}: FileNotFoundError" in proc.stderr
    runs = list((tmp_path / "outputs" / "caption").iterdir())  # Hydra's run folder got the figure
    assert len(runs) == 1 and (runs[0] / "attention" / "a_rgb.png").is_file()


def test_caption_takes_names_that_hydra_reads_as_numbers(tmp_path, monkeypatch, capsys):
    for name in ["2023", "2023.10"]:
        (tmp_path / name).mkdir()
        Image.fromarray(picture(40, 30)).save(tmp_path / name / "a.png")
    ckpt = save_checkpoint(tiny_model(), tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)

    one = caption_cfg(tmp_path, "2023", ckpt, "attention=false")
    several = caption_cfg(tmp_path, "[2023,'2023.10']", ckpt, "attention=false")
    assert one.image == 2023 and isinstance(one.image, int) and list(several.image) == [2023, "2023.10"]
    assert caption(one) == 0 and caption(several) == 0
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == ["2023/a.png", "2023/a.png", "2023.10/a.png"]
    assert "error" not in err
    with pytest.raises(ValueError, match=r"True \(bool\) is not a path"):
        caption(caption_cfg(tmp_path, "true", ckpt))
    # 2023_01 is the int 202301 to Hydra: the error says so and how to quote it.
    (tmp_path / "2023_01").mkdir()
    Image.fromarray(picture(40, 30)).save(tmp_path / "2023_01" / "a.png")
    assert caption(caption_cfg(tmp_path, "2023_01", ckpt, "attention=false")) == 1
    assert caption(caption_cfg(tmp_path, "'2023_01'", ckpt, "attention=false")) == 0  # the shell's quotes gone
    out, err = capsys.readouterr()
    assert "202301: no such file or folder; Hydra read image as the number 202301" in err
    assert out.splitlines() == ["2023_01/a.png: " + out.splitlines()[0].split(": ", 1)[1]]


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("draft", [{}, {"draft_min_ratio": None}], ids=["draft", "full_decode"])
def test_inference_pixels_are_the_hdf5_rows_of_preprocessing(tmp_path, draft):
    """The same picture at two sizes: caption_images feeds exactly the preprocessed HDF5 rows
    (with the same JPEG draft setting)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    base = Image.fromarray(picture(300, 220))
    base.resize((123, 97)).save(folder / "big.jpg", quality=90)  # large enough for JPEG draft
    base.resize((45, 33)).save(folder / "small.png")
    base.convert("RGBA").resize((70, 50)).save(folder / "alpha.png")
    entries = [{"filename": name, "split": "train", "imgid": i,
                "sentences": [{"tokens": CAPTIONS[i % 2], "raw": " ".join(CAPTIONS[i % 2])}]}
               for i, name in enumerate(["big.jpg", "small.png", "alpha.png"])]
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "tiny", "images": entries}))
    create_input_files("tiny", tmp_path / "dataset.json", folder, captions_per_image=1, min_word_freq=1,
                       output_folder=tmp_path / "prepared", max_len=8, image_size=IMAGE_SIZE,
                       num_workers=0, progress=False, **draft)
    name = data_name("tiny", 1, 1)
    with h5py.File(tmp_path / "prepared" / f"TRAIN_IMAGES_{name}.hdf5", "r") as h5:
        rows = torch.from_numpy(h5["images"][:])
    order = json.loads((tmp_path / "prepared" / f"TRAIN_REFERENCES_{name}.json").read_text())["paths"]

    model = tiny_model()
    results = list(caption_images(model, order, IMAGE_SIZE, beam_size=3, max_len=6, batch_size=2,
                                  **draft))
    assert [str(r.path) for r in results] == order and all(r.ok for r in results)
    pixels = torch.stack([torch.from_numpy(r.image).permute(2, 0, 1) for r in results])
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, rows)
    # and the captions are those of the HDF5 rows, i.e. what evaluation on the split would produce
    expected = model.captioner.generate(rows, beam_size=3, max_len=6)
    assert [r.tokens for r in results] == [h[0].tokens for h in expected]
    assert [r.words for r in results] == [[model.word_map.word_of(t) for t in h[0].tokens] for h in expected]


@pytest.mark.parametrize("stored", [{}, {"draft_min_ratio": None}, {"draft_min_ratio": 0.5}])
def test_caption_cli_decodes_with_the_checkpoints_draft_setting(tmp_path, monkeypatch, stored):
    import captioner.caption as caption_module

    seen = []
    real = caption_module.load_image
    monkeypatch.setattr(caption_module, "load_image",
                        lambda path, size, ratio: seen.append(ratio) or real(path, size, ratio))
    model = tiny_model()
    model.run_config["data"].update(stored)
    ckpt = save_checkpoint(model, tmp_path / "model.ckpt")
    good = write_good_images(tmp_path / "images")
    assert caption(caption_cfg(tmp_path, tmp_path / "images", ckpt, "attention=false")) == 0
    assert seen == [stored.get("draft_min_ratio", 0.8)] * len(good)


def test_result_alphas_have_one_row_per_figure_word(tmp_path):
    paths = write_good_images(tmp_path / "images")
    model = tiny_model()
    results = list(caption_images(model, paths, IMAGE_SIZE, beam_size=2, max_len=6))
    assert any(r.finished for r in results)  # the <end> bias makes some captions finish
    for r in results:
        words = r.figure_words(model.word_map)
        assert r.alphas.shape == (len(words), 4)
        assert words[-1] == "<end>" if r.finished else len(words) == 6
        torch.testing.assert_close(r.alphas.sum(dim=1), torch.ones(len(words)))


# ----------------------------------------------------------------------------- helpers
def test_find_images_sorts_skips_hidden_and_non_images_and_recurses_on_request(tmp_path):
    for name in ["b.jpg", "A.PNG", "sub/c.jpeg", ".hidden.jpg", "notes.txt", ".cache/d.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["A.PNG", "b.jpg"]
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path, recursive=True)] == \
        ["A.PNG", "b.jpg", "sub/c.jpeg"]
    with pytest.raises(NotADirectoryError, match="b.jpg is not a folder"):
        find_images(tmp_path / "b.jpg")


def test_figure_names_keep_sub_folders_and_never_collide(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "a.png", tmp_path / "sub" / "a.jpg", Path("/elsewhere/a.gif")]
    names = figure_names(paths, [tmp_path, tmp_path, tmp_path, None])
    assert [n.as_posix() for n in names] == ["a.png", "a-2.png", "sub/a.png", "a-3.png"]


def test_conf_caption_composes_with_the_documented_defaults():
    cfg = compose("caption", ["image=x.jpg"])
    assert (cfg.beam, cfg.attention, cfg.ckpt_path, cfg.image_size, cfg.recursive) == (5, True, None, None, False)
    assert (ROOT / "conf" / "caption.yaml").is_file()
