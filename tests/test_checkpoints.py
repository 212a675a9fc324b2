"""Checkpoint files: atomic writes for everything Lightning saves, and reads that name a bad file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from captioner import checkpoints, files
from captioner.checkpoints import (RESUME_KEYS, AtomicCheckpointIO, CheckpointError, check_checkpoint,
                                   load_checkpoint, remove_partial_files, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def training_checkpoint(epoch: int = 0) -> dict:
    """A small dict with the keys a resume needs."""
    return {"state_dict": {"w": torch.full((3,), float(epoch))}, "optimizer_states": [{}], "loops": {},
            "epoch": epoch, "global_step": 10 * epoch, "hyper_parameters": {}}


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_failed_write_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(training_checkpoint(1), path)
    big = {"a": torch.zeros(1 << 20), "b": _Unpicklable()}  # fails after part of the archive is written
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(big, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_unreadable_checkpoints_are_named_with_the_problem_in_one_line(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(training_checkpoint(2), path)
    whole = path.read_bytes()
    assert check_checkpoint(path) is None and load_checkpoint(path, mmap=True)["epoch"] == 2
    cases = {"cut": whole[: len(whole) // 2], "empty": b"", "text": b"not a checkpoint\n" * 4,
             "bad record": whole[:80] + b"x" * 200 + whole[280:]}
    for name, content in cases.items():
        path.write_bytes(content)
        for read in (lambda: load_checkpoint(path), lambda: load_checkpoint(path, mmap=True)):
            with pytest.raises(CheckpointError) as error:
                read()
            message = str(error.value)
            assert str(path) in message and "\n" not in message, name
            assert "cut short by a kill" in message, name
        assert check_checkpoint(path).startswith(f"checkpoint {path} ")
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, weights_only)
    assert check_checkpoint(weights_only) == (
        f"checkpoint {weights_only} lacks optimizer_states, loops, epoch, global_step: it holds weights only; "
        f"start from them with init_from={weights_only}")
    assert check_checkpoint(tmp_path / "nothing.ckpt") == f"checkpoint {tmp_path / 'nothing.ckpt'} does not exist"


def test_partial_checkpoint_writes_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    partial = [tmp_path / "checkpoints" / ".last.ckpt.k2j3h4.tmp", tmp_path / ".hpc_ckpt_1.ckpt.abc.tmp"]
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / ".metrics.json.x1.tmp", tmp_path / "a.tmp"]
    for p in partial + kept:
        p.write_bytes(b"x")
    assert sorted(remove_partial_files([tmp_path / "checkpoints", tmp_path, tmp_path])) == sorted(partial)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in partial)
    # The names atomic_write gives its temp files are the ones removed.
    with files.atomic_write(tmp_path / "best.ckpt", "wb"):
        (temp,) = files.temp_files(tmp_path, "*.ckpt")
        assert temp.name.startswith(".best.ckpt.")
    assert not temp.exists() and (tmp_path / "best.ckpt").exists()


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_every_checkpoint_lightning_writes_is_renamed_into_place_after_fsync(tmp_path, monkeypatch):
    """best.ckpt, last.ckpt and the Slurm hpc_ckpt (saved as Lightning's SIGUSR1 handler saves
    it) all go through AtomicCheckpointIO: temp file in the target's folder, fsync, rename.
    Lightning's own fsspec saving (temp file in the system temp folder, moved) is never used."""
    from lightning.fabric.plugins.io import torch_io

    def lightning_save(*args, **kwargs):
        raise AssertionError("Lightning's fsspec save was used")

    monkeypatch.setattr(torch_io, "_atomic_save", lightning_save)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", fd)), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", Path(a), Path(b))),
                                                           real_replace(a, b))[1])
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(tmp_path / "checkpoints", "best", monitor="val/score", mode="max"),
                 L.pytorch.callbacks.ModelCheckpoint(tmp_path / "checkpoints", "last", monitor=None,
                                                     enable_version_counter=False)]
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()])
    trainer.fit(_Tiny(), loader, loader)
    trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
    replaced = [e[1:] for e in events if e[0] == "replace"]
    targets = [b for _, b in replaced]
    assert set(targets) == {tmp_path / "checkpoints" / "best.ckpt", tmp_path / "checkpoints" / "last.ckpt",
                            tmp_path / "hpc_ckpt_1.ckpt"}
    assert targets.count(tmp_path / "checkpoints" / "last.ckpt") == 2  # every epoch
    for temp, target in replaced:
        assert temp.parent == target.parent and temp.name.startswith(f".{target.name}.")
    # Each rename follows the fsync of its data (and is followed by the folder's).
    kinds = [e[0] for e in events]
    assert all(kinds[i - 1] == "fsync" for i, k in enumerate(kinds) if k == "replace")
    assert all(check_checkpoint(t) is None for t in set(targets))
    assert not list(tmp_path.rglob("*.tmp"))


def test_train_gives_the_trainer_atomic_checkpoint_io_unless_one_is_configured():
    from captioner.run import build_plugins

    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu"}})
    (plugin,) = build_plugins(cfg)
    assert isinstance(plugin, AtomicCheckpointIO)
    own = {"_target_": "lightning.pytorch.plugins.io.TorchCheckpointIO"}
    cfg = OmegaConf.create({"trainer": {"plugins": [own, {"_target_": "lightning.pytorch.plugins.precision."
                                                                     "Precision"}]}})
    plugins = build_plugins(cfg)
    assert [type(p).__name__ for p in plugins] == ["TorchCheckpointIO", "Precision"]
    assert isinstance(build_plugins(OmegaConf.create({"trainer": {"plugins": own}}))[0], L.pytorch.plugins.io.TorchCheckpointIO)


def test_the_plugin_names_an_unreadable_file_lightning_loads(tmp_path):
    path = tmp_path / "hpc_ckpt_3.ckpt"
    path.write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} .*cut short by a kill"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("command", [
    ["train.py", "experiment=quickstart", "ckpt_path={ckpt}"],
    ["evaluate.py", "ckpt_path={ckpt}"],
    ["-m", "captioner.caption", "ckpt_path={ckpt}", "image=x.png"],
])
def test_entry_points_refuse_an_unreadable_checkpoint_in_one_line(tmp_path, command):
    ckpt = tmp_path / "last.ckpt"
    save_checkpoint(training_checkpoint(), ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])  # cut short
    args = [a.format(ckpt=ckpt) for a in command]
    args[0] = args[0] if args[0] == "-m" else str(REPO / args[0])
    done = subprocess.run([sys.executable, *args, f"paths.data_dir={tmp_path / 'data'}"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
                              str(REPO), os.environ.get("PYTHONPATH")]))),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: checkpoint {ckpt} is not a whole torch checkpoint (300 bytes, no zip directory "
                      f"at its end): cut short by a kill, or another format"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "data").exists()


def test_resume_keys_are_what_lightning_writes(tmp_path):
    """A real Lightning checkpoint passes the resume check (the keys are Lightning's)."""
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        plugins=[AtomicCheckpointIO()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer.fit(_Tiny(), loader)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert set(RESUME_KEYS) <= set(load_checkpoint(tmp_path / "x.ckpt"))
    assert checkpoints.check_checkpoint(tmp_path / "x.ckpt") is None
