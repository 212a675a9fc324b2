"""Caption image files with a trained checkpoint, optionally drawing per-word attention figures.

    python -m captioner.caption image=path/to/file_or_folder [ckpt_path=...] [beam=5] \\
        [attention=true] [recursive=false] [output_dir=...]
    python -m captioner.caption image=... backend=onnx [model_dir=...]   # an export, in ONNX Runtime

``image`` is a file, a folder (its image files, sorted; ``recursive=true`` descends) or a list
``image=[a.jpg,photos]``. Hydra reads a number-like name as a number (``2023`` stays ``2023``,
but ``2023.10`` becomes 2023.1 and ``2023_01`` 202301), so quote such a name for Hydra inside
the shell's quotes: ``image="'2023.10'"``.
Without ``ckpt_path`` the best checkpoint of the latest training run
is used (``{paths.output_root}/train/latest/checkpoints/best.ckpt``, else ``last.ckpt``).
Each image prints ``path: caption`` on stdout; a missing, unreadable or non-image file prints an
error line naming it on stderr and the others are still captioned; the exit code is 1 if any
failed. With ``attention=true`` one PNG per image goes to ``<output dir>/attention/``, and
``captions.json`` lists every result.

Inference sees exactly what training saw: images go through the preprocessing's
:func:`captioner.data.images.load_image` at the checkpoint's ``data.image_size`` and are
normalised inside the model (``Captioner.encode``).

:func:`caption_images` is the plain-Python core (no Hydra); :func:`caption` runs it from a
composed config and :func:`main` is the ``@hydra.main`` wrapper.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image
from torch import Tensor

from captioner.data.images import DEFAULT_DRAFT_MIN_RATIO, IMAGE_ERRORS, load_image
from captioner.models import Captioner
from captioner.files import write_json_atomic
from captioner.onnx_model import OnnxCaptioner
from captioner.vocab import END, WordMap


@dataclass
class CaptionResult:
    """The caption of one input path, or why it failed.

    Attributes:
        path: the input path as given (or as found in a folder).
        words: the best caption's words (no special tokens); None if the image failed.
        error: ``"ExceptionType: message"`` when the image could not be read or captioned.
        image: uint8 (S, S, 3), exactly the pixels the model saw; None on error.
        alphas: (L, P) float attention rows of the best caption, one per emitted token
            (``<end>`` included when finished); None on error.
        finished: the caption ended with ``<end>`` (False: cut at ``max_len``).
        score: its total log-probability.
        tokens: its token ids, without ``<start>``/``<end>``.
    """

    path: Path
    words: list[str] | None = None
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    alphas: Tensor | None = field(default=None, repr=False)
    finished: bool = False
    score: float = float("nan")
    tokens: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def caption(self) -> str:
        return " ".join(self.words or [])

    def figure_words(self, word_map: WordMap) -> list[str]:
        """One title per attention row: the words plus ``<end>`` when finished."""
        return [word_map.word_of(t) for t in self.tokens] + ([END] if self.finished else [])


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes (``.jpg`` ...) of the formats PIL can open."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files of a folder (by suffix, hidden files skipped), sorted by path.

    Args:
        folder: a directory.
        recursive: descend into sub-folders.

    Returns:
        Sorted paths; a file with an image suffix but other content is still listed (it
        fails later with an error naming it).

    Raises:
        NotADirectoryError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    extensions = image_extensions()
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates
                  if p.suffix.lower() in extensions and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _unwrap(model: Any, word_map: WordMap | dict[str, int] | None) -> tuple[Captioner | OnnxCaptioner, WordMap]:
    captioner = getattr(model, "captioner", model)
    if isinstance(captioner, OnnxCaptioner):
        return captioner, captioner.word_map
    if not isinstance(captioner, Captioner):
        raise TypeError(f"model must be a Captioner, a CaptioningModule or an OnnxCaptioner, got "
                        f"{type(model).__name__}")
    word_map = word_map if word_map is not None else getattr(model, "word_map", None)
    if word_map is None:
        raise ValueError("caption_images needs a word map: pass word_map= or a CaptioningModule loaded "
                         "from a checkpoint")
    if isinstance(word_map, dict):
        word_map = WordMap.from_dict(word_map)
    if len(word_map) != captioner.decoder.vocab_size:
        raise ValueError(f"the word map has {len(word_map)} entries but the model's vocabulary is "
                         f"{captioner.decoder.vocab_size}")
    return captioner, word_map


@torch.no_grad()
def caption_images(model: Any, paths: Sequence[str | os.PathLike], image_size: int, beam_size: int = 5,
                   max_len: int = 50, *, word_map: WordMap | dict[str, int] | None = None,
                   length_penalty: float = 0.0, batch_size: int = 16,
                   draft_min_ratio: float | None = DEFAULT_DRAFT_MIN_RATIO) -> Iterator[CaptionResult]:
    """Caption image files in batches with beam search, yielding one result per path in order.

    Each file is decoded and resized by :func:`captioner.data.images.load_image` (the
    training preprocessing) to (3, S, S) uint8; the model normalises on its device. A file that
    cannot be read yields a result with ``error`` set and does not stop the others. The model
    is put in eval mode (no dropout).

    Args:
        model: a ``Captioner``, a ``CaptioningModule`` (its ``captioner`` and ``word_map``), or
            an :class:`~captioner.onnx_model.OnnxCaptioner` (an export run by ONNX Runtime).
        paths: image files.
        image_size: S, the side the model was trained on (the checkpoint's ``data.image_size``).
        beam_size: K; 1 is greedy search.
        max_len: most tokens generated per caption, ``<end>`` included.
        word_map: needed when ``model`` is a bare ``Captioner``.
        length_penalty: GNMT ranking exponent (0 = the tutorial's raw log-probability).
        batch_size: images decoded and searched together.
        draft_min_ratio: JPEG draft decoding (see :func:`captioner.data.images.load_image`);
            pass the training data's ``data.draft_min_ratio``.

    Yields:
        :class:`CaptionResult`, in the order of ``paths``.
    """
    if image_size < 1 or beam_size < 1 or max_len < 1 or batch_size < 1:
        raise ValueError(f"image_size, beam_size, max_len and batch_size must be >= 1, got {image_size}, "
                         f"{beam_size}, {max_len}, {batch_size}")
    captioner, word_map = _unwrap(model, word_map)
    if isinstance(captioner, Captioner):
        captioner.eval()
    paths = [Path(p) for p in paths]
    for start in range(0, len(paths), batch_size):
        results = [CaptionResult(path) for path in paths[start:start + batch_size]]
        pixels, good = [], []
        for result in results:
            try:
                pixels.append(torch.from_numpy(load_image(result.path, image_size, draft_min_ratio)))
                good.append(result)
            except IMAGE_ERRORS as e:
                result.error = f"{type(e).__name__}: {e}"
        if good:
            batch = torch.stack(pixels)  # (n, 3, S, S) uint8
            hyps = captioner.generate(batch, beam_size=beam_size, max_len=max_len,
                                      length_penalty=length_penalty)
            for result, image, best in zip(good, batch, (h[0] for h in hyps)):
                result.words = [word_map.word_of(t) for t in best.tokens]
                result.tokens = list(best.tokens)
                result.finished = best.finished
                result.score = float(best.score)
                result.alphas = best.alphas
                result.image = image.permute(1, 2, 0).numpy()  # (S, S, 3)
        yield from results


def figure_names(paths: Sequence[Path], roots: Sequence[Path | None]) -> list[Path]:
    """Relative PNG names, one per path, unique: ``a/b.jpg`` under root -> ``a/b.png``.

    Args:
        paths: the image paths.
        roots: for each path the folder it was found in (its sub-folders are kept), or None
            for a file given directly (only its name is used).

    Returns:
        Relative paths ending in ``.png``; a clash gets ``-2``, ``-3``... before the suffix.
    """
    names, used = [], set()
    for path, root in zip(paths, roots):
        relative = path.relative_to(root) if root is not None else Path(path.name)
        base = relative.with_suffix("")
        name, n = base.with_name(base.name + ".png"), 1
        while name.as_posix().lower() in used:
            n += 1
            name = base.with_name(f"{base.name}-{n}.png")
        used.add(name.as_posix().lower())
        names.append(name)
    return names


def _expand_inputs(image: Any, recursive: bool) -> tuple[list[Path], list[Path | None], list[str]]:
    """Inputs -> (paths, their roots, errors for folders without images and for numbers that
    name nothing, which say how to quote the name).

    ``image`` is one input (a str or path, or the int or float Hydra makes of a name such as
    ``2023``) or a list, tuple or ``ListConfig`` of them.

    Raises:
        ValueError: an input is not a str, path or number (``image=true`` is a bool).
    """
    inputs = list(image) if isinstance(image, (list, tuple, ListConfig)) else [image]
    for item in inputs:
        if isinstance(item, bool) or not isinstance(item, (str, os.PathLike, int, float)):
            raise ValueError(f"image: {item!r} ({type(item).__name__}) is not a path; quote a file or "
                             f"folder name that Hydra reads as another type: image=\"'true'\"")
    paths: list[Path] = []
    roots: list[Path | None] = []
    errors: list[str] = []
    for value in inputs:
        item = Path(str(value)).expanduser()
        if isinstance(value, (int, float)) and not item.exists():
            # Hydra read a name as a number: 2023_01 -> 202301, 2023.10 -> 2023.1, 1e3 -> 1000.0.
            errors.append(f"{item}: no such file or folder; Hydra read image as the number {value!r}. "
                          f"Quote a number-like name for Hydra inside the shell's quotes: "
                          f"image=\"'2023_01'\"")
            continue
        if item.is_dir():
            found = find_images(item, recursive)
            if not found:
                errors.append(f"{item}: no image files in this folder"
                              + ("" if recursive else " (recursive=true searches sub-folders)"))
            paths += found
            roots += [item] * len(found)
        else:  # a file, or a missing path that then fails with an error naming it
            paths.append(item)
            roots.append(None)
    return paths, roots, errors


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LoadedModel:
    """A model ready to caption, from a checkpoint (``backend=torch``) or an export (``onnx``).

    Attributes:
        model: a ``CaptioningModule`` in eval mode on its device, or an ``OnnxCaptioner``;
            either goes to :func:`caption_images`, and ``model.word_map`` is its word map.
        word_map: the word map.
        image_size: S, the side images are resized to.
        draft_min_ratio: the training data's JPEG draft setting.
        source: the checkpoint file or the export folder.
    """

    model: Any
    word_map: WordMap
    image_size: int
    draft_min_ratio: float | None
    source: Path


def load_model(cfg: DictConfig) -> LoadedModel:
    """The model that ``cfg`` names: ``backend=torch`` loads ``ckpt_path`` (default: the latest
    run's best checkpoint) on ``device``; ``backend=onnx`` opens the export in ``model_dir``
    (default: ``{paths.output_root}/export/latest``) in ONNX Runtime.

    Raises:
        FileNotFoundError: the checkpoint or export does not exist.
        ValueError: an unknown backend, or a checkpoint without ``data.image_size``.
    """
    from captioner.run import resolve_checkpoint

    backend = cfg.get("backend", "torch")
    if backend == "onnx":
        model_dir = Path(cfg.get("model_dir") or Path(cfg.paths.output_root) / "export" / "latest")
        model = OnnxCaptioner(model_dir, threads=cfg.get("threads"))
        return LoadedModel(model, model.word_map, int(cfg.get("image_size") or model.image_size),
                           model.draft_min_ratio, model_dir)
    if backend != "torch":
        raise ValueError(f"backend={backend!r}: use backend=torch (a checkpoint) or backend=onnx "
                         f"(a folder written by python -m captioner.export, model_dir=...)")
    from captioner.checkpoints import MODEL_KEYS, load_checkpoint
    from captioner.lit_module import CaptioningModule

    ckpt_path = resolve_checkpoint(cfg)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist; pass ckpt_path=path/to/model.ckpt")
    load_checkpoint(ckpt_path, mmap=True, required=MODEL_KEYS)  # CheckpointError naming an unreadable file
    device = _device(cfg.get("device", "auto"))
    model = CaptioningModule.load_from_checkpoint(ckpt_path, map_location=device, weights_only=True).eval()
    data_cfg = (model.run_config or {}).get("data") or {}
    image_size = cfg.get("image_size") or data_cfg.get("image_size")
    if not image_size:
        raise ValueError(f"{ckpt_path} stores no data.image_size in its config; pass image_size=S, the "
                         f"side of the images it was trained on")
    return LoadedModel(model, model.word_map, int(image_size),
                       data_cfg.get("draft_min_ratio", DEFAULT_DRAFT_MIN_RATIO), Path(ckpt_path))


def caption(cfg: DictConfig) -> int:
    """Caption ``cfg.image`` with the checkpoint ``cfg.ckpt_path`` (default: latest run's best).

    Prints ``path: caption`` per image (stdout) and an error line per failed input (stderr);
    writes ``captions.json`` and, with ``cfg.attention``, one figure per image under the
    output folder (``cfg.output_dir``, default the Hydra run folder).

    Returns:
        The number of inputs that failed (0 = all captioned).
    """
    from captioner.run import output_dir

    if cfg.get("image") in (None, "", "???"):
        raise ValueError("nothing to caption: pass image=path/to/file_or_folder (or image=[a.jpg,b.png])")
    loaded = load_model(cfg)
    model, image_size, ckpt_path = loaded.model, loaded.image_size, loaded.source
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else output_dir(cfg)
    print(f"Captioning with {ckpt_path} (beam {cfg.beam}, images resized to {image_size}x{image_size})",
          file=sys.stderr)

    paths, roots, errors = _expand_inputs(cfg.image, bool(cfg.get("recursive", False)))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    names = figure_names(paths, roots)
    records = []
    failures = len(errors)
    for result, name in zip(caption_images(model, paths, int(image_size), cfg.beam, cfg.max_len,
                                           length_penalty=cfg.get("length_penalty", 0.0),
                                           batch_size=cfg.get("batch_size", 16),
                                           draft_min_ratio=loaded.draft_min_ratio),
                          names):
        record: dict[str, Any] = {"path": str(result.path)}
        if not result.ok:
            failures += 1
            print(f"error: {result.path}: {result.error}", file=sys.stderr)
            record["error"] = result.error
        else:
            print(f"{result.path}: {result.caption}", flush=True)
            record.update(caption=result.caption, finished=result.finished, score=result.score)
            if cfg.get("attention", True) and result.alphas is not None:
                from captioner.visualize import save_attention_figure

                figure = out_dir / "attention" / name
                save_attention_figure(result.image, result.figure_words(loaded.word_map), result.alphas,
                                      figure, smooth=cfg.get("smooth", True),
                                      words_per_row=cfg.get("words_per_row", 5))
                record["figure"] = str(figure)
        records.append(record)
    write_json_atomic(out_dir / "captions.json",
                      {"checkpoint": str(ckpt_path), "beam": cfg.beam, "image_size": int(image_size),
                       "results": records})
    captioned = sum("error" not in record for record in records)
    print(f"{captioned} of {len(records)} images captioned; wrote "
          f"{out_dir / 'captions.json'}" + (f" and figures in {out_dir / 'attention'}" if cfg.get("attention", True)
                                              else ""), file=sys.stderr)
    return failures


@hydra.main(version_base="1.3", config_path="../conf", config_name="caption")
def main(cfg: DictConfig) -> None:
    """``python -m captioner.caption image=...``; exits with 1 if any input failed or the
    checkpoint is unreadable (one line naming it)."""
    from captioner.checkpoints import CheckpointError

    try:
        failures = caption(cfg)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
