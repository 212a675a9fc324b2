"""Export a checkpoint to ONNX: the encoder, the decoder's initial state and its step.

    python -m captioner.export [ckpt_path=...] [format=onnx] [output_dir=...]

Writes three graphs (dynamic batch size), the word map and the settings into ``output_dir``
(default ``{paths.output_root}/export/<time>``, which ``export/latest`` then points to); see :mod:`captioner.onnx_model` for the file
names and docs/serving.md for the graphs' inputs and outputs. The search is not exported: it
stays :func:`captioner.search.beam_search`, driven by the step graph
(``python -m captioner.caption backend=onnx model_dir=...``). After writing, the export runs
the graphs in ONNX Runtime on random images and checks the step's logits against PyTorch's.

Legend: B batch, S image side, P regions, D encoder channels, H decoder hidden, A attention,
V vocabulary.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from captioner.data.images import DEFAULT_DRAFT_MIN_RATIO
from captioner.files import atomic_write, write_json_atomic
from captioner.models import Captioner
from captioner.models.decoder import DecoderState
from captioner.onnx_model import (CONFIG_FILE, ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS, FORMAT_VERSION,
                                  INIT_FILE, INIT_INPUTS, INIT_OUTPUTS, STEP_FILE, STEP_INPUTS, STEP_OUTPUTS,
                                  WORD_MAP_FILE, OnnxCaptioner)
from captioner.vocab import WordMap

FORMATS = ("onnx",)
# Logits of the exported step against PyTorch's, on the check after writing.
LOGITS_TOLERANCE = 1e-4


class EncoderGraph(nn.Module):
    """uint8 images (B, 3, S, S) -> features (B, P, D): ``Captioner.encode``, normalisation included."""

    def __init__(self, captioner: Captioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, images: Tensor) -> Tensor:
        return self.captioner.encode(images)


class InitGraph(nn.Module):
    """features (B, P, D) -> h, c (B, H) and the attention's projection (B, P, A)."""

    def __init__(self, captioner: Captioner):
        super().__init__()
        self.decoder = captioner.decoder

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        state = self.decoder.init_state(features)
        return state.h, state.c, self.decoder.project(features)


class StepGraph(nn.Module):
    """One decoder step: ``AttentionLSTMDecoder.step`` plus the search's log-softmax, with
    ``<pad>`` and ``<start>`` masked to -inf as ``Captioner.generate`` masks them.

    Inputs tokens (N,) int64, h and c (N, H), features (N, P, D), projected (N, P, A); outputs
    log_probs (N, V), h_next and c_next (N, H), alpha (N, P), logits (N, V) (unmasked).
    """

    def __init__(self, captioner: Captioner):
        super().__init__()
        self.decoder = captioner.decoder
        mask = torch.zeros(1, captioner.decoder.vocab_size)
        mask[0, [captioner.pad_id, captioner.start_id]] = float("-inf")
        self.register_buffer("mask", mask, persistent=False)  # (1, V): 0, or -inf on banned ids

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor,
                projected: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        out = self.decoder.step(tokens, DecoderState(h, c), features, projected)
        log_probs = (out.logits + self.mask).log_softmax(dim=-1)
        return log_probs, out.state.h, out.state.c, out.alpha, out.logits


