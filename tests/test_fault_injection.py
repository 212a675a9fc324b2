"""Fault injection: ``train.py`` killed (SIGKILL, with its loader workers) at points drawn with a
fixed seed, during a training step, during validation and in the middle of a checkpoint write,
and restarted with ``auto_resume=true`` in the same run folder each time. Every restart resumes,
the run ends at the uninterrupted run's final state, and no file in the run folder is left cut
short.

The kill points come from :class:`KillAt`, a test-only callback added to the victim runs through a
``+callbacks.fault`` override (``tests/`` on ``PYTHONPATH``). At its point it kills its own process
group. For a checkpoint write it stands in for the checkpoint file writer: the checkpoint's bytes
up to the drawn fraction go into the temp file the product's writer uses (``atomic_write``), and
the process is killed before the write completes, which is the state a kill in the middle of that
write leaves on disk. Every other write goes to the product's writer unchanged.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from test_resume import REPO, _assert_same_state, _env, _load, _train, resume_overrides

SEED = 2026
EPOCHS, STEPS, VAL_BATCHES = 3, 6, 2  # resume_overrides: 48 train images and 15 val images, 8 a batch
PHASES = {"step": 0, "validation": 1, "best.ckpt": 2, "last.ckpt": 3}  # their order within an epoch


def kill_points(seed: int = SEED) -> list[tuple[int, str, int, float]]:
    """12 kill points ``(epoch, what, index, fraction)`` in the order a run reaches them.

    5 training steps and 3 validation batches drawn from the 3 epochs, and the 4 checkpoint
    writes sure to happen whatever the scores: ``last.ckpt`` at every epoch end and the first
    ``best.ckpt``, each cut at a drawn fraction of its bytes (1.0: whole, not yet renamed).
    """
    rng = random.Random(seed)
    steps = rng.sample([(e, "step", b) for e in range(EPOCHS) for b in range(STEPS)], 5)
    vals = rng.sample([(e, "validation", b) for e in range(EPOCHS) for b in range(VAL_BATCHES)], 3)
    writes = [(e, "last.ckpt", 0) for e in range(EPOCHS)] + [(0, "best.ckpt", 0)]
    points = [(e, what, i, 0.0) for e, what, i in steps + vals]
    points += [(e, what, i, rng.choice([round(rng.uniform(0.0, 1.0), 3), 1.0])) for e, what, i in writes]
    return sorted(points, key=lambda p: (p[0], PHASES[p[1]], p[2]))


class KillAt(L.Callback):
    """SIGKILL this run's process group at one point: ``what`` = ``step`` (after training batch
    ``index`` of ``epoch``), ``validation`` (after validation batch ``index``, not the sanity
    check) or a checkpoint file name (``last.ckpt``, ``best.ckpt``: its write at the end of
    ``epoch``, cut after ``fraction`` of its bytes). Appends the point to ``log`` first."""

    def __init__(self, epoch: int, what: str, index: int, fraction: float, log: str):
        self.epoch, self.what, self.index, self.fraction, self.kill_log = int(epoch), what, int(index), fraction, log
        self._trainer = None

    def _die(self) -> None:
        with open(self.kill_log, "a") as f:
            f.write(json.dumps([self.epoch, self.what, self.index, self.fraction]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.what.endswith(".ckpt"):
            return
        from captioner import checkpoints
        from captioner.files import atomic_write

        self._trainer, write = trainer, checkpoints.save_checkpoint

        def cut_write(checkpoint, path):
            if Path(path).name != self.what or self._trainer.current_epoch != self.epoch:
                return write(checkpoint, path)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            with atomic_write(path, "wb") as f:  # the product's temp file, killed before the rename
                f.write(data[: int(len(data) * self.fraction)])
                f.flush()
                os.fsync(f.fileno())
                self._die()

        checkpoints.save_checkpoint = cut_write

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (self.what, trainer.current_epoch, batch_idx) == ("step", self.epoch, self.index):
            self._die()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if (not trainer.sanity_checking
                and (self.what, trainer.current_epoch, batch_idx) == ("validation", self.epoch, self.index)):
            self._die()


def _how_it_started(run_dir: Path) -> str:
    """The latest start's auto_resume line: ``resuming from <file>`` or ``no checkpoint found, ...``."""
    lines = [line for line in (run_dir / "train.log").read_text().splitlines() if "auto_resume=True: " in line]
    return lines[-1].split("auto_resume=True: ")[1]


def _no_partial_files(run_dir: Path) -> None:
    """Every checkpoint reads whole with its training state; JSON and YAML files parse; no temp file."""
    from captioner.checkpoints import check_checkpoint

    assert not [p for p in run_dir.rglob(".*.tmp")], "temp files left"
    for path in run_dir.rglob("*.ckpt"):
        assert check_checkpoint(path) is None, check_checkpoint(path)
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    for path in run_dir.rglob("*.yaml"):
        yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_killed_at_random_points_and_restarted_ends_like_an_uninterrupted_run(tmp_path):
    points = kill_points()
    assert len(points) == 12 and {p[1] for p in points} == set(PHASES)
    reference = tmp_path / "outputs" / "train" / "uninterrupted"
    _train(tmp_path, reference, [], timeout=600)

    run_dir = tmp_path / "outputs" / "train" / "preempted"
    log = tmp_path / "kills.jsonl"
    restarts = []
    for attempt, (epoch, what, index, fraction) in enumerate(points):
        cmd = [sys.executable, str(REPO / "train.py"), *resume_overrides(tmp_path), f"hydra.run.dir={run_dir}",
               "auto_resume=true", "+callbacks.fault._target_=test_fault_injection.KillAt",
               f"+callbacks.fault.epoch={epoch}", f"+callbacks.fault.what={what}", f"+callbacks.fault.index={index}",
               f"+callbacks.fault.fraction={fraction}", f"+callbacks.fault.log={log}"]
        with open(tmp_path / f"attempt-{attempt}.out", "w") as out:
            proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True, timeout=600)
        output = (tmp_path / f"attempt-{attempt}.out").read_text()
        assert proc.returncode == -signal.SIGKILL, f"attempt {attempt} ({what}) was not killed:\n{output[-4000:]}"
        assert json.loads(log.read_text().splitlines()[-1]) == [epoch, what, index, fraction]
        if attempt:
            restarts.append(_how_it_started(run_dir))
        # Between attempts the run folder holds whole checkpoints only, besides the killed write's temp file.
        from captioner.checkpoints import check_checkpoint

        assert all(check_checkpoint(p) is None for p in run_dir.rglob("*.ckpt"))
        partial = list(run_dir.rglob(".*.ckpt.*.tmp"))
        assert len(partial) == (1 if what.endswith(".ckpt") else 0)
    _train(tmp_path, run_dir, ["auto_resume=true"], timeout=600)  # the last restart runs to the end
    restarts.append(_how_it_started(run_dir))

    assert len(log.read_text().splitlines()) == len(points) == len(restarts)
    assert restarts[-1].startswith("resuming from ")
    _no_partial_files(run_dir)
    final = run_dir / "checkpoints" / "last.ckpt"
    newest = max(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)  # what auto_resume takes next
    expected = _load(reference / "checkpoints" / "last.ckpt")
    assert _load(newest)["epoch"] == EPOCHS - 1
    _assert_same_state(expected, _load(newest))
    if _load(final)["epoch"] == EPOCHS - 1:
        _assert_same_state(expected, _load(final))
    print(f"\n{len(points)} kill points, {len(restarts)} restarts: " + "; ".join(r.replace(str(run_dir) + "/", "") for r in restarts))
