"""The two models under test, built alike: ours (``CaptioningModule``) and the tutorial reference,
with random weights, and our training step as Lightning runs it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks import tutorial_reference as tut
from benchmarks.sizes import Sizes
from benchmarks.synthetic import special_ids
from benchmarks.timing import autocast
from captioner.losses import caption_loss

if TYPE_CHECKING:
    from benchmarks.preprocess import DataSet


def build_ours(sizes: Sizes, device: torch.device, fine_tune: bool, vocab_size: int | None = None,
               ids: dict[str, int] | None = None, dropout: float = 0.5, cuda_graph: bool = False):
    """``CaptioningModule`` (random weights) on ``device`` and its Adam optimiser."""
    from captioner.lit_module import CaptioningModule

    module = CaptioningModule(
        vocab_size=vocab_size or sizes.vocab_size, **(ids or special_ids(sizes)),
        encoder={"arch": sizes.arch, "encoded_image_size": sizes.encoded_image_size,
                 "pretrained": False, "fine_tune_from": 2, "last_stage": sizes.last_stage,
                 "channels_last": True, "cuda_graph": cuda_graph},
        decoder={"embed_dim": sizes.embed_dim, "decoder_dim": sizes.decoder_dim,
                 "attention_dim": sizes.attention_dim, "dropout": dropout},
        fine_tune_encoder=fine_tune)
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def build_ours_for(data: DataSet, sizes: Sizes, device: torch.device, fine_tune: bool,
                   cuda_graph: bool = False):
    """:func:`build_ours` for the prepared benchmark data: its word map's size and special ids."""
    ids = {key: data.special_ids[key] for key in ("pad_id", "unk_id", "start_id", "end_id")}
    return build_ours(sizes, device, fine_tune, ids=ids, cuda_graph=cuda_graph,
                      vocab_size=max(sizes.vocab_size, data.vocab_size))


def ours_train_step(module, optimizer, device: torch.device) -> Callable[[dict], float]:
    """Forward + ``caption_loss`` + backward + value clipping at 5 + Adam, as Lightning runs it."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        with autocast(device):
            out = module.captioner(batch["images"], batch["captions"], batch["lengths"])
            loss = caption_loss(out.logits.float(), out.targets, out.mask, out.alphas.float()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 5.0)
        optimizer.step()
        return loss.detach()

    return step


def build_tutorial(sizes: Sizes, device: torch.device, fine_tune: bool, dropout: float = 0.5):
    encoder = tut.TutorialEncoder(sizes.arch, sizes.encoded_image_size, sizes.last_stage)
    encoder_dim = 64 * (4 if sizes.arch in ("resnet50", "resnet101", "resnet152") else 1) \
        * 2 ** (sizes.last_stage - 1)
    decoder = tut.TutorialDecoder(sizes.attention_dim, sizes.embed_dim, sizes.decoder_dim,
                                  sizes.vocab_size, encoder_dim, dropout)
    encoder.to(device)
    decoder.to(device)
    return encoder, decoder, tut.TutorialTrainer(encoder, decoder, fine_tune, device)


def save_module_checkpoint(model, path: Path) -> Path:
    """The checkpoint Lightning's ``ModelCheckpoint`` writes for a ``CaptioningModule``, without a
    Trainer: its state dict, hyperparameters and ``on_save_checkpoint`` additions (the word map
    and the run config), written atomically."""
    import lightning

    from captioner.checkpoints import save_checkpoint

    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}
    model.on_save_checkpoint(checkpoint)
    save_checkpoint(checkpoint, path)
    return path
