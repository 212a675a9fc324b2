"""CaptioningModule: the LightningModule around the plain-PyTorch ``Captioner``.

It owns training, validation and test steps, the metric keys (``train/loss``, ``val/bleu4``, ...),
the optimiser and LR schedule, and keeps the word map in every checkpoint. The training objective
is cross-entropy (``xe``, teacher forcing) or self-critical sequence training (``scst``: sampled
captions rewarded with CIDEr-D, Rennie et al. 2017). The batch dict
documented in ``captioner/data/dataset.py`` is its only contract with the data side.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from captioner.callbacks import ImageRateProgressBar
from captioner.cider import CiderD, DocumentFrequencies
from captioner.losses import caption_loss, new_self_critical_baseline, self_critical_loss
from captioner.metrics import CaptionAccumulator, topk_accuracy
from captioner.models import AttentionLSTMDecoder, Captioner, ImageEncoder
from captioner.models.decoder import load_glove_embeddings
from captioner.search import Hypothesis
from captioner.vocab import WordMap

DEFAULT_SEARCH = {"beam_size": 1, "max_len": 50, "length_penalty": 0.0}
OBJECTIVES = ("xe", "scst")
#: Self-critical training settings (``model.scst``); baseline: new_self_critical | greedy.
DEFAULT_SCST = {"train_sample_n": 5, "temperature": 1.0, "max_len": 16, "baseline": "new_self_critical"}
SCST_BASELINES = ("new_self_critical", "greedy")


class FiniteLossCheck:
    """Stops training at a non-finite loss without making every step wait for the GPU.

    Reading a loss on the host waits for the GPU to finish the step so far; a training step on
    one GPU is bound by the host (docs/performance.md), so a check after the forward pass would
    stall every step. Instead each step's loss terms go to pinned host memory with an
    asynchronous copy, and :meth:`check` looks at them later: without waiting at the start of
    the next steps (the copy is usually done by then), and waiting at the points where a bad
    step must not get further (before validation, at the end of the epoch, before a checkpoint
    is written). A non-finite step is thus reported by step and epoch before any checkpoint
    holds its weights, though the optimiser may have taken that step in memory. On the CPU
    there is nothing to wait for: the next step checks it.
    """

    def __init__(self):
        self._pending: deque[tuple[torch.Tensor, Any, int, int, tuple[str, str]]] = deque()

    def add(self, loss: torch.Tensor, cross_entropy: torch.Tensor, penalty: torch.Tensor,
            epoch: int, step: int, labels: tuple[str, str] = ("cross-entropy", "attention penalty")) -> None:
        """Queue a step's loss and two of its terms (named by ``labels`` in the error)."""
        values = torch.stack([loss.detach(), cross_entropy.detach(), penalty.detach()]).float()
        event = None
        if values.is_cuda:
            host = torch.empty(3, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self._pending.append((values, event, epoch, step, labels))

    def check(self, wait: bool) -> None:
        """Raise ``FloatingPointError`` for the first pending non-finite loss; ``wait=False``
        leaves the losses whose copies are still in flight for a later check."""
        while self._pending:
            values, event, epoch, step, labels = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.popleft()
            loss, cross_entropy, penalty = values.tolist()
            if not math.isfinite(loss):
                self._pending.clear()
                raise FloatingPointError(
                    f"non-finite training loss ({loss}) at epoch {epoch}, step {step}: {labels[0]} "
                    f"{cross_entropy}, {labels[1]} {penalty}. Training stopped; the best "
                    "checkpoint is untouched. Lower the learning rate, keep gradient clipping on, or "
                    "use precision=32-true.")

    def clear(self) -> None:
        self._pending.clear()


class CaptioningModule(L.LightningModule):
    """Show, Attend and Tell training and evaluation.

    Args:
        vocab_size, pad_id, unk_id, start_id, end_id: from the word map (``WordMap.special_ids``).
        encoder: keyword arguments of ``ImageEncoder`` (arch, encoded_image_size, pretrained, ...).
        decoder: keyword arguments of ``AttentionLSTMDecoder`` other than vocab and encoder size.
        fine_tune_encoder: train encoder stages ``>= encoder['fine_tune_from']``.
        embeddings_path: GloVe-style word vectors to initialise the embedding (needs ``word_map``).
        fine_tune_embeddings: keep training the embedding.
        alpha_c: weight of the doubly stochastic attention penalty.
        optimizer: a partial optimiser class taking parameter groups (default Adam).
        decoder_lr, encoder_lr: learning rates of the two parameter groups.
        lr_factor, lr_patience: multiply the LRs by ``lr_factor`` at the ``lr_patience``-th
            validation without an improvement of :attr:`monitor` (and every ``lr_patience`` after).
        val_search, test_search: ``beam_size``, ``max_len``, ``length_penalty`` used to generate
            the captions that BLEU scores (validation is free-running, never teacher forced).
        test_loss: log ``test/loss`` and ``test/top5`` (a teacher-forced pass over every
            reference caption, about as costly as the beam search) in the test step;
            ``evaluate.py``, which reports the captions' scores only, turns it off.
        num_log_examples: val images whose captions are logged each validation.
        image_mean, image_std: normalisation applied on the device to uint8 images.
        data: small dict describing the data the model was trained on (name, fingerprint, ...).
        word_map: the ``WordMap``; stored in every checkpoint and restored from it.
        run_config: the resolved run config (plain dicts); stored in every checkpoint as "config".
        objective: ``xe`` (teacher-forced cross-entropy) or ``scst`` (self-critical training on
            CIDEr-D; start it from a cross-entropy model). SCST selects checkpoints, the LR
            schedule and early stopping on ``val/cider`` (:attr:`monitor`), XE on ``val/bleu4``.
        scst: settings of ``scst`` (see ``DEFAULT_SCST``): ``train_sample_n`` captions sampled
            per image, sampling ``temperature``, ``max_len`` tokens per sample, and the
            ``baseline``: ``new_self_critical`` (mean reward of the image's other samples) or
            ``greedy`` (the reward of the greedy caption, dropout off).
        cider_document_frequencies: CIDEr-D document frequencies of the train references (the
            SCST reward); needed to train with ``scst`` only, never stored in checkpoints.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        unk_id: int,
        start_id: int,
        end_id: int,
        encoder: dict[str, Any],
        decoder: dict[str, Any],
        fine_tune_encoder: bool = False,
        embeddings_path: str | None = None,
        fine_tune_embeddings: bool = True,
        alpha_c: float = 1.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        decoder_lr: float = 4e-4,
        encoder_lr: float = 1e-4,
        lr_factor: float = 0.8,
        lr_patience: int = 8,
        val_search: dict[str, Any] | None = None,
        test_search: dict[str, Any] | None = None,
        test_loss: bool = True,
        num_log_examples: int = 8,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        data: dict[str, Any] | None = None,
        word_map: WordMap | dict[str, int] | None = None,
        run_config: dict[str, Any] | None = None,
        objective: str = "xe",
        scst: dict[str, Any] | None = None,
        cider_document_frequencies: DocumentFrequencies | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "word_map", "run_config", "cider_document_frequencies"])
        if isinstance(word_map, dict):
            word_map = WordMap.from_dict(word_map)
        if word_map is not None and len(word_map) != vocab_size:
            raise ValueError(f"word map has {len(word_map)} entries but vocab_size={vocab_size}")
        self.word_map = word_map
        self.run_config = run_config
        self.optimizer_factory = optimizer
        self._validated_since_step = False
        self._loss_on_lightning_bar = True
        if lr_patience < 1:
            raise ValueError(f"lr_patience must be >= 1, got {lr_patience}")
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective={objective!r}; choose one of {OBJECTIVES}")
        unknown = set(scst or {}) - set(DEFAULT_SCST)
        if unknown:
            raise ValueError(f"model.scst has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_SCST)}")
        self.scst = {**DEFAULT_SCST, **(scst or {})}
        if self.scst["baseline"] not in SCST_BASELINES:
            raise ValueError(f"model.scst.baseline={self.scst['baseline']!r}; choose one of {SCST_BASELINES}")
        min_samples = 2 if self.scst["baseline"] == "new_self_critical" else 1
        if int(self.scst["train_sample_n"]) < min_samples:
            raise ValueError(f"model.scst.train_sample_n={self.scst['train_sample_n']}; the "
                             f"{self.scst['baseline']} baseline needs at least {min_samples}")
        self.objective = objective
        self._cider = CiderD(cider_document_frequencies) if cider_document_frequencies is not None else None

        image_encoder = ImageEncoder(**{**encoder, "fine_tune": fine_tune_encoder})
        embeddings = None
        if embeddings_path and word_map is not None:
            embeddings = load_glove_embeddings(embeddings_path, word_map.to_dict(),
                                               decoder.get("embed_dim", 512))
        text_decoder = AttentionLSTMDecoder(
            vocab_size=vocab_size,
            encoder_dim=image_encoder.encoder_dim,
            pretrained_embeddings=embeddings,
            fine_tune_embeddings=fine_tune_embeddings,
            **decoder,
        )
        self.captioner = Captioner(image_encoder, text_decoder, pad_id=pad_id, start_id=start_id,
                                   end_id=end_id, image_mean=image_mean, image_std=image_std)
        self.val_search = {**DEFAULT_SEARCH, **(val_search or {})}
        self.test_search = {**DEFAULT_SEARCH, "beam_size": 5, **(test_search or {})}
        self._captions = CaptionAccumulator()
        self._examples: dict[str, Any] | None = None
        self._epoch_sums: torch.Tensor | None = None  # (loss, top5) x rows over this epoch
        self._epoch_rows = 0
        self._finite_loss = FiniteLossCheck()
        #: After ``trainer.test``: scores and the gathered captions of the whole split.
        self.test_results: dict[str, Any] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def monitor(self) -> str:
        """The validation score that selects checkpoints and drives the LR schedule."""
        return "val/cider" if self.objective == "scst" else "val/bleu4"

    def _require_word_map(self) -> WordMap:
        if self.word_map is None:
            raise RuntimeError("CaptioningModule has no word map: pass word_map= or load a checkpoint")
        return self.word_map

    def _teacher_forced(self, batch: dict[str, Any], features: torch.Tensor | None = None):
        """Loss terms, top-5 accuracy and caption rows of a batch; ``features`` (B, P, D) from
        ``captioner.encode`` skip the encoder pass."""
        if features is None:
            out = self.captioner(batch["images"], batch["captions"], batch["lengths"])
        else:
            out = self.captioner.forward_features(features, batch["captions"], batch["lengths"])
        losses = caption_loss(out.logits, out.targets, out.mask, out.alphas, self.hparams.alpha_c)
        top5 = topk_accuracy(out.logits, out.targets, out.mask, k=5)
        return losses, top5, int(out.mask.shape[0])

    def _search(self, images: torch.Tensor | None, search: dict[str, Any], *,
                features: torch.Tensor | None = None,
                return_alphas: bool = True) -> list[Hypothesis]:
        """Best hypothesis per image with the given search settings (val_search/test_search),
        from ``images`` or from their ``features`` (B, P, D)."""
        hyps = self.captioner.generate(images, beam_size=search["beam_size"], max_len=search["max_len"],
                                       length_penalty=search.get("length_penalty", 0.0),
                                       features=features, return_alphas=return_alphas)
        return [h[0] for h in hyps]

    def generate_words(self, images: torch.Tensor | None, search: dict[str, Any], *,
                       features: torch.Tensor | None = None) -> list[list[str]]:
        """Best caption per image as words, with the given search settings, from ``images``
        or from their ``features`` (B, P, D)."""
        word_map = self._require_word_map()
        hyps = self._search(images, search, features=features, return_alphas=False)
        return [word_map.decode(h.tokens) for h in hyps]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._finite_loss.check(wait=False)  # earlier steps' losses, as far as they are known
        if self.objective == "scst":
            return self._self_critical_step(batch)
        losses, top5, num_captions = self._teacher_forced(batch)
        self._finite_loss.add(losses.loss, losses.cross_entropy, losses.attention_penalty,
                              self.current_epoch, self.global_step)
        # Step values under the plain keys; epoch means get their own keys (not Lightning's
        # automatic _step/_epoch suffixes, so train/loss is what TensorBoard shows). Not
        # prog_bar with our bar: Lightning converts progress-bar values to Python numbers after
        # every batch (a host-device sync); ImageRateProgressBar shows the loss when it
        # refreshes instead. Lightning's own bar (callbacks=none) gets it the usual way.
        self.log("train/loss", losses.loss, prog_bar=self._loss_on_lightning_bar, on_step=True,
                 on_epoch=False, batch_size=num_captions)
        self.log("train/top5", top5, on_step=True, on_epoch=False, batch_size=num_captions)
        # The epoch means (Lightning's on_epoch=True weighted by batch_size, this rank's) are
        # summed here on the device and logged once per epoch: each self.log call costs the
        # host ~0.6 ms of Python, which a GPU step bound by the host pays in full.
        sums = torch.stack([losses.loss.detach(), top5.detach()]) * num_captions
        self._epoch_sums = sums if self._epoch_sums is None else self._epoch_sums + sums
        self._epoch_rows += num_captions
        return losses.loss

    def _candidates(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Sampled token ids per row without <end> and padding."""
        tokens, mask = tokens.cpu().numpy(), mask.cpu().numpy()
        lengths = mask.sum(axis=1)
        ends = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)] == self.captioner.end_id
        return [row[:n].tolist() for row, n in zip(tokens, lengths - ends)]

    def _self_critical_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """SCST: K samples per image, CIDEr-D rewards on the host, the chosen baseline."""
        if self._cider is None:
            raise RuntimeError("model.objective=scst needs the CIDEr-D document frequencies of the "
                               "train references: pass cider_document_frequencies= (train.py does)")
        references = batch.get("references")
        if references is None:
            raise ValueError("model.objective=scst: the training batches carry no 'references'; build "
                             "the data module with train_references=True (train.py does)")
        word_map = self._require_word_map()
        settings = self.scst
        k, max_len = int(settings["train_sample_n"]), int(settings["max_len"])
        features = self.captioner.encode(batch["images"])  # once per image for its K samples
        samples = self.captioner.sample(features, num_samples=k, max_len=max_len,
                                        temperature=float(settings["temperature"]))
        ref_ids = [[[word_map.id_of(w) for w in ref] for ref in refs] for refs in references]
        num_images = len(ref_ids)
        candidates = self._candidates(samples.tokens, samples.mask)
        rewards = self._cider.scores(candidates, ref_ids, np.repeat(np.arange(num_images), k))
        rewards = torch.from_numpy(rewards.reshape(num_images, k))
        if settings["baseline"] == "greedy":
            decoder_training = self.captioner.decoder.training
            self.captioner.decoder.eval()  # the test-time caption: no dropout
            with torch.no_grad():
                greedy = self.captioner.sample(features.detach(), num_samples=1, max_len=max_len,
                                               greedy=True)
            self.captioner.decoder.train(decoder_training)
            greedy_rewards = self._cider.scores(self._candidates(greedy.tokens, greedy.mask), ref_ids)
            baseline = torch.from_numpy(greedy_rewards)[:, None].expand(num_images, k)
        else:
            baseline = new_self_critical_baseline(rewards)
        advantage = (rewards - baseline).reshape(-1).to(self.device, torch.float32, non_blocking=True)
        loss = self_critical_loss(samples.log_probs, samples.mask, advantage)
        mask = samples.mask.float()
        entropy = (samples.entropy * mask).sum() / mask.sum()
        mean_reward = rewards.mean().to(self.device)
        self._finite_loss.add(loss, mean_reward, advantage.abs().mean(), self.current_epoch,
                              self.global_step, labels=("mean reward", "mean |advantage|"))
        num_samples = num_images * k
        values = {"train/reward": mean_reward, "train/baseline": baseline.mean(),
                  "train/advantage": advantage.mean(), "train/entropy": entropy,
                  "train/sample_len": float(np.mean([len(c) for c in candidates]))}
        self.log("train/loss", loss, prog_bar=self._loss_on_lightning_bar, on_step=True,
                 on_epoch=False, batch_size=num_samples)
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=num_samples)
        sums = torch.stack([loss.detach(), mean_reward.float()]) * num_samples
        self._epoch_sums = sums if self._epoch_sums is None else self._epoch_sums + sums
        self._epoch_rows += num_samples
        return loss

    def on_train_start(self) -> None:
        self._finite_loss.clear()
        self._loss_on_lightning_bar = not isinstance(self.trainer.progress_bar_callback, ImageRateProgressBar)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums, self._epoch_rows = None, 0

    def on_train_end(self) -> None:
        self._finite_loss.check(wait=True)

    def on_validation_start(self) -> None:
        self._finite_loss.check(wait=True)  # no validation, and so no checkpoint, after a bad step

    def on_train_epoch_end(self) -> None:
        self._finite_loss.check(wait=True)
        if self._epoch_sums is not None:
            loss, second = self._epoch_sums / self._epoch_rows
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True)
            name = "train/reward_epoch" if self.objective == "scst" else "train/top5_epoch"
            self.log(name, second, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], stage: str, search: dict[str, Any],
                   loss: bool = True) -> None:
        # One encoder pass per image: its features feed the teacher-forced loss and the search.
        features = self.captioner.encode(batch["images"])
        if loss:
            losses, top5, num_captions = self._teacher_forced(batch, features)
            self.log(f"{stage}/loss", losses.loss, sync_dist=True, batch_size=num_captions)
            self.log(f"{stage}/top5", top5, sync_dist=True, batch_size=num_captions)
        hypotheses = self.generate_words(None, search, features=features)
        self._captions.update(batch["image_ids"], hypotheses, batch["references"])

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        scores = self._captions.compute()  # identical on every rank: gathered, de-duplicated
        # Lightning suggests sync_dist=True for epoch-level values under DDP (a warning it emits
        # later, at the epoch's end); these are already the same exact number on every rank.
        for name, value in scores.items():
            self.log(f"{stage}/{name}", float(value), sync_dist=False)
        return scores

    def on_validation_epoch_start(self) -> None:
        self._captions.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch_idx == 0 and self._examples is None and self.hparams.num_log_examples > 0:
            n = self.hparams.num_log_examples
            self._examples = {"images": batch["images"][:n].cpu(),
                              "references": batch["references"][:n],
                              "image_ids": batch["image_ids"][:n].tolist()}
        self._eval_step(batch, "val", self.val_search)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        self._captions.reset()
        if not self.trainer.sanity_checking:
            self._validated_since_step = True  # a fresh monitored score for the plateau scheduler
            self._log_examples()

    def on_test_epoch_start(self) -> None:
        self._captions.reset()
        self.test_results = None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_search, loss=self.hparams.test_loss)

    def on_test_epoch_end(self) -> None:
        scores = self._eval_epoch_end("test")
        image_ids, hypotheses, references = self._captions.gather()
        self.test_results = {"scores": scores, "image_ids": image_ids, "hypotheses": hypotheses,
                             "references": references, "search": dict(self.test_search)}
        self._captions.reset()

    def _log_examples(self) -> None:
        """Generated vs reference captions and one attention figure, on global rank 0."""
        if self._examples is None or self.global_rank != 0:
            return
        tensorboards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards:
            return
        from captioner.visualize import attention_figure, caption_text_table

        word_map = self._require_word_map()
        hyps = self._search(self._examples["images"].to(self.device), self.val_search)
        rows = []
        for image_id, hyp, refs in zip(self._examples["image_ids"], hyps, self._examples["references"]):
            rows.append((str(image_id), " ".join(word_map.decode(hyp.tokens)), [" ".join(r) for r in refs]))
        table = caption_text_table(rows)
        best = hyps[0]
        words = [word_map.word_of(t) for t in best.tokens] + (["<end>"] if best.finished else [])
        image = self._examples["images"][0].permute(1, 2, 0).numpy()
        figure = None
        if best.alphas is not None and len(words) == best.alphas.shape[0]:
            figure = attention_figure(image, words, best.alphas.cpu())
        for logger in tensorboards:
            logger.experiment.add_text("val/examples", table, self.global_step)
            if figure is not None:
                logger.experiment.add_figure("val/attention", figure, self.global_step, close=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decoder_params = [p for p in self.captioner.decoder.parameters() if p.requires_grad]
        encoder_params = [p for p in self.captioner.encoder.parameters() if p.requires_grad]
        groups = [{"params": decoder_params, "lr": self.hparams.decoder_lr, "name": "decoder"}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": self.hparams.encoder_lr, "name": "encoder"})
        factory = self.optimizer_factory or torch.optim.Adam
        optimizer = factory(groups)
        # ReduceLROnPlateau reduces once num_bad_epochs > patience: patience - 1 makes the
        # reduction happen at the lr_patience-th bad validation, as in the tutorial.
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=self.hparams.lr_factor, patience=self.hparams.lr_patience - 1)
        # Offered at the epochs that validate (trainer.check_val_every_n_epoch, e.g. debug=overfit's
        # 10), else at every epoch end (validation by steps or time, or none), skipped with
        # Lightning's warning while the monitored score (val/bleu4, or val/cider for SCST) is
        # missing (strict=False); lr_scheduler_step takes only a score of a validation since the
        # last step.
        every = self._trainer.check_val_every_n_epoch if self._trainer is not None else None
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor, "interval": "epoch",
                                 "frequency": every or 1, "strict": False}}

    def lr_scheduler_step(self, scheduler, metric: Any | None) -> None:
        """Step the plateau scheduler only on a monitored score of a validation since its last step: an
        epoch end that repeats an older score is not another epoch without improvement."""
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if not self._validated_since_step:
                return
            self._validated_since_step = False
            scheduler.step(metric)
        else:
            super().lr_scheduler_step(scheduler, metric)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._finite_loss.check(wait=True)  # never write the weights of a non-finite step
        word_map = self._require_word_map()
        checkpoint["word_map"] = word_map.to_dict()
        checkpoint["data_fingerprint"] = (self.hparams.data or {}).get("fingerprint")
        checkpoint["config"] = self.run_config
        # The weights are in the state dict: rebuilding from this checkpoint never needs the
        # ImageNet download or the embeddings file again.
        hparams = copy.deepcopy(dict(checkpoint.get("hyper_parameters", {})))
        if "encoder" in hparams:
            hparams["encoder"] = {**hparams["encoder"], "pretrained": False, "weights_path": None}
        hparams["embeddings_path"] = None
        checkpoint["hyper_parameters"] = hparams

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "word_map" not in checkpoint:
            raise ValueError("checkpoint has no word map: it was not written by captioner "
                             "(convert tutorial checkpoints with python -m captioner.convert_tutorial)")
        stored = WordMap.from_dict(checkpoint["word_map"])
        if self.word_map is not None and stored != self.word_map:
            raise ValueError(
                f"the checkpoint's word map ({len(stored)} words, fingerprint {stored.fingerprint()}) differs "
                f"from the data's word map ({len(self.word_map)} words, fingerprint {self.word_map.fingerprint()}): "
                "the model would emit the wrong words. Use the data the checkpoint was trained on "
                "(same dataset, captions_per_image and min_word_freq).")
        self.word_map = stored
        if self.run_config is None:  # loading a model; a resumed run (fit) keeps its own config
            self.run_config = checkpoint.get("config")

