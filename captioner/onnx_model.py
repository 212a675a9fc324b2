"""A model exported by ``python -m captioner.export``, run by ONNX Runtime under our beam search.

Legend: B batch, S image side, P regions, D encoder channels, H decoder hidden, A attention,
V vocabulary, K beam width, N = B*K search rows.

The model folder holds three ONNX graphs, the word map and the settings (file names below). The
graphs need no PyTorch; in Python, :class:`OnnxCaptioner` turns the ONNX Runtime sessions into
the ``step_fn`` that :func:`captioner.search.beam_search` takes, so captions come from the same
search as the PyTorch model's (docs/serving.md describes the loop for other languages).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captioner.search import Hypothesis, StepFn, beam_search
from captioner.vocab import WordMap

FORMAT_VERSION = 1
ENCODER_FILE = "encoder.onnx"
INIT_FILE = "decoder_init.onnx"
STEP_FILE = "decoder_step.onnx"
WORD_MAP_FILE = "word_map.json"
#: Written last by the export: a folder without it is incomplete.
CONFIG_FILE = "captioner.json"

ENCODER_INPUTS, ENCODER_OUTPUTS = ["images"], ["features"]
INIT_INPUTS, INIT_OUTPUTS = ["features"], ["h", "c", "projected"]
STEP_INPUTS = ["tokens", "h", "c", "features", "projected"]
STEP_OUTPUTS = ["log_probs", "h_next", "c_next", "alpha", "logits"]


def read_model_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings of an exported model folder (``captioner.json``), checked.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (an unfinished export).
        ValueError: a format this version cannot read.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: {model_dir} is not a finished export; "
                                f"run python -m captioner.export ckpt_path=... output_dir={model_dir}")
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config.get('format_version')!r}, this "
                         f"version reads {FORMAT_VERSION}; export the checkpoint again")
    for name in (ENCODER_FILE, INIT_FILE, STEP_FILE, WORD_MAP_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing; export the checkpoint again")
    return config


class OnnxCaptioner:
    """The exported encoder and decoder in ONNX Runtime sessions, with ``generate`` like
    :meth:`captioner.models.Captioner.generate`.

    Args:
        model_dir: a folder written by ``python -m captioner.export``.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads per session; None lets ONNX Runtime choose (all cores).

    Attributes:
        word_map: the checkpoint's word map.
        image_size: S, the side images are resized to (the training data's).
        draft_min_ratio: the training data's JPEG draft setting, for ``load_image``.
        search: the search settings recorded at export (``beam_size``, ``max_len``,
            ``length_penalty``).
    """

    def __init__(self, model_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.config = read_model_config(self.model_dir)
        self.word_map = WordMap.load(self.model_dir / WORD_MAP_FILE)
        self.image_size = int(self.config["image_size"])
        self.draft_min_ratio = self.config.get("draft_min_ratio")
        self.start_id = int(self.config["start_id"])
        self.end_id = int(self.config["end_id"])
        self.vocab_size = int(self.config["vocab_size"])
        self.search = dict(self.config["search"])
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])

        def session(name: str):
            return ort.InferenceSession(str(self.model_dir / name), options, providers=providers)

        self.encoder, self.init, self.step = session(ENCODER_FILE), session(INIT_FILE), session(STEP_FILE)

    def encode(self, images: Tensor | np.ndarray) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, P, D) float32 features (normalisation is in the graph)."""
        images = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, self.image_size,
                                                                              self.image_size):
            raise ValueError(f"images must be uint8 (B, 3, {self.image_size}, {self.image_size}) "
                             f"(captioner.data.images.load_image), got {images.dtype} {images.shape}")
        return self.encoder.run(ENCODER_OUTPUTS, {"images": np.ascontiguousarray(images)})[0]

    def step_fn(self, features: np.ndarray, projected: np.ndarray) -> StepFn:
        """The step function of :func:`captioner.search.beam_search` over the step graph.

        Args:
            features: (N, P, D) float32, each search row's image features (already expanded
                for the beams, as the search's static context is).
            projected: (N, P, A) float32 from the init graph, expanded the same way.

        Returns:
            ``step_fn(tokens (N,) int64, (h, c) each (N, H)) -> (log_probs (N, V), (h, c),
            alpha (N, P))``, torch tensors on the CPU sharing ONNX Runtime's output buffers.
        """
        def step_fn(tokens: Tensor, state: tuple[Tensor, Tensor]):
            h, c = state
            log_probs, h, c, alpha = self.step.run(STEP_OUTPUTS[:4], {
                "tokens": tokens.numpy(), "h": h.numpy(), "c": c.numpy(),
                "features": features, "projected": projected})
            return (torch.from_numpy(log_probs), (torch.from_numpy(h), torch.from_numpy(c)),
                    torch.from_numpy(alpha))

        return step_fn

    @torch.no_grad()
    def generate(self, images: Tensor | np.ndarray, beam_size: int = 1, max_len: int = 50,
                 length_penalty: float = 0.0, num_return: int = 1) -> list[list[Hypothesis]]:
        """Caption images with :func:`captioner.search.beam_search` (beam 1 is greedy search).

        Args:
            images: (B, 3, S, S) uint8.
            beam_size, max_len, length_penalty, num_return: as for ``Captioner.generate``.

        Returns:
            B lists of ``num_return`` Hypothesis, best first.
        """
        features = self.encode(images)
        h, c, projected = self.init.run(INIT_OUTPUTS, {"features": features})
        if beam_size > 1:  # the static context once per beam row, as expand_for_beams lays it out
            features = np.repeat(features, beam_size, axis=0)  # (B*K, P, D)
            projected = np.repeat(projected, beam_size, axis=0)  # (B*K, P, A)
        state = (torch.from_numpy(h), torch.from_numpy(c))
        return beam_search(self.step_fn(features, projected), state, features.shape[0] // beam_size,
                           beam_size, self.start_id, self.end_id, max_len,
                           length_penalty=length_penalty, num_return=num_return)
