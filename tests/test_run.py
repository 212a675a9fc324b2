"""End-to-end training: configs compose to the documented values, and a tiny shapes run writes
metrics, checkpoints (word map, data fingerprint, config) and TensorBoard logs that other code relies on.

One tiny run (48 train / 16 val / 16 test images, 16-wide decoder) is trained once per module and
shared; tests that need their own run reuse its prepared data folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from captioner import run
from captioner.lit_module import CaptioningModule, FiniteLossCheck
from captioner.vocab import WordMap
from conftest import CONF, ROOT, compose, one_thread, tiny_overrides

DATA_NAME = "shapes_5_cap_per_img_1_min_word_freq"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


# ---------------------------------------------------------------------- helpers
def run_overrides(root: Path, data_dir: Path, extra: list[str] = (), **sizes) -> list[str]:
    """``tiny_overrides(root)`` with the data under ``data_dir``; ``extra`` replaces keys it repeats."""
    merged: dict[str, str] = {}
    for item in tiny_overrides(root, **sizes) + [f"paths.data_dir={data_dir}"] + list(extra):
        merged[item.split("=", 1)[0]] = item
    return list(merged.values())


class Probe:
    """A Lightning callback calling ``fn(trainer, module)`` at one hook (added via ``run.build_callbacks``)."""

    def __init__(self, hook: str, fn):
        from lightning.pytorch import Callback

        self.callback = type("ProbeCallback", (Callback,), {hook: lambda _, t, m: fn(t, m)})()


def train_with(cfg, callbacks=()) -> tuple[dict[str, float], CaptioningModule | None]:
    """``run.train(cfg)`` with extra callbacks; returns its metrics and the module it tested."""
    tested: list[CaptioningModule] = []
    build_callbacks, report_test = run.build_callbacks, run.report_test
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "build_callbacks", lambda c: build_callbacks(c) + list(callbacks))
        mp.setattr(run, "report_test", lambda model, n: (tested.append(model), report_test(model, n)))
        metrics = run.train(cfg)
    return metrics, (tested[0] if tested else None)


def split_images(data_dir: Path, n: int = 6) -> torch.Tensor:
    """The first ``n`` prepared test images, uint8 (n, 3, S, S)."""
    import h5py

    with h5py.File(data_dir / "shapes" / "prepared" / f"TEST_IMAGES_{DATA_NAME}.hdf5", "r") as h5:
        return torch.from_numpy(h5["images"][:n])



def captions_of(model: CaptioningModule, images: torch.Tensor, beam_size: int = 3):
    model.eval()
    with torch.no_grad():
        hyps = model.captioner.generate(images, beam_size=beam_size, max_len=20, num_return=beam_size)
    return [[(h.tokens, h.score) for h in per_image] for per_image in hyps]


def tb_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny quickstart run: (root, cfg, metrics, the module after its test, run folder)."""
    root = tmp_path_factory.mktemp("trained")
    with one_thread():
        cfg = compose("train", run_overrides(root, root / "data", [
            "model.test_search.beam_size=2", "trainer.log_every_n_steps=1"]))
        metrics, model = train_with(cfg)
    return {"root": root, "cfg": cfg, "metrics": metrics, "model": model,
            "run_dir": Path(cfg.paths.output_dir), "data_dir": root / "data"}


