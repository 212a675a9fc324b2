"""Checkpoint files: written so that a kill leaves the old file or the new one, read with a check.

Lightning's own saving (``TorchCheckpointIO``) goes through an fsspec transaction whose temp
file is made in the system temp folder and then moved over the target: when the run folder is on
another filesystem (node-local ``/tmp``, shared Lustre/NFS/GPFS outputs) that move is a copy into
the target, so a kill during it leaves a truncated checkpoint, and nothing is flushed to disk.
:class:`AtomicCheckpointIO` (``train()`` gives it to every Trainer) writes each checkpoint
Lightning saves (``ModelCheckpoint``'s ``best.ckpt``/``last.ckpt``, the Slurm ``hpc_ckpt_*.ckpt``,
``trainer.save_checkpoint``) with :func:`captioner.files.atomic_write` instead: a temp file in the
target's folder, flushed to disk, renamed over the target.

:func:`load_checkpoint` reads a checkpoint with ``weights_only=True`` and raises
:class:`CheckpointError`, one line naming the file and the problem, for a file that is not a
readable torch checkpoint or lacks the keys its use needs.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from captioner.files import atomic_write, temp_files

log = logging.getLogger(__name__)

#: Keys every captioner checkpoint holds (converted tutorial checkpoints included).
MODEL_KEYS = ("state_dict", "hyper_parameters")
#: Keys a checkpoint needs to resume training (Lightning's full training state).
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")
#: What torch.load raises for a file that is not a (whole) torch checkpoint.
READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
               KeyError, IndexError)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`~captioner.files.atomic_write`: ``path`` holds the old
    checkpoint or the whole new one, whenever the process is killed."""
    with atomic_write(path, "wb") as f:
        torch.save(checkpoint, f)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False, required: Sequence[str] = (),
                    map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint as a dict, loaded with ``weights_only=True`` (no code runs).

    Args:
        path: the ``.ckpt`` file.
        mmap: map the tensors instead of reading them (a cheap look at the structure and config;
            a truncated file still fails, its zip directory being at the end).
        required: top-level keys the checkpoint must have.
        map_location: as ``torch.load``'s.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable torch checkpoint (truncated by a kill, empty,
            another format) or lacks a ``required`` key; one line naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its directory last
        raise CheckpointError(f"checkpoint {path} is not a whole torch checkpoint ({path.stat().st_size} "
                              f"bytes, no zip directory at its end): cut short by a kill, or another format")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except READ_ERRORS as e:
        raise _unreadable(path, e) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        hint = (": it holds weights only; start from them with init_from=" + str(path)
                if "state_dict" in checkpoint and set(missing) & {"optimizer_states", "loops"} else "")
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}{hint}")
    return checkpoint


def check_checkpoint(path: str | os.PathLike, required: Sequence[str] = RESUME_KEYS) -> str | None:
    """Why ``path`` cannot be resumed (one line), or None when it reads with the ``required`` keys."""
    try:
        load_checkpoint(path, mmap=True, required=required)
    except (FileNotFoundError, CheckpointError) as e:
        return str(e)
    return None


def remove_partial_files(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temp files a kill during :func:`save_checkpoint` left in ``folders``.

    Only files named like ``atomic_write``'s temp files of a ``*.ckpt`` target; call it where no
    other process of this run is writing (``train()`` calls it on rank 0 before fitting).

    Returns:
        The deleted files.
    """
    removed = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        for tmp in temp_files(folder, "*.ckpt"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
            log.warning("removed %s, a checkpoint write cut short by a kill", tmp)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and loads that name a bad file.

    ``save_checkpoint`` writes local paths with :func:`save_checkpoint` (temp file beside the
    target, fsync, rename); remote ones (``s3://``...) go to Lightning's fsspec saving.
    ``load_checkpoint`` raises :class:`CheckpointError` naming the file for an unreadable one
    (Lightning resumes Slurm's ``hpc_ckpt_*.ckpt`` by itself).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except READ_ERRORS as e:
            if isinstance(e, FileNotFoundError) or not Path(str(path)).is_file():
                raise
            raise _unreadable(Path(str(path)), e) from None


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    """One line: the file, its size and the first line of torch's error."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0].rstrip(".")
    return CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) is unreadable: {first} "
                           f"(a file cut short by a kill, or not a torch checkpoint)")
