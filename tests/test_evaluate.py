"""End-to-end evaluation: ``run.evaluate`` on a tiny trained checkpoint reproduces what training's
test (and validation) step reported, writes results.json and COCO-format captions, and finds the
latest run's best checkpoint by default.

One small quickstart run (192 train / 16 val / 16 test images, 3 epochs, test beam 2; enough for a
non-zero BLEU-1) is trained once per module and shared.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import run
from conftest import ROOT, compose, tiny_overrides

BEAM = 2
MAX_LEN = 20  # the quickstart's val_search / test_search max_len


# ---------------------------------------------------------------------- helpers
def eval_config(root: Path, name: str, extra: list[str] = ()):
    """evaluate.yaml reading runs under ``root/outputs`` and writing to ``root/<name>``."""
    return compose("evaluate", [
        f"paths.output_root={root / 'outputs'}", f"paths.output_dir={root / name}",
        f"paths.data_dir={root / 'data'}", f"max_len={MAX_LEN}", "trainer=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.num_workers=0", *extra])


def float32(value: float) -> float:
    """A Python float as Lightning logs it (float32 tensor, back to float)."""
    return float(np.float32(value))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once: (root, training metrics, training's test results, val rows of metrics.csv, best path)."""
    root = tmp_path_factory.mktemp("evaluate")
    tested = []
    report_test = run.report_test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose("train", tiny_overrides(root, num_train=192) + [
            "trainer.max_epochs=3", "model.decoder.decoder_dim=32", "model.decoder.dropout=0.0",
            f"model.test_search.beam_size={BEAM}", "logger=csv"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run, "report_test", lambda model, n: (tested.append(model), report_test(model, n)))
            metrics = run.train(cfg)
    finally:
        torch.set_num_threads(threads)
    run_dir = Path(cfg.paths.output_dir)
    rows = csv.DictReader(next((run_dir / "csv").rglob("metrics.csv")).open())
    val_rows = {int(r["epoch"]): r for r in rows if r.get("val/bleu4")}
    return {"root": root, "metrics": metrics, "test_results": tested[0].test_results,
            "val_rows": val_rows, "best": run_dir / "checkpoints" / "best.ckpt", "run_dir": run_dir}


# ---------------------------------------------------------------------- reproduces training
def test_evaluate_reproduces_training_test_scores(trained, capsys):
    summary = run.evaluate(eval_config(trained["root"], "eval_test", [f"beam={BEAM}", "coco_metrics=true"]))
    expected = trained["test_results"]
    assert expected["search"]["beam_size"] == BEAM
    for n in range(1, 5):
        value = summary["metrics"][f"bleu{n}_nltk"]
        assert isinstance(value, float)
        assert value == expected["scores"][f"bleu{n}"]  # exactly: same weights, search, corpus
        assert float32(value) == trained["metrics"][f"test/bleu{n}"]
    assert summary["metrics"]["bleu1_nltk"] > 0.05  # a real score, not an all-zero corpus

    out = trained["root"] / "eval_test"
    captions = json.loads((out / f"captions_test_beam{BEAM}.json").read_text())
    assert captions == [{"image_id": int(i), "caption": " ".join(h)}
                        for i, h in zip(expected["image_ids"], expected["hypotheses"])]
    assert len(captions) == 16 and len({c["image_id"] for c in captions}) == 16

    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "test" and results["search"]["beam_size"] == BEAM
    assert results["num_images"] == 16
    assert Path(results["checkpoint"]) == trained["best"].resolve()
    coco = {k: v for k, v in results["metrics"].items() if k.startswith("coco_")}
    assert {"coco_bleu4", "coco_rougeL", "coco_cider"} <= set(coco)
    assert all(0.0 <= v <= 1.0 for k, v in coco.items() if k.startswith("coco_bleu"))
    assert str(trained["best"].resolve()) in capsys.readouterr().out  # says which checkpoint


def test_evaluate_val_split_matches_training_validation(trained):
    best_epoch = torch.load(trained["best"], weights_only=True)["epoch"]
    row = trained["val_rows"][best_epoch]
    # VAL: the tutorial's spelling (its file names) means the val split too.
    summary = run.evaluate(eval_config(trained["root"], "eval_val", ["split=VAL", "beam=1",
                                                                     "coco_metrics=false"]))
    assert summary["split"] == "val" and summary["num_images"] == 16
    for n in range(1, 5):
        assert float32(summary["metrics"][f"bleu{n}_nltk"]) == float(row[f"val/bleu{n}"])
    captions = json.loads((trained["root"] / "eval_val" / "captions_val_beam1.json").read_text())
    test_ids = set(trained["test_results"]["image_ids"])
    assert len(captions) == 16 and not test_ids & {c["image_id"] for c in captions}
    assert not any(k.startswith("coco_") for k in summary["metrics"])


@pytest.mark.parametrize("split", ["train", "tset"])
def test_other_splits_are_refused_before_any_work(split, tmp_path):
    with pytest.raises(ValueError, match=rf"split='{split}': evaluate.py scores the test or val split"):
        run.evaluate(eval_config(tmp_path, "eval", [f"split={split}"]))
    assert not (tmp_path / "eval").exists()


def test_evaluate_never_rebuilds_the_data_of_an_overwrite_run(trained, tmp_path):
    """A checkpoint of a run trained with data.overwrite=true: scoring it uses the prepared files."""
    checkpoint = torch.load(trained["best"], weights_only=True)
    checkpoint["config"]["data"]["overwrite"] = True
    copy = tmp_path / "overwrite.ckpt"
    torch.save(checkpoint, copy)
    prepared = sorted((trained["root"] / "data").rglob("*.hdf5"))
    before = [p.stat().st_mtime_ns for p in prepared]
    summary = run.evaluate(eval_config(trained["root"], "eval_overwrite", [
        f"ckpt_path={copy}", "beam=1", "coco_metrics=false"]))
    assert summary["num_images"] == 16
    assert [p.stat().st_mtime_ns for p in prepared] == before


# ---------------------------------------------------------------------- which checkpoint
def test_default_checkpoint_is_best_of_latest_run(trained, tmp_path):
    outputs = tmp_path / "outputs"
    older, newer = outputs / "train" / "older", outputs / "train" / "newer"
    for folder in (older, newer):
        (folder / "checkpoints").mkdir(parents=True)
        shutil.copy(trained["best"], folder / "checkpoints" / "best.ckpt")
        shutil.copy(trained["best"], folder / "checkpoints" / "last.ckpt")
    run.point_latest(older, outputs / "train")
    run.point_latest(newer, outputs / "train")
    cfg = eval_config(tmp_path, "eval")
    assert run.resolve_checkpoint(cfg) == (newer / "checkpoints" / "best.ckpt").resolve()
    (newer / "checkpoints" / "best.ckpt").unlink()  # falls back to last.ckpt
    assert run.resolve_checkpoint(cfg) == (newer / "checkpoints" / "last.ckpt").resolve()
    (newer / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoints/best.ckpt or last.ckpt"):
        run.resolve_checkpoint(cfg)
    explicit = eval_config(tmp_path, "eval", [f"ckpt_path={older / 'checkpoints' / 'best.ckpt'}"])
    assert run.resolve_checkpoint(explicit) == older / "checkpoints" / "best.ckpt"


def test_missing_latest_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no training run found: .*latest does not exist.*ckpt_path="):
        run.evaluate(eval_config(tmp_path, "eval"))
    assert not (tmp_path / "eval" / "results.json").exists()


# ---------------------------------------------------------------------- the CLI
def test_evaluate_cli_multirun_over_beams(trained, tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "-m", "beam=1,2",
         f"paths.output_root={trained['root'] / 'outputs'}", f"hydra.sweep.dir={sweep}",
         f"max_len={MAX_LEN}", "coco_metrics=false", "trainer=cpu", "data.num_workers=0",
         "trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2
    summaries = [json.loads(p.read_text()) for p in results]
    assert sorted(s["search"]["beam_size"] for s in summaries) == [1, 2]
    for s in summaries:
        assert Path(s["checkpoint"]) == trained["best"].resolve() and s["num_images"] == 16
    beam2 = next(s for s in summaries if s["search"]["beam_size"] == BEAM)
    assert beam2["metrics"]["bleu4_nltk"] == trained["test_results"]["scores"]["bleu4"]


# ---------------------------------------------------------------------- one encoder pass
@pytest.fixture
def encoder_passes(monkeypatch):
    """What each validation and test batch ran, however Lightning runs them: ``{"val": [...],
    "test": [...]}``, one ``(batch size, [images of each encoder call], teacher-forced decoder
    passes)`` per batch."""
    from captioner.lit_module import CaptioningModule
    from captioner.models.decoder import AttentionLSTMDecoder
    from captioner.models.encoder import ImageEncoder

    calls: list[int] = []
    teacher_forced: list[int] = []
    batches: dict[str, list[tuple[int, list[int], int]]] = {"val": [], "test": []}
    encoder_forward, decoder_forward = ImageEncoder.forward, AttentionLSTMDecoder.forward

    def counting_encoder(self, images):
        calls.append(images.size(0))
        return encoder_forward(self, images)

    def counting_decoder(self, *args, **kwargs):
        teacher_forced.append(1)
        return decoder_forward(self, *args, **kwargs)

    def counted(stage: str, step):
        def wrapper(self, batch, batch_idx):
            start, passes = len(calls), len(teacher_forced)
            result = step(self, batch, batch_idx)
            batches[stage].append((batch["images"].size(0), calls[start:],
                                   len(teacher_forced) - passes))
            return result
        return wrapper

    monkeypatch.setattr(ImageEncoder, "forward", counting_encoder)
    monkeypatch.setattr(AttentionLSTMDecoder, "forward", counting_decoder)
    monkeypatch.setattr(CaptioningModule, "validation_step",
                        counted("val", CaptioningModule.validation_step))
    monkeypatch.setattr(CaptioningModule, "test_step", counted("test", CaptioningModule.test_step))
    return batches


def test_every_validation_and_test_batch_encodes_its_images_once(tmp_path, encoder_passes):
    """train.py's validation and test, and evaluate.py, with the default loaders (2 persistent
    workers): the encoder runs once per batch, on that batch's images; its features serve both
    the teacher-forced loss and the search. evaluate.py, which reports no loss, runs no
    teacher-forced pass."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.num_workers=")]
    cfg = compose("train", overrides + [f"model.test_search.beam_size={BEAM}", "logger=csv"])
    assert cfg.data.num_workers == 2 and cfg.data.persistent_workers  # the defaults
    metrics = run.train(cfg)
    assert "test/loss" in metrics and 0.0 <= metrics["test/bleu4"] <= 1.0
    val, test = encoder_passes["val"], encoder_passes["test"]
    assert sum(size for size, _, _ in val) == 16 + 16  # the sanity check's 2 batches, then the epoch
    assert sum(size for size, _, _ in test) == 16
    assert all(calls == [size] and passes == 1 for size, calls, passes in val + test), val + test

    encoder_passes["test"].clear()
    summary = run.evaluate(compose("evaluate", [
        f"paths.output_root={tmp_path / 'outputs'}", f"paths.output_dir={tmp_path / 'eval'}",
        f"paths.data_dir={tmp_path / 'data'}", f"ckpt_path={cfg.paths.output_dir}/checkpoints/best.ckpt",
        f"beam={BEAM}", f"max_len={MAX_LEN}", "batch_size=8", "trainer=cpu", "coco_metrics=false",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]))
    assert summary["num_images"] == 16
    assert float32(summary["metrics"]["bleu4_nltk"]) == metrics["test/bleu4"]
    assert encoder_passes["test"] == [(8, [8], 0), (8, [8], 0)]
