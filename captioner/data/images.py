"""Image files -> the tutorial's (3, S, S) uint8 pixels, and a split's pixels -> its HDF5 array.

Decoding (:func:`load_image`): JPEGs are decoded at a reduced DCT scale (PIL's draft mode,
1/2, 1/4 or 1/8) when the result keeps at least ``draft_min_ratio * S`` pixels on each side,
then resized to S x S with the antialiased bilinear filter (``torch.nn.functional.interpolate``
on uint8, within one grey level of PIL's ``Image.resize(BILINEAR)``, the tutorial's
``imresize``). On a COCO-sized 640x480 JPEG at S = 256 draft mode decodes at 320x240 and halves
the decode and resize work; the pixels then differ from a full decode by about one grey level on
average (docs/performance.md gives the measured PSNR). ``draft_min_ratio=None`` decodes every
image in full. YCbCr and grayscale JPEGs are decoded by libjpeg-turbo through ``simplejpeg``
(when installed) at the same DCT scale PIL's draft mode picks: the same library and settings,
so the same pixels, without PIL's Python-level file parsing and extra copy. Every other file,
and any JPEG ``simplejpeg`` rejects, goes through PIL, which also raises the errors.

Writing (:class:`ImageWriter`): a split's images go into the dataset ``images`` of an HDF5 file,
laid out as the tutorial's ``h.create_dataset('images', (N, 3, S, S), dtype='uint8')``:
contiguous, uncompressed. Its storage is allocated when the file is created, so decode workers
write each image straight to its byte offset in the file (``os.pwrite``) and no pixels travel
between processes; the main process only hands out file names and collects errors. HDF5 only
describes where the array lives; the bytes are the plain C-order array either way.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

try:  # libjpeg-turbo without PIL's per-file Python overhead; PIL decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - a declared dependency, but optional at run time
    simplejpeg = None

from captioner.allocator import keep_freed_memory

# Decode workers get their images in chunks of this many (fewer, larger messages: 8 cost
# the main process 0.1 s more CPU per 2,000 images than 32); at most two blocks of
# CHUNKSIZE * workers * 4 images are in flight, so memory does not grow with the split.
CHUNKSIZE = 32
TAIL_CHUNKSIZE = 4  # for the last CHUNKSIZE * workers images of a split
DEFAULT_DRAFT_MIN_RATIO = 0.8

#: Exceptions that mean "this file is not a readable image" (skipped or reported, never fatal
#: by themselves): decoding errors of PIL and the files it reads.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- decoding
def load_image(path: str | os.PathLike | BinaryIO, image_size: int,
               draft_min_ratio: float | None = DEFAULT_DRAFT_MIN_RATIO) -> np.ndarray:
    """Decode an image file to the tutorial's layout: plain resize to S x S, no crop.

    Colour handling: grayscale, bilevel, CMYK, YCbCr and palette images go through PIL's RGB
    conversion; alpha (RGBA, LA, PA, palette transparency) is dropped, keeping the stored
    colour (as PIL and torchvision do); 16-bit images (``I;16*``, ``I``) are scaled by
    255/65535 with rounding; ``F`` images are clipped to 0..255. EXIF orientation is not
    applied (the tutorial does not either).

    Args:
        path: an image file, or a seekable binary file object holding one (an upload's
            ``io.BytesIO``: the server decodes what it receives exactly as files are decoded).
        image_size: output side S.
        draft_min_ratio: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
            keeps at least ``ceil(draft_min_ratio * S)`` pixels per side; 1.0 never decodes
            below S x S; None decodes in full.

    Returns:
        (3, S, S) uint8, C-contiguous.

    Raises:
        OSError: missing, unreadable, non-image or truncated file.
        ValueError: ``draft_min_ratio`` outside (0, 1].
    """
    check_draft_min_ratio(draft_min_ratio)
    pixels = _decode_jpeg(path, image_size, draft_min_ratio) if simplejpeg is not None else None
    if pixels is None:
        with Image.open(path) as img:
            if draft_min_ratio is not None and img.format in ("JPEG", "MPO"):  # MPO: JPEG frames
                img.draft("RGB", (_draft_side(image_size, draft_min_ratio),) * 2)
            rgb = _to_rgb(img)
            pixels = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable
    return resize(pixels, image_size)


def _draft_side(image_size: int, draft_min_ratio: float) -> int:
    return math.ceil(image_size * draft_min_ratio)


def _draft_scale(width: int, height: int, side: int) -> int:
    """The DCT scale denominator PIL's ``JpegImageFile.draft(mode, (side, side))`` picks: the
    largest of 8, 4, 2, 1 that keeps at least ``side`` pixels on both sides."""
    ratio = min(width // side, height // side)
    return next((scale for scale in (8, 4, 2) if ratio >= scale), 1)


# JPEG colour spaces whose RGB output libjpeg-turbo gives exactly as PIL does (PIL inverts
# Adobe CMYK/YCCK itself, so those go through PIL).
_FAST_COLORSPACES = ("YCbCr", "Gray")


def _decode_jpeg(path: str | os.PathLike | BinaryIO, image_size: int,
                 draft_min_ratio: float | None) -> np.ndarray | None:
    """(H, W, 3) uint8 through ``simplejpeg`` at PIL's draft scale, or None to let PIL decode.

    None for anything but a YCbCr or grayscale JPEG, for images above PIL's decompression-bomb
    limit (PIL then warns or raises as usual), and for any file libjpeg-turbo reports a problem
    with (``strict``: also recoverable ones, such as a truncated file): PIL decides about
    those, so errors and accepted files are exactly PIL's.
    """
    with open(path, "rb") if not hasattr(path, "read") else nullcontext(path) as f:
        f.seek(0)
        if f.read(3) != b"\xff\xd8\xff":  # not a JPEG: PIL reads it
            f.seek(0)  # a file object is handed to PIL at its start
            return None
        f.seek(0)
        data = f.read()
        f.seek(0)
    limit = Image.MAX_IMAGE_PIXELS  # None when the user turned PIL's check off
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _FAST_COLORSPACES or (limit is not None and width * height > limit):
            return None
        scale = 1 if draft_min_ratio is None else _draft_scale(
            width, height, _draft_side(image_size, draft_min_ratio))
        size = (-(-height // scale), -(-width // scale))  # libjpeg's scaled size, rounded up
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size[0],
                                        min_width=size[1], min_factor=scale, strict=True)
    except ValueError:
        return None
    return pixels if pixels.shape == (*size, 3) else None


def check_draft_min_ratio(draft_min_ratio: float | None) -> None:
    """Raise ValueError unless ``draft_min_ratio`` is None or in (0, 1]."""
    if draft_min_ratio is not None and not 0.0 < draft_min_ratio <= 1.0:
        raise ValueError(f"draft_min_ratio must be in (0, 1] or None (full decode), got "
                         f"{draft_min_ratio!r}")


def resize(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Antialiased bilinear resize of (H, W, 3) uint8 to (3, S, S) uint8.

    ``F.interpolate(antialias=True)`` on channels-last uint8 has a vectorised kernel and
    matches PIL's ``resize(BILINEAR)`` to within one grey level.
    """
    image = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) channels-last
    if image.shape[-2:] != (image_size, image_size):
        image = F.interpolate(image, size=(image_size, image_size), mode="bilinear",
                              antialias=True, align_corners=False)
    return np.ascontiguousarray(image[0].numpy())


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode.startswith("I"):  # 16-bit (and 32-bit int) grayscale
        values = np.asarray(img).astype(np.int64).clip(0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        gray = np.rint(np.asarray(img, dtype=np.float64).clip(0, 255)).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("P", "PA"):  # palette, possibly with transparency: go through RGBA
        img = img.convert("RGBA")
    return img.convert("RGB")


# --------------------------------------------------------------------------- writing
# A task: (index in the split, image file, (HDF5 file, its inode), byte offset of image 0, S,
# draft ratio). The inode tells a recreated file from the one a worker still has open.
_Task = tuple[int, str, tuple[str, int], int, int, "float | None"]
_worker_fds: dict[tuple[str, int], int] = {}


def _write_task(task: _Task) -> tuple[int, tuple[str, str] | None]:
    """Decode one image and write it at its offset.

    Returns ``(index, None)``, or ``(index, (image path, error message))`` for an unreadable
    image (so nobody has to keep every path of the split just for the error message).
    """
    index, image_path, target, offset, image_size, draft_min_ratio = task
    try:
        pixels = load_image(image_path, image_size, draft_min_ratio)
    except IMAGE_ERRORS as e:
        return index, (image_path, f"{type(e).__name__}: {e}")
    fd = _worker_fds.get(target)
    if fd is None:
        _close_files()  # the previous split's file is finished
        fd = _worker_fds[target] = os.open(target[0], os.O_WRONLY)
        if os.fstat(fd).st_ino != target[1]:
            raise OSError(f"{target[0]} was replaced while its images were being written")
    data = pixels.data.cast("B")
    written = os.pwrite(fd, data, offset + index * len(data))
    if written != len(data):  # a short write is a full disk or quota
        raise OSError(f"short write to {target[0]}: {written} of {len(data)} bytes")
    return index, None


def _close_files() -> None:
    for fd in _worker_fds.values():
        os.close(fd)
    _worker_fds.clear()


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process = one core; the pool is the parallelism
    keep_freed_memory()  # reuse each image's decode buffers instead of re-faulting them
    _worker_fds.clear()  # descriptors inherited from the parent are not ours to reuse


class ImageWriter:
    """Decodes image files into a split's HDF5 ``images`` array, in worker processes.

    Use as a context manager so the workers are stopped::

        with ImageWriter(image_size=256, num_workers=8) as writer:
            kept = writer.write(tmp_h5, paths, attrs={...}, on_error=handle)

    Args:
        image_size: output side S.
        num_workers: decode processes (forked); 0 decodes in this process.
        draft_min_ratio: see :func:`load_image`.
    """

    def __init__(self, image_size: int, num_workers: int = 0,
                 draft_min_ratio: float | None = DEFAULT_DRAFT_MIN_RATIO):
        check_draft_min_ratio(draft_min_ratio)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.image_size = image_size
        self.num_workers = num_workers
        self.draft_min_ratio = draft_min_ratio
        self._pool = None

    def __enter__(self) -> ImageWriter:
        if self.num_workers > 0:
            import multiprocessing

            # fork, not spawn: spawned workers re-import __main__, which fails for stdin,
            # notebooks and unguarded scripts (and a Pool then respawns crashing workers
            # forever). Workers run PIL, numpy and one-thread torch CPU ops only.
            self._pool = multiprocessing.get_context("fork").Pool(self.num_workers, _init_worker)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        _close_files()

    def write(self, h5_path: str | os.PathLike, image_paths: Iterable[str], attrs: dict,
              on_error: Callable[[int, str, str], None], desc: str = "images",
              progress: bool = True, num_images: int | None = None) -> list[int]:
        """Create ``h5_path`` with dataset ``images`` (n, 3, S, S) of the readable images.

        Args:
            h5_path: the HDF5 file to create (overwritten); the caller renames it into place.
            image_paths: the split's image files, in order. May be a lazy iterator (with
                ``num_images``): it is consumed block by block while the workers decode,
                so whatever produces it runs in parallel with the decoding.
            attrs: file attributes set at creation.
            on_error: called as ``on_error(index, path, message)`` for an unreadable image, in
                index order; raise to abort, return to skip the image.
            desc: progress bar label.
            progress: show a tqdm bar (images/s).
            num_images: how many ``image_paths`` yields; None = ``len(list(image_paths))``.

        Returns:
            The indices of the images written, in order; row ``r`` of ``images`` holds
            ``image_paths[kept[r]]``.

        Raises:
            ValueError: ``image_paths`` yields more or fewer than ``num_images`` files.
        """
        h5_path = str(h5_path)
        if num_images is None:
            image_paths = list(image_paths)
            num_images = len(image_paths)
        n, s = num_images, self.image_size
        offset = _create_contiguous(h5_path, "images", (n, 3, s, s), attrs)
        failed: set[int] = set()
        target = (h5_path, os.stat(h5_path).st_ino)
        tasks = ((i, str(p), target, offset, s, self.draft_min_ratio)
                 for i, p in enumerate(_exactly(image_paths, n)))  # lazily: memory flat in n
        with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
            for index, error in self._run(tasks):
                bar.update()
                if error is not None:
                    on_error(index, *error)
                    failed.add(index)
        _close_files()  # in-process writes: done with this file
        kept = [i for i in range(n) if i not in failed]
        if failed:
            _compact(h5_path, "images", kept)
        return kept

    def _run(self, tasks: Iterator[_Task]) -> Iterator[tuple[int, tuple[str, str] | None]]:
        """Results in task order, with at most two blocks of tasks handed to the pool."""
        if self._pool is None:
            yield from map(_write_task, tasks)
            return
        block = CHUNKSIZE * self.num_workers * 4
        pending: deque = deque()
        while chunk := list(itertools.islice(tasks, block)):
            if len(chunk) < block:
                # The split's last tasks go out in small chunks, so the workers finish
                # together instead of one idling while another decodes a whole chunk.
                tail = min(len(chunk), self.num_workers * CHUNKSIZE)
                if len(chunk) > tail:
                    pending.append(self._pool.imap(_write_task, chunk[:-tail], CHUNKSIZE))
                pending.append(self._pool.imap(_write_task, chunk[-tail:], TAIL_CHUNKSIZE))
            else:
                pending.append(self._pool.imap(_write_task, chunk, CHUNKSIZE))
            while len(pending) >= 2:
                yield from pending.popleft()
        while pending:
            yield from pending.popleft()


def _exactly(items: Iterable[str], n: int) -> Iterator[str]:
    """``items``, checked to be exactly ``n`` of them."""
    count = 0
    for count, item in enumerate(items, 1):
        if count > n:
            raise ValueError(f"more than the {n} image files announced (num_images)")
        yield item
    if count != n:
        raise ValueError(f"{count} image files, but num_images={n} were announced")


def _create_contiguous(h5_path: str, name: str, shape: tuple[int, ...], attrs: dict) -> int:
    """Create ``h5_path`` with a contiguous uint8 dataset allocated now; its byte offset.

    The storage is allocated at creation (``ALLOC_TIME_EARLY``) and never pre-filled
    (``FILL_TIME_NEVER``: every byte is written by a decode worker, or the row is dropped).
    """
    with h5py.File(h5_path, "w") as h:
        for key, value in attrs.items():
            h.attrs[key] = value
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)  # no timestamps: same inputs, same bytes
        space = h5py.h5s.create_simple(shape)
        dset = h5py.h5d.create(h.id, name.encode(), h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl)
        offset = dset.get_offset()
    if offset is None:  # zero-sized dataset: no storage, nothing to write
        return 0
    return int(offset)


def _compact(h5_path: str, name: str, kept: list[int]) -> None:
    """Rewrite ``h5_path`` so ``name`` holds only the rows ``kept`` (attributes kept).

    The copy is built beside it as ``.{file name}.compact.XXXX.tmp`` (one leading dot, also
    for a hidden file) and renamed over it. Hidden and ending in ``.tmp`` like every temp file
    of preprocessing, it is removed after a kill by the stale-temp sweep of
    :func:`captioner.data.preprocess.create_input_files`.
    """
    folder, base = os.path.split(h5_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base.lstrip('.')}.compact.", suffix=".tmp",
                               dir=folder or ".")
    os.close(fd)
    try:
        with h5py.File(h5_path, "r") as src:
            source = src[name]
            offset = _create_contiguous(tmp, name, (len(kept),) + source.shape[1:],
                                        dict(src.attrs))
            row_bytes = int(np.prod(source.shape[1:]))
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for row, index in enumerate(kept):
                    os.pwrite(fd, source[index].tobytes(), offset + row * row_bytes)
            finally:
                os.close(fd)
        os.chmod(tmp, os.stat(h5_path).st_mode & 0o7777)  # mkstemp made it 0600
        os.replace(tmp, h5_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