# ---------------------------------------------------------------------- configs
EXPECTED = {
    "quickstart": {"model.encoder.arch": "resnet18", "model.encoder.last_stage": 3,
                   "model.encoder.pretrained": False, "data.dataset": "shapes",
                   "trainer.accelerator": "cpu"},
    "coco_frozen_encoder": {"model.encoder.arch": "resnet101", "model.fine_tune_encoder": False,
                            "model.decoder_lr": 4e-4, "data.dataset": "coco"},
    "coco_finetune_encoder": {"model.encoder.arch": "resnet101", "model.fine_tune_encoder": True,
                              "model.encoder.fine_tune_from": 2, "model.encoder_lr": 1e-4,
                              "model.decoder_lr": 4e-4, "data.dataset": "coco", "init_from": "x"},
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_documented_values(name, tmp_path):
    overrides = [f"experiment={name}", f"paths.output_dir={tmp_path}"]
    if name == "coco_finetune_encoder":
        overrides.append("init_from=x")
    cfg = compose("train", overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["model"]["_target_"] == "captioner.lit_module.CaptioningModule"
    for key, value in EXPECTED.get(name, {}).items():
        assert OmegaConf.select(cfg, key) == value, f"experiment={name}: {key}"


def test_finetune_experiment_requires_init_from(tmp_path):
    cfg = compose("train", ["experiment=coco_finetune_encoder", f"paths.output_dir={tmp_path}",
                            f"paths.output_root={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"])
    with pytest.raises(ValueError, match="init_from="):
        run.train(cfg)
    assert not (tmp_path / "data").exists()  # refused before touching any data


@pytest.mark.parametrize("name", DEBUGS)
def test_debug_configs_compose(name, tmp_path):
    cfg = compose("train", tiny_overrides(tmp_path) + [f"debug={name}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if name == "fast":
        assert cfg.trainer.fast_dev_run is True
    if name == "overfit":
        assert cfg.trainer.overfit_batches == 2 and cfg.model.decoder.dropout == 0.0
        assert cfg.callbacks.early_stopping is None


def test_cli_override_shows_in_job_config():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "model.fine_tune_encoder=true",
                          "--cfg", "job"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert job.model.fine_tune_encoder is True
    assert job.model.encoder.arch == "resnet101"  # the default model is untouched otherwise


# ---------------------------------------------------------------------- one tiny run
def test_metrics_json_has_bleu_in_unit_range(trained):
    saved = json.loads((trained["run_dir"] / "metrics.json").read_text())
    for key in ("val/bleu4", "test/bleu4", "val/best_bleu4"):
        assert 0.0 <= saved["metrics"][key] <= 1.0, key
    assert saved["metrics"]["test/bleu4"] == pytest.approx(trained["metrics"]["test/bleu4"])
    assert Path(saved["best_checkpoint"]) == trained["run_dir"] / "checkpoints" / "best.ckpt"


def test_checkpoints_and_latest_link(trained):
    checkpoints = trained["run_dir"] / "checkpoints"
    assert (checkpoints / "best.ckpt").is_file() and (checkpoints / "last.ckpt").is_file()
    link = trained["root"] / "outputs" / "train" / "latest"
    assert link.is_symlink()
    assert link.resolve() == trained["run_dir"].resolve()
    assert not os.path.isabs(os.readlink(link))  # relative: the outputs folder can move
    assert run.latest_run(trained["root"] / "outputs") == trained["run_dir"].resolve()


def test_checkpoint_contents(trained):
    checkpoint = torch.load(trained["run_dir"] / "checkpoints" / "best.ckpt", weights_only=True)
    prepared = json.loads((trained["data_dir"] / "shapes" / "prepared" / f"WORDMAP_{DATA_NAME}.json").read_text())
    assert checkpoint["word_map"] == prepared
    assert isinstance(checkpoint["data_fingerprint"], str) and checkpoint["data_fingerprint"]
    assert checkpoint["hyper_parameters"]["data"]["fingerprint"] == checkpoint["data_fingerprint"]
    config = checkpoint["config"]
    assert config["data"]["dataset"] == "shapes"
    assert config["model"]["decoder"]["decoder_dim"] == 16
    assert checkpoint["hyper_parameters"]["encoder"]["pretrained"] is False
    assert checkpoint["hyper_parameters"]["vocab_size"] == len(prepared)


def test_epoch_means_are_the_row_weighted_means_of_the_steps(trained):
    """train/loss_epoch and train/top5_epoch (summed on the device, logged at epoch end) are
    what Lightning's on_epoch=True would log: the mean of the steps, weighted by their rows
    (equal here: every batch has the same number of caption rows)."""
    acc = tb_events(trained["run_dir"] / "tensorboard")
    for key in ("train/loss", "train/top5"):
        steps = [e.value for e in acc.Scalars(key)]
        (epoch,) = acc.Scalars(f"{key}_epoch")
        assert len(steps) == 6  # 48 images / batch 8, log_every_n_steps=1
        assert epoch.value == pytest.approx(sum(steps) / len(steps), rel=1e-5)


def test_tensorboard_logs(trained):
    acc = tb_events(trained["run_dir"] / "tensorboard")
    tags = acc.Tags()
    # Lightning names a value logged on_step and on_epoch "<key>_step" and "<key>_epoch".
    expected = {"train/loss", "train/loss_epoch", "train/top5", "val/loss", "val/top5", "lr-Adam/decoder",
                *(f"val/bleu{n}" for n in range(1, 5))}
    assert expected <= set(tags["scalars"])
    for n in range(1, 5):
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars(f"val/bleu{n}"))
    assert acc.Scalars("lr-Adam/decoder")[0].value == pytest.approx(trained["cfg"].model.decoder_lr)
    assert "val/attention" in tags["images"]
    text_tags = [t for t in tags["tensors"] if t.startswith("val/examples")]
    assert text_tags
    table = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert table.strip()


def test_csv_logger_writes_val_bleu4(trained, tmp_path):
    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        "logger=csv", "test_after_fit=false", "++trainer.limit_train_batches=1"]))
    run.train(cfg)
    import csv

    csv_files = list((tmp_path / "outputs" / "run" / "csv").rglob("metrics.csv"))
    assert len(csv_files) == 1
    rows = list(csv.DictReader(csv_files[0].open()))
    values = [float(r["val/bleu4"]) for r in rows if r.get("val/bleu4")]
    assert len(values) == 1 and 0.0 <= values[0] <= 1.0