def _export_graph(module: nn.Module, args: tuple[Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], opset: int | None) -> None:
    """One graph to ``path`` (written atomically), every input's dim 0 dynamic (the batch)."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in input_names}
    with warnings.catch_warnings():  # one Dim for every input's batch is what we mean
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(module.eval(), args, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic, dynamo=True,
                                    opset_version=opset, verbose=False)
    with atomic_write(path, "wb") as f:
        f.write(program.model_proto.SerializeToString())


@torch.no_grad()
def export_onnx(captioner: Captioner, word_map: WordMap, output_dir: str | os.PathLike, image_size: int,
                search: dict[str, Any], draft_min_ratio: float | None = DEFAULT_DRAFT_MIN_RATIO,
                opset: int | None = None, source: str | None = None) -> dict[str, Any]:
    """Write the three graphs, the word map and ``captioner.json`` (last) into ``output_dir``.

    Args:
        captioner: the model (moved to the CPU in eval mode for the export).
        word_map: its word map.
        output_dir: the folder to write (created; existing files of these names are replaced).
        image_size: S of the training data; the encoder graph takes (B, 3, S, S) uint8.
        search: ``beam_size``, ``max_len``, ``length_penalty`` recorded as the defaults.
        draft_min_ratio: the training data's JPEG draft setting, recorded for the preprocessing.
        opset: ONNX opset; None = the exporter's default.
        source: where the model came from (the checkpoint path), recorded.

    Returns:
        The settings written to ``captioner.json``.
    """
    if len(word_map) != captioner.decoder.vocab_size:
        raise ValueError(f"the word map has {len(word_map)} entries but the model's vocabulary is "
                         f"{captioner.decoder.vocab_size}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).unlink(missing_ok=True)  # the folder is unfinished until it is back
    captioner = captioner.to("cpu").eval()
    images = torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8)
    features = captioner.encode(images)  # also builds the encoder's cached parts outside the trace
    h, c, projected = InitGraph(captioner)(features)
    tokens = torch.tensor([captioner.start_id, captioner.end_id])
    _export_graph(EncoderGraph(captioner), (images,), output_dir / ENCODER_FILE, ENCODER_INPUTS,
                  ENCODER_OUTPUTS, opset)
    _export_graph(InitGraph(captioner), (features,), output_dir / INIT_FILE, INIT_INPUTS, INIT_OUTPUTS,
                  opset)
    _export_graph(StepGraph(captioner), (tokens, h, c, features, projected), output_dir / STEP_FILE,
                  STEP_INPUTS, STEP_OUTPUTS, opset)
    word_map.save(output_dir / WORD_MAP_FILE)
    config = {
        "format_version": FORMAT_VERSION, "source": source, "image_size": int(image_size),
        "draft_min_ratio": draft_min_ratio, "image_mean": captioner.image_mean.flatten().tolist(),
        "image_std": captioner.image_std.flatten().tolist(), "vocab_size": captioner.decoder.vocab_size,
        "num_regions": int(features.shape[1]), "encoder_dim": int(features.shape[2]),
        "decoder_dim": int(h.shape[1]), "attention_dim": int(projected.shape[2]),
        "pad_id": captioner.pad_id, "start_id": captioner.start_id, "end_id": captioner.end_id,
        "banned_ids": [captioner.pad_id, captioner.start_id],
        "search": {"beam_size": int(search["beam_size"]), "max_len": int(search["max_len"]),
                   "length_penalty": float(search.get("length_penalty", 0.0))},
        "files": {"encoder": ENCODER_FILE, "decoder_init": INIT_FILE, "decoder_step": STEP_FILE,
                  "word_map": WORD_MAP_FILE},
    }
    write_json_atomic(output_dir / CONFIG_FILE, config)
    return config


@torch.no_grad()
def step_logits_difference(captioner: Captioner, onnx_model: OnnxCaptioner, images: Tensor | None = None,
                           steps: int = 3, seed: int = 0) -> float:
    """Largest |logit difference| between the PyTorch decoder step and the step graph.

    Runs both on the same images for ``steps`` greedy steps (PyTorch's tokens fed to both),
    each side from its own features and state, so the encoder and init graphs count too.

    Args:
        images: (B, 3, S, S) uint8; None = 3 random images (``seed``).
    """
    if images is None:
        generator = torch.Generator().manual_seed(seed)
        size = onnx_model.image_size
        images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=generator)
    batch_size = images.shape[0]
    captioner = captioner.eval()
    features = captioner.encode(images)
    projected = captioner.decoder.project(features)
    state = captioner.decoder.init_state(features)
    onnx_features = onnx_model.encode(images)
    h, c, onnx_projected = onnx_model.init.run(INIT_OUTPUTS, {"features": onnx_features})
    tokens = torch.full((batch_size,), captioner.start_id, dtype=torch.long)
    worst = 0.0
    for _ in range(steps):
        out = captioner.decoder.step(tokens, state, features, projected)
        logits, h, c = onnx_model.step.run(["logits", "h_next", "c_next"], {
            "tokens": tokens.numpy(), "h": h, "c": c, "features": onnx_features, "projected": onnx_projected})
        worst = max(worst, float(np.abs(logits - out.logits.numpy()).max()))
        state, tokens = out.state, out.logits.argmax(dim=1)
    return worst


def export(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt_path`` (default: the latest run's best) in ``cfg.format`` to the output folder.

    Returns:
        The folder written.
    """
    from captioner.lit_module import CaptioningModule
    from captioner.run import output_dir, point_latest, resolve_checkpoint

    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: the export writes {' or '.join(FORMATS)}")
    ckpt_path = resolve_checkpoint(cfg)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist; pass ckpt_path=path/to/model.ckpt")
    model = CaptioningModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    if model.word_map is None:
        raise ValueError(f"{ckpt_path} holds no word map; export a checkpoint written by train.py")
    data_cfg = (model.run_config or {}).get("data") or {}
    image_size = cfg.get("image_size") or data_cfg.get("image_size")
    if not image_size:
        raise ValueError(f"{ckpt_path} stores no data.image_size in its config; pass image_size=S, the "
                         f"side of the images it was trained on")
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else output_dir(cfg)
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines list every optimisation pass
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"Exporting {ckpt_path} to {out_dir} (ONNX, images {image_size}x{image_size})", file=sys.stderr)
    search = {"beam_size": cfg.beam, "max_len": cfg.max_len, "length_penalty": cfg.length_penalty}
    export_onnx(model.captioner, model.word_map, out_dir, int(image_size), search,
                draft_min_ratio=data_cfg.get("draft_min_ratio", DEFAULT_DRAFT_MIN_RATIO),
                opset=cfg.get("opset"), source=str(ckpt_path))
    difference = step_logits_difference(model.captioner, OnnxCaptioner(out_dir))
    print(f"ONNX Runtime check: step logits within {difference:.2e} of PyTorch's", file=sys.stderr)
    if not difference <= LOGITS_TOLERANCE:
        raise RuntimeError(f"the exported step's logits differ from PyTorch's by {difference:.2e} "
                           f"(> {LOGITS_TOLERANCE}); the graphs in {out_dir} are not faithful")
    if not cfg.get("output_dir"):  # the run folder: model_dir's default finds it as export/latest
        point_latest(out_dir, Path(cfg.paths.output_root) / cfg.task_name)
    print(out_dir)
    return out_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """``python -m captioner.export [ckpt_path=...] [output_dir=...]``."""
    export(cfg)


if __name__ == "__main__":
    main()
