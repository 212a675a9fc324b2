"""Exact resume: a run killed mid-epoch and resumed from ``last.ckpt`` ends where an uninterrupted
run ends; ``auto_resume`` picks the right checkpoint; ``init_from`` stays weights-only.

The SIGKILL test starts ``train.py`` as a subprocess. To kill it at a known point rather than
racing a timer, the victim run gets the :class:`PauseAt` callback (through a ``+callbacks.pause``
override with ``tests/`` on ``PYTHONPATH``): it writes a marker file after a chosen training batch
and then sleeps until the test kills the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class PauseAt(L.Callback):
    """After training batch ``batch`` of epoch ``epoch`` (both 0-based): touch ``marker``, then sleep.

    Used only by the victim run of the SIGKILL test; it keeps no state, so checkpoints written
    with and without it are the same.
    """

    def __init__(self, epoch: int, batch: int, marker: str, sleep_s: float = 300.0):
        self.epoch, self.batch, self.marker, self.sleep_s = int(epoch), int(batch), Path(marker), sleep_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            # Written whole, then renamed: the test kills this process as soon as the marker exists.
            tmp = self.marker.with_name(self.marker.name + ".tmp")
            tmp.write_text(f"epoch {self.epoch} batch {self.batch} global_step {trainer.global_step}\n")
            tmp.replace(self.marker)
            time.sleep(self.sleep_s)


def resume_overrides(tmp_path: Path, max_epochs: int = 3) -> list[str]:
    """A tiny deterministic run (about 3 s per epoch on one CPU) writing only under ``tmp_path``,
    with the quickstart's loader settings (2 persistent workers).

    ``lr_patience=1`` makes ReduceLROnPlateau cut the LR at every validation without a BLEU-4
    gain, so the scheduler's state changes between epochs and a wrong restore would show.
    """
    return [
        "experiment=quickstart",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_root={tmp_path / 'outputs'}",
        "data.synthetic.num_train=48",
        "data.synthetic.num_val=15",
        "data.synthetic.num_test=15",
        "data.batch_size=8",
        "model.decoder.embed_dim=16",
        "model.decoder.decoder_dim=16",
        "model.decoder.attention_dim=16",
        "model.num_log_examples=0",
        "model.lr_patience=1",
        "model.val_search.max_len=8",
        f"trainer.max_epochs={max_epochs}",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "test_after_fit=false",
        "seed=7",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    env.pop("SLURM_JOB_ID", None)
    return env


def scst_overrides(tmp_path: Path, init_from: Path) -> list[str]:
    """The tiny run as self-critical training (``quickstart_scst``) from ``init_from``, 2 epochs."""
    return ["experiment=quickstart_scst", *resume_overrides(tmp_path, max_epochs=2)[1:],
            f"init_from={init_from}", "model.scst.max_len=8", "model.scst.train_sample_n=3"]


def _train(tmp_path: Path, run_dir: Path, extra: list[str], timeout: float = 120,
           base: list[str] | None = None) -> subprocess.CompletedProcess:
    base = resume_overrides(tmp_path) if base is None else base
    cmd = [sys.executable, str(REPO / "train.py"), *base, f"hydra.run.dir={run_dir}", *extra]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _start_victim(tmp_path: Path, run_dir: Path, marker: Path, extra: list[str], batch: int = 2,
                  base: list[str] | None = None) -> subprocess.Popen:
    base = resume_overrides(tmp_path) if base is None else base
    cmd = [sys.executable, str(REPO / "train.py"), *base, f"hydra.run.dir={run_dir}",
           "+callbacks.pause._target_=test_resume.PauseAt", "+callbacks.pause.epoch=1",
           f"+callbacks.pause.batch={batch}", f"+callbacks.pause.marker={marker}", *extra]
    # A session of its own: the kill takes its loader workers and DDP ranks too, as a preemption does.
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_when_paused(proc: subprocess.Popen, marker: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the pause:\n{proc.stdout.read()[-6000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the run did not reach epoch 1 in time")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


#: Loader, sampler and strategy settings of the SIGKILL tests (on top of the quickstart's
#: loader settings: 2 persistent workers), and the steps per epoch they give (48 images, 8 a batch).
SETTINGS = {
    "workers": ([], 6),
    "bucketed": (["data.bucket_by_length=true", "data.bucket_pool_batches=2"], 6),
    "ddp": (["trainer=ddp_cpu"], 3),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 3-epoch run per setting (made on first use); its data folder is
    shared by the resumed runs."""
    root = tmp_path_factory.mktemp("resume")
    runs: dict[str, Path] = {}

    def get(setting: str) -> dict[str, Path]:
        if setting not in runs:
            runs[setting] = root / "outputs" / "train" / f"uninterrupted-{setting}"
            _train(root, runs[setting], SETTINGS[setting][0], timeout=600)
        return {"root": root, "run": runs[setting]}

    return get