def test_checkpoint_reloads_elsewhere_with_same_captions(trained, tmp_path, monkeypatch):
    elsewhere = tmp_path / "copied"
    elsewhere.mkdir()
    copy = elsewhere / "model.ckpt"
    shutil.copy(trained["run_dir"] / "checkpoints" / "best.ckpt", copy)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    images = split_images(trained["data_dir"])
    in_memory = trained["model"].cpu()  # holds best.ckpt's weights: training tested with them
    loaded = CaptioningModule.load_from_checkpoint(copy, map_location="cpu", weights_only=True)
    assert loaded.word_map == in_memory.word_map
    expected, actual = in_memory.captioner.state_dict(), loaded.captioner.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert captions_of(loaded, images) == captions_of(in_memory, images)
    assert loaded.run_config["model"]["decoder"]["decoder_dim"] == 16


def test_load_with_other_word_map_is_refused(trained):
    words = trained["model"].word_map.to_dict()
    other = dict(words)
    renamed = next(w for w in words if not w.startswith("<"))
    other[renamed + "_x"] = other.pop(renamed)  # same size, one different word
    with pytest.raises(ValueError, match="word map"):
        CaptioningModule.load_from_checkpoint(trained["run_dir"] / "checkpoints" / "best.ckpt",
                                              map_location="cpu", weights_only=True,
                                              word_map=WordMap.from_dict(other))


def test_init_from_other_word_map_is_refused(trained, tmp_path):
    checkpoint = torch.load(trained["run_dir"] / "checkpoints" / "best.ckpt", weights_only=True)
    words = checkpoint["word_map"]
    renamed = next(w for w in words if not w.startswith("<"))
    words[renamed + "_x"] = words.pop(renamed)
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [f"init_from={foreign}"]))
    with pytest.raises(ValueError, match="word map"):
        run.train(cfg)
    assert not (tmp_path / "outputs" / "run" / "checkpoints").exists()


def test_init_from_copies_weights_with_fresh_optimizer(trained, tmp_path):
    source = trained["run_dir"] / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(source, weights_only=True)
    assert checkpoint["global_step"] > 0 and checkpoint["optimizer_states"][0]["state"]
    seen = {}

    def record(trainer, module):
        seen["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        seen["optimizer_state"] = dict(trainer.optimizers[0].state)
        seen["step"], seen["epoch"] = trainer.global_step, trainer.current_epoch

    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        f"init_from={source}", "test_after_fit=false", "logger=none",
        "++trainer.limit_train_batches=1", "++trainer.limit_val_batches=1"]))
    train_with(cfg, [Probe("on_train_start", record).callback])
    stored = checkpoint["state_dict"]
    assert seen["state"].keys() == stored.keys()
    assert all(torch.equal(seen["state"][k], stored[k]) for k in stored)
    assert seen["optimizer_state"] == {} and seen["step"] == 0 and seen["epoch"] == 0


