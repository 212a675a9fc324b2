"""Scale-out correctness with ``trainer=ddp_cpu`` (2 CPU processes, gloo).

* Exact metrics: validation and test BLEU under DDP are computed once over the full split, so they
  equal the one-process values to the last digit, on an ODD-sized split (the DistributedSampler pads
  it by repeating an image, which ``CaptionAccumulator`` drops again).
* One run folder: Lightning re-runs ``train.py`` for rank 1 with ``hydra.run.dir`` set to rank 0's
  folder; nothing lands in the working directory except ``outputs/`` and ``data/``, and rank 0
  alone writes checkpoints and TensorBoard files.
* Batch sizes: per-device and effective batch are logged and written to metrics.json.

One tiny DDP training (``python train.py trainer=ddp_cpu``, cwd = a tmp folder) is shared by the
tests of this module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest

from captioner import run
from captioner.cider import cider_d_corpus
from captioner.metrics import corpus_bleu_scores
from conftest import compose

REPO = Path(__file__).resolve().parents[1]
DATA_NAME = "shapes_5_cap_per_img_1_min_word_freq"
NUM_EVAL = 15  # odd: 2 ranks get 8 images each, one of them a repeat
MAX_LEN = 20  # the quickstart's val_search / test_search max_len
TEST_BEAM = 3  # the quickstart's test_search beam_size


def float32(value: float) -> float:
    """A Python float as Lightning logs it (float32 tensor, back to float)."""
    return float(np.float32(value))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    return env


def _run(script: str, cwd: Path, overrides: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / script), *overrides]
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """``python train.py trainer=ddp_cpu`` in an empty folder: relative default output root,
    data under the same folder; 160 train / 15 val / 15 test images, 3 epochs (about 15 s)."""
    cwd = tmp_path_factory.mktemp("ddp")
    overrides = [
        "experiment=quickstart", "trainer=ddp_cpu",
        f"paths.data_dir={cwd / 'data'}",  # output_root stays the default, relative "outputs"
        "data.synthetic.num_train=160", f"data.synthetic.num_val={NUM_EVAL}",
        f"data.synthetic.num_test={NUM_EVAL}", "data.num_workers=0", "data.batch_size=8",
        "model.decoder.embed_dim=32", "model.decoder.decoder_dim=32", "model.decoder.attention_dim=32",
        "model.decoder.dropout=0.0", "model.decoder_lr=3e-3", "model.encoder_lr=3e-3",
        "model.num_log_examples=2", "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    return {"cwd": cwd, "pid": proc.pid, "output": stdout + stderr, "data_dir": cwd / "data"}


def _run_folder(ddp_run: dict) -> Path:
    (run_dir,) = [p for p in (ddp_run["cwd"] / "outputs" / "train").iterdir() if p.name != "latest"]
    return run_dir


def _eval_config(ddp_run: dict, out: Path, extra: list[str]):
    data = ddp_run["data_dir"]
    return compose("evaluate", [
        f"paths.output_root={ddp_run['cwd'] / 'outputs'}", f"paths.output_dir={out}",
        f"paths.data_dir={data}", "trainer=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "data.num_workers=0", "coco_metrics=false",
        f"max_len={MAX_LEN}", "batch_size=4", *extra])


def _references(data_dir: Path, split: str) -> dict[int, list[list[str]]]:
    refs = json.loads((data_dir / "shapes" / "prepared" / f"{split.upper()}_REFERENCES_{DATA_NAME}.json").read_text())
    return dict(zip(refs["image_ids"], refs["tokens"]))


# ---------------------------------------------------------------------- batch sizes (fast)
@pytest.mark.parametrize("devices, num_nodes, accumulate, per_sample, images, captions", [
    (1, 1, 1, None, 8, 40),     # one device: the configured batch, all 5 captions per image
    (2, 1, 1, None, 16, 80),    # trainer=ddp_cpu
    (2, 3, 2, 2, 96, 192),      # 2 devices x 3 nodes x accumulate 2, 2 captions sampled per image
])
def test_batch_summary_counts_devices_nodes_and_accumulation(devices, num_nodes, accumulate, per_sample,
                                                             images, captions):
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp" if devices > 1 else "auto",
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    datamodule = SimpleNamespace(batch_size=8, captions_per_sample=per_sample, captions_per_image=5)
    summary = run.batch_summary(trainer, datamodule)
    assert summary["images_per_device"] == 8
    assert summary["captions_per_device"] == 8 * (per_sample or 5)
    assert (summary["devices"], summary["num_nodes"], summary["accumulate_grad_batches"]) == (devices, num_nodes,
                                                                                              accumulate)
    assert (summary["effective_images"], summary["effective_captions"]) == (images, captions)


# ---------------------------------------------------------------------- one run folder
@pytest.mark.slow
def test_ddp_train_writes_one_run_folder_from_rank_zero(ddp_run):
    cwd = ddp_run["cwd"]
    assert sorted(p.name for p in cwd.iterdir()) == ["data", "outputs"]
    assert sorted(p.name for p in (cwd / "outputs").iterdir()) == ["train"]
    run_dir = _run_folder(ddp_run)
    assert (cwd / "outputs" / "train" / "latest").resolve() == run_dir.resolve()

    # Both ranks joined one world; rank 1 logged into rank 0's folder and wrote no config of its own.
    members = set(re.findall(r"GLOBAL_RANK: (\d), MEMBER: (\d)/(\d)", ddp_run["output"]))
    assert members == {("0", "1", "2"), ("1", "2", "2")}
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in run_dir.rglob("config.yaml")) == ["config.yaml"]
    assert not list(run_dir.rglob(".pr*")) and not (run_dir / "lightning_logs").exists()

    # Checkpoints and TensorBoard come from rank 0 (the process we started) only.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    events = list(run_dir.rglob("events.out.tfevents.*"))
    assert events and {int(p.name.split(".")[-2]) for p in events} == {ddp_run["pid"]}

    # The batch line: per device and effective, LR as configured.
    log = (run_dir / "train.log").read_text()
    assert ("Batch: 8 images/device x 5 captions/image = 40 captions/device; 2 devices x 1 nodes x "
            "1 accumulate_grad_batches -> effective 16 images, 80 captions per optimiser step" in log)
    assert "not scaled with the batch (decoder_lr=0.003, encoder_lr=0.003)" in log
    batch = json.loads((run_dir / "metrics.json").read_text())["batch"]
    assert (batch["images_per_device"], batch["effective_images"], batch["effective_captions"]) == (8, 16, 80)


# ---------------------------------------------------------------------- exact metrics
@pytest.mark.slow
def test_ddp_train_val_and_test_bleu_equal_one_process(ddp_run, tmp_path):
    """The DDP run's logged val/test BLEU (float32, as Lightning logs) equal a one-process
    evaluation of its checkpoints on the same split and search: last.ckpt (the weights of the last
    validation) with the val search, best.ckpt (what test_after_fit tested) with the test search."""
    run_dir = _run_folder(ddp_run)
    logged = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    val = run.evaluate(_eval_config(ddp_run, tmp_path / "val", [
        "split=val", "beam=1", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]))
    test = run.evaluate(_eval_config(ddp_run, tmp_path / "test", [
        "split=test", f"beam={TEST_BEAM}", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"]))
    assert val["num_images"] == test["num_images"] == NUM_EVAL
    for n in range(1, 5):
        assert logged[f"val/bleu{n}"] == float32(val["metrics"][f"bleu{n}_nltk"]), n
        assert logged[f"test/bleu{n}"] == float32(test["metrics"][f"bleu{n}_nltk"]), n
    assert val["metrics"]["bleu1_nltk"] > 0.05  # a real corpus score, not all zeros
    # val/cider and test/cider: CIDEr-D of the same captions, DF from the split's references.
    for split, result in (("val", val), ("test", test)):
        assert logged[f"{split}/cider"] == float32(_cider_of(ddp_run, split, result)), split


def _cider_of(ddp_run: dict, split: str, result: dict) -> float:
    """CIDEr-D (one process) of the captions an evaluation wrote."""
    folder = Path(result["config"]["paths"]["output_dir"])
    captions = json.loads((folder / f"captions_{split}_beam{result['search']['beam_size']}.json").read_text())
    refs = _references(ddp_run["data_dir"], split)
    return cider_d_corpus([refs[c["image_id"]] for c in captions], [c["caption"].split() for c in captions])


@pytest.mark.slow
def test_ddp_scst_val_cider_equals_one_process(ddp_run, tmp_path):
    """quickstart_scst under trainer=ddp_cpu (each rank samples and rewards its own shard) from the
    DDP run's best weights: its logged val/cider equals a one-process evaluation of its weights."""
    best = _run_folder(ddp_run) / "checkpoints" / "best.ckpt"
    _run("train.py", tmp_path, [
        "experiment=quickstart_scst", "trainer=ddp_cpu", f"init_from={best}",
        f"paths.data_dir={ddp_run['data_dir']}", "hydra.run.dir=scst",  # the shapes loader: 2 persistent workers
        "data.batch_size=8", "data.synthetic.num_train=160", f"data.synthetic.num_val={NUM_EVAL}",
        f"data.synthetic.num_test={NUM_EVAL}", "model.decoder.embed_dim=32", "model.decoder.decoder_dim=32",
        "model.decoder.attention_dim=32", "model.decoder.dropout=0.0", "model.scst.max_len=10",
        "model.decoder_lr=1e-3", "model.encoder_lr=1e-3", "test_after_fit=false",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"], timeout=240)
    run_dir = tmp_path / "scst"
    logged = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    val = run.evaluate(_eval_config(ddp_run, tmp_path / "val", [
        "split=val", "beam=1", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]))
    assert logged["val/cider"] == float32(_cider_of(ddp_run, "val", val))
    assert logged["val/bleu4"] == float32(val["metrics"]["bleu4_nltk"])
    assert logged["val/best_cider"] == logged["val/cider"] and "train/reward_epoch" in logged


@pytest.mark.slow
def test_ddp_evaluate_equals_one_process_on_odd_split(ddp_run, tmp_path):
    """``evaluate.py trainer=ddp_cpu`` on the 15-image val split gives the same captions and the same
    BLEU-1..4 Python floats as one process; counting the sampler's repeated image would not."""
    ckpt = _run_folder(ddp_run) / "checkpoints" / "last.ckpt"
    single = run.evaluate(_eval_config(ddp_run, tmp_path / "single", ["split=val", "beam=2", f"ckpt_path={ckpt}"]))

    cwd = tmp_path / "ddp_cwd"
    cwd.mkdir()
    _run("evaluate.py", cwd, [
        "split=val", "beam=2", f"max_len={MAX_LEN}", "batch_size=4", f"ckpt_path={ckpt}", "trainer=ddp_cpu",
        "trainer.enable_progress_bar=false", "coco_metrics=false", "data.num_workers=0",
        f"paths.data_dir={ddp_run['data_dir']}"])
    (folder,) = list((cwd / "outputs" / "evaluate").iterdir())  # one folder for both ranks
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    ddp = json.loads((folder / "results.json").read_text())
    captions_ddp = json.loads((folder / "captions_val_beam2.json").read_text())
    captions_single = json.loads((tmp_path / "single" / "captions_val_beam2.json").read_text())

    assert ddp["num_images"] == single["num_images"] == NUM_EVAL
    assert captions_ddp == captions_single
    for n in range(1, 5):
        value = ddp["metrics"][f"bleu{n}_nltk"]
        assert isinstance(value, float) and value == single["metrics"][f"bleu{n}_nltk"], n

    # The check has teeth: with the DistributedSampler's repeat of the first image counted twice,
    # the corpus BLEU changes.
    refs = _references(ddp_run["data_dir"], "val")
    ids = [c["image_id"] for c in captions_single]
    hyps = [c["caption"].split() for c in captions_single]
    padded = corpus_bleu_scores([refs[i] for i in ids + ids[:1]], hyps + hyps[:1])
    assert corpus_bleu_scores([refs[i] for i in ids], hyps)["bleu1"] == single["metrics"]["bleu1_nltk"]
    assert any(padded[f"bleu{n}"] != single["metrics"][f"bleu{n}_nltk"] for n in range(1, 5))


# ---------------------------------------------------------------------- frozen encoder
@pytest.mark.slow
def test_ddp_with_a_frozen_encoder_folds_its_batchnorm_once_per_load(tmp_path):
    """DDP synchronises the buffers (the BatchNorm statistics) before each training forward;
    the frozen encoder's folded copy, which follows the frozen tensors' versions, must not be
    rebuilt for that: once per rank for training and once more for the test after fit
    (best.ckpt is loaded), not at each of the 20 steps."""
    out = _run("train.py", tmp_path, [
        "experiment=quickstart", "trainer=ddp_cpu", f"paths.data_dir={tmp_path / 'data'}",
        "data.synthetic.num_train=160", "data.synthetic.num_val=16", "data.synthetic.num_test=16",
        "data.num_workers=0", "data.batch_size=8", "model.fine_tune_encoder=false",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "hydra.verbose=captioner.models.encoder"])
    builds = (out.stdout + out.stderr).count("BatchNorm folded into the frozen stages")
    assert builds == 4, builds  # 2 ranks x (training, the test's reloaded checkpoint)