# ---------------------------------------------------------------------- auto_resume
def _checkpoint(path: Path, mtime: float, epoch: int = 0) -> Path:
    """A small checkpoint with the training-state keys, modified at ``mtime``."""
    from captioner.checkpoints import save_checkpoint

    save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "optimizer_states": [], "loops": {}, "epoch": epoch,
                     "global_step": epoch}, path)
    os.utime(path, (mtime, mtime))
    return path


def _cut(path: Path) -> Path:
    """``path`` cut short, as a kill during a non-atomic copy leaves it (modification time kept)."""
    stat = path.stat()
    path.write_bytes(path.read_bytes()[: stat.st_size // 2])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return path


def test_auto_resume_prefers_the_current_run_folder(tmp_path):
    from captioner.run import auto_resume_checkpoint

    root = tmp_path / "outputs"
    current, other = root / "train" / "4242", root / "train" / "2026-01-01_00-00-00"
    other_last = _checkpoint(other / "checkpoints" / "last.ckpt", 3000)
    args = (current, [current / "checkpoints"], root, "train")

    # Nothing in this run's folder: true starts fresh even though another run has a newer last.ckpt.
    assert auto_resume_checkpoint(True, *args) is None
    assert auto_resume_checkpoint("newest", *args) == other_last
    assert auto_resume_checkpoint(False, *args) is None and auto_resume_checkpoint(None, *args) is None

    own_last = _checkpoint(current / "checkpoints" / "last.ckpt", 1000)
    assert auto_resume_checkpoint(True, *args) == own_last
    assert auto_resume_checkpoint("newest", *args) == own_last  # this run first, though older
    # Lightning's SIGUSR1 checkpoint in the run folder wins when it is newer than last.ckpt ...
    hpc = _checkpoint(current / "hpc_ckpt_1.ckpt", 2000)
    assert auto_resume_checkpoint("true", *args) == hpc
    # ... and last.ckpt wins when an epoch ended after it.
    os.utime(own_last, (2500, 2500))
    assert auto_resume_checkpoint(True, *args) == own_last
    # best.ckpt is newer only when a kill came between the epoch's best.ckpt and last.ckpt writes.
    best = _checkpoint(current / "checkpoints" / "best.ckpt", 2600)
    assert auto_resume_checkpoint(True, *args) == best
    with pytest.raises(ValueError, match="auto_resume='latest'.*newest"):
        auto_resume_checkpoint("latest", *args)


def test_auto_resume_skips_unreadable_checkpoints_with_a_warning(tmp_path, caplog):
    """A checkpoint cut short is skipped, naming it and why; the next intact one is resumed: an
    older hpc_ckpt of this run, then (newest) the previous run folder's last.ckpt. With none
    intact, the error lists every file tried."""
    from captioner.checkpoints import CheckpointError
    from captioner.run import auto_resume_checkpoint

    root = tmp_path / "outputs"
    current, previous = root / "train" / "4242", root / "train" / "2026-01-01_00-00-00"
    args = (current, [current / "checkpoints"], root, "train")
    previous_last = _checkpoint(previous / "checkpoints" / "last.ckpt", 500)
    last = _cut(_checkpoint(current / "checkpoints" / "last.ckpt", 3000))
    hpc_old = _checkpoint(current / "hpc_ckpt_1.ckpt", 1000)
    hpc_new = _cut(_checkpoint(current / "hpc_ckpt_2.ckpt", 2000))
    with caplog.at_level("WARNING", logger="captioner.run"):
        assert auto_resume_checkpoint(True, *args) == hpc_old
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2 and all("not a whole torch checkpoint" in m for m in skipped)
    assert str(last) in skipped[0] and str(hpc_new) in skipped[1]  # newest first

    _cut(hpc_old)
    assert auto_resume_checkpoint("newest", *args) == previous_last
    with pytest.raises(CheckpointError) as error:
        auto_resume_checkpoint(True, *args)
    message = str(error.value)
    assert message.startswith("auto_resume=True: none of the 3 checkpoint(s) it found can be resumed")
    assert all(str(p) in message for p in (last, hpc_new, hpc_old)) and "ckpt_path=" in message
    _cut(previous_last)
    with pytest.raises(CheckpointError, match=r"none of the 4 checkpoint\(s\)"):
        auto_resume_checkpoint("newest", *args)


def test_resume_refuses_an_unreadable_ckpt_path_before_preparing_data(tmp_path):
    from captioner import run
    from captioner.checkpoints import CheckpointError
    from conftest import compose, tiny_overrides

    ckpt = _cut(_checkpoint(tmp_path / "last.ckpt", 1000))
    cfg = compose("train", tiny_overrides(tmp_path) + [f"ckpt_path={ckpt}"])
    with pytest.raises(CheckpointError, match=rf"^checkpoint {ckpt} is not a whole torch checkpoint"):
        run.train(cfg)
    assert not (tmp_path / "data").exists()
    # Names Lightning resolves itself are left to it.
    assert all(map(run._lightning_ckpt_name, ["last", "best", "hpc", "registry:me/model", "s3://b/x.ckpt"]))
    assert not run._lightning_ckpt_name(ckpt)


def test_ckpt_path_and_init_from_are_exclusive(tmp_path):
    from captioner import run
    from conftest import compose, tiny_overrides

    cfg = compose("train", tiny_overrides(tmp_path) + [f"ckpt_path={tmp_path / 'a.ckpt'}",
                                                       f"init_from={tmp_path / 'b.ckpt'}"])
    with pytest.raises(ValueError, match="ckpt_path=.*init_from=.*pass one of them"):
        run.train(cfg)
    assert not (tmp_path / "data").exists()  # refused before preparing any data


@pytest.mark.parametrize("saved_epoch, stepped", [(2, False), (3, True)])
def test_exact_resume_replays_only_the_steps_lightning_takes(saved_epoch, stepped):
    """A scheduler stepped every 2nd epoch (frequency 2, as with check_val_every_n_epoch=2):
    Lightning steps it after epochs 1, 3, ..., so only a checkpoint of such an epoch misses a step."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.types import LRSchedulerConfig

    from captioner.callbacks import ExactResume

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = SimpleNamespace(current_epoch=saved_epoch + 1,
                              lr_scheduler_configs=[LRSchedulerConfig(scheduler, interval="epoch", frequency=2)])
    callback = ExactResume(seed=0)
    saved = {"interval": "epoch", "monitor": None, "value": None, "last_epoch": scheduler.last_epoch}
    callback.on_load_checkpoint(trainer, None, {ExactResume.KEY: {"epoch": saved_epoch, "schedulers": [saved]}})
    callback.on_train_epoch_start(trainer, None)
    assert scheduler.last_epoch == int(stepped)


# ---------------------------------------------------------------------- SIGKILL + resume
def _logged_lrs(csv_folder: Path) -> dict[tuple[int, str], float]:
    """``{(step, "lr-..."): value}`` from one CSVLogger version folder."""
    import csv

    rows = csv.DictReader((csv_folder / "metrics.csv").open())
    return {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("lr-") and v}


def _callback_state(checkpoint: dict, name: str) -> dict:
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith(name)]
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    unequal = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not unequal, f"weights differ: {unequal[:5]}"
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # LRs included
    for i, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][i][key]), f"optimiser state {i}/{key} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]


def _val_metrics(csv_folder: Path) -> dict[int, dict[str, str]]:
    """``{epoch: {"val/...": value}}`` as logged, from one CSVLogger version folder."""
    import csv

    rows = csv.DictReader((csv_folder / "metrics.csv").open())
    return {int(r["epoch"]): {k: v for k, v in r.items() if k.startswith("val/")} for r in rows if r.get("val/bleu4")}


@pytest.mark.slow
@pytest.mark.parametrize("setting, how", [("workers", "ckpt_path"), ("workers", "auto_resume"),
                                          ("bucketed", "auto_resume"), ("ddp", "auto_resume")])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(uninterrupted, setting, how):
    """Killed (SIGKILL, with its loader workers and DDP ranks) in epoch 1 after some of its steps,
    then resumed from last.ckpt (the end of epoch 0) in the same run folder: epoch 1 is replayed
    and the run ends with bit-identical weights, optimiser, LR scheduler, early-stopping and
    best-checkpoint state, and logs the same validation metrics at every epoch.

    Settings: the quickstart's loader (2 persistent workers), the length-bucketed sampler, and
    two DDP processes (``trainer=ddp_cpu``). Exact equality holds on one machine with
    ``trainer.deterministic=true`` and one intra-op thread: every step sees the same batch (the
    sampler starts at the resumed epoch), the same dropout masks (``ExactResume`` reseeds per
    batch) and the same LR (the scheduler step Lightning skips on restart is replayed).
    """
    extra, steps = SETTINGS[setting]
    pause = 2 if steps > 3 else 1
    runs = uninterrupted(setting)
    root = runs["root"]
    run_dir = root / "outputs" / "train" / f"killed-{setting}-{how}"
    marker = root / f"paused-{setting}-{how}"
    last = run_dir / "checkpoints" / "last.ckpt"

    _kill_when_paused(_start_victim(root, run_dir, marker, extra, batch=pause), marker)
    at_kill = _load(last)
    assert (at_kill["epoch"], at_kill["global_step"]) == (0, steps)  # end of epoch 0; epoch 1's steps lost
    assert f"global_step {steps + pause + 1}" in marker.read_text()  # the process had gone past the checkpoint

    csv_before = {f: f.read_bytes() for f in (run_dir / "csv").rglob("metrics.csv")}
    resume = [f"ckpt_path={last}"] if how == "ckpt_path" else ["auto_resume=true"]
    out = _train(root, run_dir, extra + resume, timeout=600)
    # The resumed attempt logs to a CSV file of its own; the killed attempt's stays as it was.
    assert {f: f.read_bytes() for f in csv_before} == csv_before
    assert len(list((run_dir / "csv").rglob("metrics.csv"))) == len(csv_before) + 1
    log = (run_dir / "train.log").read_text()
    if how == "auto_resume":
        assert f"auto_resume=True: resuming from {last}" in log
    assert "resume: stepped the LR scheduler for epoch 0" in log

    a_run = runs["run"]
    _assert_same_state(_load(a_run / "checkpoints" / "last.ckpt"), _load(last))
    a_last, b_last = _load(a_run / "checkpoints" / "last.ckpt"), _load(last)
    for name in ("EarlyStopping", "ModelCheckpoint{'monitor': 'val/bleu4'"):
        sa, sb = _callback_state(a_last, name), _callback_state(b_last, name)
        for key in ("wait_count", "best_score", "best_model_score", "kth_value"):
            if key in sa:
                assert sa[key] == sb[key], f"{name}.{key}: {sa[key]} != {sb[key]}"
    a_best, b_best = _load(a_run / "checkpoints" / "best.ckpt"), _load(run_dir / "checkpoints" / "best.ckpt")
    assert a_best["epoch"] == b_best["epoch"]
    assert all(torch.equal(a_best["state_dict"][k], b_best["state_dict"][k]) for k in a_best["state_dict"])

    # The LRs logged by the resumed attempt are the ones the uninterrupted run logged at those
    # steps: LearningRateMonitor logs epoch 1's LR after ExactResume replayed the scheduler step.
    resumed_csv = sorted((run_dir / "csv").glob("version_*"))[-1]
    lrs_a = _logged_lrs(a_run / "csv" / "version_0")
    lrs_b = _logged_lrs(resumed_csv)
    assert (steps, "lr-Adam/decoder") in lrs_b  # epoch 1's first step, the one the replay changes
    assert {k: lrs_a[k] for k in lrs_b} == lrs_b
    assert len(set(lrs_a.values())) > 1  # lr_patience=1: the LR did change between epochs

    # val/bleu4 and the other validation metrics of every resumed epoch, as logged.
    val_a, val_b = _val_metrics(a_run / "csv" / "version_0"), _val_metrics(resumed_csv)
    assert sorted(val_b) == [1, 2] and sorted(val_a) == [0, 1, 2]
    assert {e: val_a[e] for e in val_b} == val_b
    metrics_a = json.loads((a_run / "metrics.json").read_text())["metrics"]
    metrics_b = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for key in ("val/bleu1", "val/bleu2", "val/bleu3", "val/bleu4", "val/loss", "val/top5", "val/best_bleu4"):
        assert metrics_a[key] == metrics_b[key], key
    assert metrics_a["val/bleu1"] > 0 and out.returncode == 0


@pytest.mark.slow
def test_scst_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(uninterrupted):
    """The same for self-critical training (from the uninterrupted run's best weights): the
    sampled captions come from the generator ExactResume reseeds per batch, so the replayed steps
    draw the same samples, get the same CIDEr-D rewards and end with bit-identical weights."""
    xe_run = uninterrupted("workers")
    root = xe_run["root"]
    base = scst_overrides(root, xe_run["run"] / "checkpoints" / "best.ckpt")
    a_run = root / "outputs" / "train" / "scst-uninterrupted"
    _train(root, a_run, [], base=base)
    run_dir = root / "outputs" / "train" / "scst-killed"
    marker = root / "paused-scst"
    last = run_dir / "checkpoints" / "last.ckpt"
    _kill_when_paused(_start_victim(root, run_dir, marker, [], base=base), marker)
    assert (_load(last)["epoch"], _load(last)["global_step"]) == (0, 6)
    _train(root, run_dir, ["auto_resume=true"], base=base)  # init_from is superseded by last.ckpt

    a_last, b_last = _load(a_run / "checkpoints" / "last.ckpt"), _load(last)
    _assert_same_state(a_last, b_last)
    xe = _load(xe_run["run"] / "checkpoints" / "best.ckpt")["state_dict"]
    assert any(not torch.equal(xe[k], a_last["state_dict"][k]) for k in xe)  # SCST did train
    sa = _callback_state(a_last, "ModelCheckpoint{'monitor': 'val/cider'")
    sb = _callback_state(b_last, "ModelCheckpoint{'monitor': 'val/cider'")
    assert sa["best_model_score"] == sb["best_model_score"]
    metrics_a = json.loads((a_run / "metrics.json").read_text())["metrics"]
    metrics_b = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for key in ("val/cider", "val/bleu4", "val/best_cider", "train/reward_epoch"):
        assert metrics_a[key] == metrics_b[key], key