def test_validation_every_other_epoch_steps_the_lr_scheduler_at_validations(trained, tmp_path):
    """check_val_every_n_epoch=2 (debug=overfit uses 10): the plateau scheduler monitors val/bleu4,
    so it is stepped only at the epochs that validate (before: a crash after epoch 0)."""
    seen = []

    def record(trainer, module):
        (config,) = trainer.lr_scheduler_configs
        seen.append((trainer.current_epoch, config.frequency, config.scheduler.last_epoch))

    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "test_after_fit=false",
        "logger=none", "++trainer.limit_train_batches=1", "++trainer.limit_val_batches=1"]))
    metrics, _ = train_with(cfg, [Probe("on_train_epoch_end", record).callback])
    assert 0.0 <= metrics["val/bleu4"] <= 1.0
    # last_epoch counts the steps taken: after the validations ending epochs 1 and 3 only.
    assert seen == [(0, 2, 0), (1, 2, 0), (2, 2, 1), (3, 2, 1)]


@pytest.mark.parametrize("validation", [
    ["trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=2"],
    ["++trainer.limit_val_batches=0", "callbacks.early_stopping=null"]], ids=["by_steps", "none"])
def test_validation_by_steps_or_none_does_not_stop_training(trained, tmp_path, validation):
    """Validation every 2 steps of 1-step epochs, or no validation (early stopping off): epochs
    end without a val/bleu4 and the plateau scheduler skips them instead of stopping the run; an
    epoch end that repeats the last validation's score is not counted again (by_steps: 2
    validations, 2 scheduler steps in 4 epochs)."""
    steps = []

    def record(trainer, module):
        steps.append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)

    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        "trainer.max_epochs=4", "test_after_fit=false", "logger=none", "++trainer.limit_train_batches=1",
        *validation]))
    metrics, _ = train_with(cfg, [Probe("on_train_epoch_start", record).callback,
                                  Probe("on_train_end", record).callback])
    by_steps = validation[0] != "++trainer.limit_val_batches=0"
    assert ("val/bleu4" in metrics) == by_steps
    assert steps == ([0, 0, 1, 1, 2] if by_steps else [0, 0, 0, 0, 0])


def test_lr_logged_after_resume_is_the_replayed_schedulers(trained, tmp_path):
    """Resumed from an epoch-end checkpoint, ExactResume replays the plateau scheduler's skipped
    step before the first resumed epoch; LearningRateMonitor logs that epoch's LR after it."""
    import csv

    checkpoint = torch.load(trained["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    (scheduler,) = checkpoint["lr_schedulers"]
    # An unreachable best score and no patience: the replayed step cuts the LR by lr_factor.
    scheduler.update(best=2.0, patience=0, num_bad_epochs=0)
    source = tmp_path / "epoch0.ckpt"
    torch.save(checkpoint, source)
    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        f"ckpt_path={source}", "trainer.max_epochs=2", "logger=csv", "test_after_fit=false",
        "++trainer.limit_train_batches=1", "++trainer.limit_val_batches=1"]))
    run.train(cfg)
    (csv_file,) = (tmp_path / "outputs" / "run" / "csv").rglob("metrics.csv")
    logged = [float(r["lr-Adam/decoder"]) for r in csv.DictReader(csv_file.open()) if r.get("lr-Adam/decoder")]
    lr = checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]
    assert logged == [pytest.approx(lr * cfg.model.lr_factor)]


