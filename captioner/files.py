"""Writing files so that a kill or a power cut leaves the old content or the whole new one.

Every file the project writes (JSON, figures, HDF5 outputs, checkpoints) goes through here: the
new content goes to a temp file in the target's folder, is flushed to disk, then renamed over
the target. No torch here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON with :func:`atomic_write`."""
    text = json.dumps(obj)  # one C-encoder call: much faster than json.dump's chunks for COCO
    with atomic_write(path) as f:
        f.write(text)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path``'s new content into: a temp file beside it that replaces it
    (:func:`replace_durably`, with the usual permissions) when the block ends, and is removed
    when the block raises, so ``path`` holds the old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, new_file_mode())  # mkstemp creates 0600
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """``os.replace(tmp, path)`` once ``tmp``'s data is on disk, then the rename itself.

    A rename alone is atomic for running processes, but after a crash or power cut some
    filesystems can show the new name with the data not yet written (an empty or partial
    file). With the data flushed first, the name holds the old file or the whole new one.
    """
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the folder's entry; not possible on every platform or filesystem
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_files(folder: str | os.PathLike, name_pattern: str = "*") -> list[Path]:
    """The temp files :func:`atomic_write` left in ``folder`` when its process was killed
    mid-write, for targets whose names match the glob ``name_pattern``."""
    return sorted(Path(folder).glob(f".{name_pattern}.*{TEMP_SUFFIX}"))


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