def test_lightning_default_bar_still_shows_the_training_loss(trained, tmp_path):
    """Without our bar (callbacks=none), train/loss is a Lightning progress-bar metric again."""
    from lightning.pytorch import Callback

    seen = []

    class Seen(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append("train/loss" in trainer.progress_bar_metrics)

    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        "callbacks=none", "trainer.enable_progress_bar=true", "test_after_fit=false", "logger=none",
        "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1"]))
    train_with(cfg, [Seen()])
    assert seen == [True, True]


def test_resumed_run_stores_its_own_config(trained, tmp_path):
    """A run resumed with ckpt_path writes its own config into its checkpoints, not the config
    of the run that wrote the checkpoint it resumed."""
    source = trained["run_dir"] / "checkpoints" / "last.ckpt"
    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        f"ckpt_path={source}", "trainer.max_epochs=2", "model.val_search.max_len=7",
        "test_after_fit=false", "logger=none", "++trainer.limit_train_batches=1",
        "++trainer.limit_val_batches=1"]))
    run.train(cfg)
    stored = torch.load(tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["epoch"] == 1
    assert stored["config"]["ckpt_path"] == str(source)
    assert stored["config"]["paths"]["output_dir"] == str(tmp_path / "outputs" / "run")
    assert stored["config"]["model"]["val_search"]["max_len"] == 7
    assert stored["hyper_parameters"]["val_search"]["max_len"] == 7


def test_fresh_run_in_a_folder_with_checkpoints_is_refused(trained, tmp_path):
    """A second fresh run in the same run folder would leave the first run's best.ckpt as the one
    evaluate.py takes (its own becomes best-v1.ckpt) and overwrite its last.ckpt: refused."""
    checkpoints = tmp_path / "outputs" / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("best.ckpt", "last.ckpt"):
        shutil.copy(trained["run_dir"] / "checkpoints" / name, checkpoints / name)
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    cfg = compose("train", run_overrides(tmp_path, tmp_path / "data", ["logger=none"]))
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*checkpoints: best.ckpt, last.ckpt\).*"
                                              r"auto_resume=true.*hydra.run.dir"):
        run.train(cfg)
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
    assert not (tmp_path / "data").exists()  # refused before preparing any data


def test_slurm_checkpoint_of_another_run_in_the_folder_is_refused(trained, tmp_path, monkeypatch):
    """Under Slurm, Lightning resumes a fresh run from the folder's hpc_ckpt_*.ckpt by itself: one
    written by a run with other settings (stage 1, when stage 2 shares its job folder) is refused."""
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    shutil.copy(trained["run_dir"] / "checkpoints" / "last.ckpt", run_dir / "hpc_ckpt_1.ckpt")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    same = OmegaConf.create(OmegaConf.to_container(trained["cfg"], resolve=True))
    run.refuse_used_folder(run_dir, [run_dir / "checkpoints"], same)  # a requeue: Lightning resumes it
    other = OmegaConf.merge(same, {"model": {"decoder_lr": 1e-4}})
    with pytest.raises(ValueError, match=r"Lightning would resume this Slurm job from .*hpc_ckpt_1.ckpt.*"
                                         r"model.decoder_lr: 0.001 there, 0.0001 here"):
        run.refuse_used_folder(run_dir, [run_dir / "checkpoints"], other)


def test_auto_resume_refuses_another_runs_checkpoint(trained, tmp_path):
    """auto_resume=true in a folder holding a checkpoint of a run with other model settings (say
    stage 1, when stage 2 shares its Slurm job folder) refuses it instead of resuming the wrong model."""
    checkpoints = tmp_path / "outputs" / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(trained["run_dir"] / "checkpoints" / "last.ckpt", checkpoints / "last.ckpt")
    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        "logger=none", "auto_resume=true", "model.decoder.dropout=0.1"]))
    with pytest.raises(ValueError, match=r"model.decoder.dropout: 0.3 there, 0.1 here.*"
                                         r"another run's checkpoint.*ckpt_path="):
        run.train(cfg)
    # The same settings: a requeued job continues itself.
    same = OmegaConf.to_container(trained["cfg"], resolve=True)
    run.check_same_run(checkpoints / "last.ckpt", OmegaConf.create({**same, "auto_resume": True}), "found")


def test_nan_loss_stops_training_and_keeps_best_checkpoint(trained, tmp_path):
    best = tmp_path / "outputs" / "run" / "checkpoints" / "best.ckpt"
    before = {}

    def poison(trainer, module):
        if trainer.current_epoch == 1:
            before["bytes"], before["mtime"] = best.read_bytes(), best.stat().st_mtime_ns
            with torch.no_grad():
                next(module.captioner.decoder.parameters()).fill_(float("nan"))

    cfg = compose("train", run_overrides(tmp_path, trained["data_dir"], [
        "trainer.max_epochs=2", "logger=none", "++trainer.limit_val_batches=1"]))
    with pytest.raises(FloatingPointError, match="non-finite training loss.*epoch 1"):
        train_with(cfg, [Probe("on_train_epoch_start", poison).callback])
    assert before, "the NaN was never injected"
    assert best.read_bytes() == before["bytes"] and best.stat().st_mtime_ns == before["mtime"]
    assert torch.load(best, weights_only=True)["epoch"] == 0


def test_finite_loss_check_reports_the_first_non_finite_step_once():
    """Steps are checked in order; the first non-finite one is reported with its epoch and step
    and the terms of the loss, and the check is then clear (no second report)."""
    check = FiniteLossCheck()
    nan, inf = torch.tensor(float("nan")), torch.tensor(float("inf"))
    check.add(torch.tensor(2.5), torch.tensor(2.0), torch.tensor(0.5), epoch=0, step=7)
    check.check(wait=False)  # finite: nothing to report
    check.add(inf, inf, torch.tensor(0.1), epoch=1, step=8)
    check.add(nan, nan, nan, epoch=1, step=9)
    with pytest.raises(FloatingPointError, match=r"\(inf\) at epoch 1, step 8: cross-entropy inf"):
        check.check(wait=False)
    check.check(wait=True)  # the later step was dropped with the report
    check.add(nan, nan, nan, epoch=2, step=3)
    check.clear()  # a new fit starts clean
    check.check(wait=True)


# ---------------------------------------------------------------------- learning
@pytest.mark.slow
def test_shapes_training_improves_bleu(tmp_path):
    """A fixed-seed run on a learnable set (400 images, 5 epochs): val BLEU rises well above epoch 1's."""
    cfg = compose("train", run_overrides(tmp_path, tmp_path / "data", [
        "logger=csv", "test_after_fit=false", "trainer.max_epochs=5", "data.batch_size=16",
        "model.decoder.embed_dim=64", "model.decoder.decoder_dim=64", "model.decoder.attention_dim=64",
        "model.decoder.dropout=0.0"], num_train=400, num_eval=32))
    metrics = run.train(cfg)
    import csv

    rows = csv.DictReader(next((tmp_path / "outputs" / "run" / "csv").rglob("metrics.csv")).open())
    epochs = [(float(r["val/bleu1"]), float(r["val/bleu4"])) for r in rows if r.get("val/bleu4")]
    assert len(epochs) == 5
    (bleu1_first, bleu4_first), (bleu1_last, _) = epochs[0], epochs[-1]
    assert bleu1_last > bleu1_first + 0.1
    assert metrics["val/best_bleu4"] > bleu4_first + 0.1
    assert metrics["val/best_bleu4"] == pytest.approx(max(b4 for _, b4 in epochs))


def test_bf16_mixed_precision_trains_with_fp32_master_weights(tmp_path):
    """trainer.precision=bf16-mixed (CPU autocast here): a finite loss, BLEU in [0, 1], and the
    saved weights stay float32 (autocast changes the compute dtype, not the parameters)."""
    cfg = compose("train", run_overrides(tmp_path, tmp_path / "data", ["trainer.precision=bf16-mixed"]))
    metrics = run.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    assert 0.0 <= metrics["test/bleu4"] <= 1.0 and 0.0 <= metrics["val/bleu1"] <= 1.0
    checkpoint = torch.load(tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt",
                            map_location="cpu", weights_only=True)
    assert {t.dtype for t in checkpoint["state_dict"].values() if t.is_floating_point()} == {torch.float32}
