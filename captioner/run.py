"""train(cfg) / evaluate(cfg): build everything from a Hydra config and run it.

The only module that touches Hydra. It resolves values that depend on other values (the vocabulary
size and special-token ids come from the prepared word map) and passes them to ``instantiate``
as keyword arguments; nothing mutates the config afterwards.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from captioner.allocator import keep_freed_memory
from captioner.callbacks import ExactResume, ImageRateProgressBar
from captioner.checkpoints import (MODEL_KEYS, RESUME_KEYS, AtomicCheckpointIO, CheckpointError,
                                   check_checkpoint, load_checkpoint, remove_partial_files)
from captioner.lit_module import CaptioningModule
from captioner.files import write_json_atomic
from captioner.vocab import WordMap

log = logging.getLogger(__name__)

LATEST = "latest"


# ---------------------------------------------------------------------- paths
def output_dir(cfg: DictConfig) -> Path:
    """The run folder: Hydra's when running under Hydra, else ``cfg.paths.output_dir``."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


@rank_zero_only
def point_latest(run_dir: Path, task_root: Path) -> None:
    """Make ``task_root/latest`` a symlink to ``run_dir`` (atomically replaced)."""
    task_root.mkdir(parents=True, exist_ok=True)
    link = task_root / LATEST
    tmp = task_root / f".{LATEST}.{os.getpid()}"
    target = os.path.relpath(run_dir.resolve(), task_root.resolve())
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def latest_run(output_root: str | os.PathLike, task_name: str = "train") -> Path:
    link = Path(output_root) / task_name / LATEST
    if not link.exists():
        raise FileNotFoundError(
            f"no training run found: {link} does not exist. Train first (python train.py "
            "experiment=quickstart) or pass ckpt_path=path/to/checkpoint.ckpt")
    return link.resolve()


def run_checkpoints(output_root: str | os.PathLike, task_name: str = "train") -> list[Path]:
    """Every run's ``checkpoints/last.ckpt`` under ``output_root/task_name``, newest first
    (``auto_resume=newest``)."""
    candidates = (Path(output_root) / task_name).glob("*/checkpoints/last.ckpt")
    return sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True)


AUTO_RESUME_MODES = ("false", "true", "newest")


def auto_resume_checkpoint(mode: bool | str | None, run_dir: str | os.PathLike,
                           checkpoint_dirs: list[str | os.PathLike], output_root: str | os.PathLike,
                           task_name: str = "train") -> Path | None:
    """The checkpoint ``auto_resume`` resumes from, or None to start fresh.

    Each candidate, newest first, is checked (:func:`~captioner.checkpoints.check_checkpoint`:
    a whole torch checkpoint with the training state); an unreadable one, say cut short by a
    kill, is skipped with a warning naming it and the reason.

    Args:
        mode: ``false``/None: never. ``true``: only the current run folder, so a requeued Slurm job
            (whose folder is named by ``SLURM_JOB_ID``) or a rerun with the same ``hydra.run.dir``
            continues itself and a new run never picks up another run's state. ``"newest"``: the
            current run folder first, else the newest ``checkpoints/last.ckpt`` of any run of
            ``task_name`` under ``output_root`` (only for an output root that holds one experiment).
        run_dir: the current run folder; its Lightning ``hpc_ckpt_*.ckpt`` files count too.
        checkpoint_dirs: the ``dirpath`` of every ModelCheckpoint; their ``*.ckpt`` files count:
            ``last.ckpt``, and ``best.ckpt``, which is the newer one only when a kill came between
            the two writes at an epoch's end (both hold the full training state of that epoch).
        output_root, task_name: where ``"newest"`` looks (``output_root/task_name/*``).

    Returns:
        The newest (by modification time) intact candidate of the current run, else of the
        other runs (``newest``); None when there is no candidate at all.

    Raises:
        CheckpointError: there were candidates and none is intact; the message lists them.
    """
    key = str(mode).lower() if mode is not None else "false"
    if key not in AUTO_RESUME_MODES:
        raise ValueError(f"auto_resume={mode!r}: use false, true (this run folder's last.ckpt) or "
                         "newest (this run folder, else the newest run under paths.output_root)")
    if key == "false":
        return None
    run_dir = Path(run_dir)
    own = [p for d in checkpoint_dirs for p in Path(d).glob("*.ckpt")] + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    own = sorted({p for p in own if p.is_file()}, key=lambda p: p.stat().st_mtime_ns, reverse=True)
    candidates = own
    if key == "newest":
        mine = {p.resolve() for p in own}
        candidates = own + [p for p in run_checkpoints(output_root, task_name) if p.resolve() not in mine]
    problems = []
    for path in candidates:
        problem = check_checkpoint(path)
        if problem is None:
            return path
        log.warning("auto_resume=%s: skipping %s", mode, problem)
        problems.append(problem)
    if problems:
        raise CheckpointError(
            f"auto_resume={mode}: none of the {len(problems)} checkpoint(s) it found can be resumed: "
            + "; ".join(problems) + ". Resume another checkpoint with ckpt_path=..., or move these "
            "files away to start afresh.")
    return None


def refuse_used_folder(run_dir: Path, checkpoint_dirs: list[Path], cfg: DictConfig) -> None:
    """Refuse to start a fresh run where an earlier run's checkpoints are.

    Its ``best.ckpt`` would stay (the new one is ``best-v1.ckpt``) and be what ``evaluate.py``
    and ``caption`` take, and its ``last.ckpt`` would be overwritten. This happens when two
    ``train.py`` runs share ``hydra.run.dir``, e.g. two stages in one Slurm job, whose id names
    the folder. Lightning's own Slurm checkpoint (``hpc_ckpt_*.ckpt``), which Lightning resumes
    by itself under Slurm, must come from a run with these settings (:func:`check_same_run`).
    """
    hpc = max(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime_ns, default=None)
    if os.environ.get("SLURM_JOB_ID") and hpc is not None:
        check_same_run(hpc, cfg, "Lightning would resume this Slurm job from")
        return  # a requeued job: Lightning resumes it
    folders = list(dict.fromkeys(Path(d).resolve() for d in checkpoint_dirs))
    found = sorted(p for d in folders for p in d.glob("*.ckpt"))
    if found:
        names = ", ".join(p.name for p in found)
        raise FileExistsError(
            f"the run folder {run_dir} already holds checkpoints of an earlier run "
            f"({found[0].parent}: {names}); a new run there would overwrite its last.ckpt "
            "and leave its best.ckpt as the one evaluate.py uses. Continue that run with "
            "auto_resume=true (or ckpt_path=.../last.ckpt), or give this run a folder of its "
            "own: hydra.run.dir=<new folder> (under Slurm, one per train.py call of a job).")


#: The settings a checkpoint found by ``auto_resume`` must share with the run resuming it (the
#: model and its optimisation; how it decodes and what it logs may change).
SAME_RUN_KEYS = ("model", "init_from")
FREE_MODEL_KEYS = (".val_search", ".test_search", ".num_log_examples")


def check_same_run(ckpt_path: str | os.PathLike, cfg: DictConfig, found_by: str) -> None:
    """Refuse to resume a checkpoint of this run folder written by a run with other model settings.

    A requeued job has the same settings. Another run in the same folder (say stage 2 of a
    recipe after stage 1) would otherwise resume the wrong model and fail later with an
    optimiser-state mismatch, or not fail at all.
    """
    stored = load_checkpoint(ckpt_path, mmap=True).get("config") or {}
    current = _plain(cfg)
    diffs = []
    for key in (k for k in SAME_RUN_KEYS if k in stored):  # a converted tutorial checkpoint has data only
        there, here = _flat(stored.get(key)), _flat(current.get(key))
        diffs += [f"{key}{name}: {there.get(name)!r} there, {here.get(name)!r} here"
                  for name in sorted(set(there) | set(here))
                  if there.get(name) != here.get(name) and not name.startswith(FREE_MODEL_KEYS)]
    if diffs:
        raise ValueError(
            f"{found_by} {ckpt_path}, written by a run with other settings "
            f"({'; '.join(diffs[:6])}): it is another run's checkpoint. Give this run a folder of "
            f"its own (hydra.run.dir=<new folder>), or resume that checkpoint explicitly with "
            f"ckpt_path={ckpt_path}.")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{".a.b": leaf}``."""
    if isinstance(value, dict):
        return {name: leaf for k, v in value.items() for name, leaf in _flat(v, f"{prefix}.{k}").items()}
    return {prefix: value}


# ---------------------------------------------------------------------- building
def _plain(cfg: DictConfig | None) -> Any:
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = []
    for name, conf in (cfg.get("callbacks") or {}).items():
        if conf is not None and "_target_" in conf:
            callbacks.append(instantiate(conf))
    if not cfg.trainer.get("enable_progress_bar", True):  # the Trainer refuses a bar it may not show
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    return callbacks


def build_plugins(cfg: DictConfig) -> list:
    """``trainer.plugins``, plus :class:`~captioner.checkpoints.AtomicCheckpointIO` unless they
    name a checkpoint IO of their own: every checkpoint is written atomically."""
    configured = cfg.trainer.get("plugins")
    plugins = [] if configured is None else instantiate(configured, _convert_="all")
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def build_loggers(cfg: DictConfig) -> list | bool:
    loggers = [instantiate(conf) for conf in (cfg.get("logger") or {}).values()
               if conf is not None and "_target_" in conf]
    return loggers or False


def data_info(datamodule, word_map: WordMap) -> dict[str, Any]:
    return {"name": datamodule.data_name,
            "fingerprint": getattr(datamodule, "fingerprint", None) or word_map.fingerprint(),
            "word_map_fingerprint": word_map.fingerprint()}


def build_model(cfg: DictConfig, word_map: WordMap, datamodule) -> CaptioningModule:
    """The LightningModule named by ``cfg.model._target_`` with the vocabulary-derived values.

    Built by hand rather than by ``instantiate(cfg.model)``: the resolved run config passed in
    for the checkpoint contains ``_target_`` keys that instantiate would try to build.
    """
    kwargs = _plain(cfg.model)
    target = get_class(kwargs.pop("_target_"))
    if cfg.model.get("optimizer") is not None:
        kwargs["optimizer"] = instantiate(cfg.model.optimizer)
    if kwargs.get("objective") == "scst":  # the reward's document frequencies (cached on disk)
        kwargs["cider_document_frequencies"] = datamodule.cider_document_frequencies()
    return target(**kwargs, vocab_size=len(word_map), **word_map.special_ids, word_map=word_map,
                  data=data_info(datamodule, word_map), run_config=_plain(cfg))


def load_weights(model: CaptioningModule, path: str | os.PathLike) -> None:
    """``init_from``: copy a checkpoint's weights into ``model``; optimiser and loop start fresh."""
    checkpoint = load_checkpoint(path)
    if "word_map" in checkpoint and WordMap.from_dict(checkpoint["word_map"]) != model.word_map:
        raise ValueError(f"init_from={path}: its word map differs from this run's data; "
                         "initialise only from a model trained on the same word map")
    model.load_state_dict(checkpoint["state_dict"])
    log.info("Initialised weights from %s", path)


# ---------------------------------------------------------------------- prepare
def prepare(cfg: DictConfig) -> None:
    """Prepare ``cfg.data`` (generate shapes, preprocess to HDF5) exactly as training would."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    print(f"{datamodule.data_name}: prepared files in {datamodule.data_folder}, "
          f"word map {datamodule.word_map_path} ({len(datamodule.word_map)} entries)")


# ---------------------------------------------------------------------- batch sizes
def batch_summary(trainer: L.Trainer, datamodule) -> dict[str, int]:
    """Per-device and effective (per optimiser step) batch sizes, in images and captions.

    ``data.batch_size`` is per device (per DDP process); each training image brings
    ``captions_per_sample`` captions (all ``captions_per_image`` when null). Learning rates are
    used as configured, never scaled with the effective batch.
    """
    images = int(datamodule.batch_size)
    captions = int(getattr(datamodule, "captions_per_sample", None) or datamodule.captions_per_image)
    factor = int(trainer.num_devices) * int(trainer.num_nodes) * int(trainer.accumulate_grad_batches)
    return {"images_per_device": images, "captions_per_image": captions,
            "captions_per_device": images * captions, "devices": int(trainer.num_devices),
            "num_nodes": int(trainer.num_nodes), "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "effective_images": images * factor, "effective_captions": images * captions * factor}


@rank_zero_only
def log_batch_summary(batch: dict[str, int], model: CaptioningModule) -> None:
    """One line in the run's log: per-device and effective batch, and the (unscaled) learning rates."""
    lrs = ", ".join(f"{k}={model.hparams[k]:g}" for k in ("decoder_lr", "encoder_lr") if k in model.hparams)
    log.info(
        f"Batch: {batch['images_per_device']} images/device x {batch['captions_per_image']} captions/image "
        f"= {batch['captions_per_device']} captions/device; {batch['devices']} devices x {batch['num_nodes']} "
        f"nodes x {batch['accumulate_grad_batches']} accumulate_grad_batches -> effective "
        f"{batch['effective_images']} images, {batch['effective_captions']} captions per optimiser step. "
        f"Learning rates are not scaled with the batch ({lrs}).")


def configure_allocator(setting: str | bool, trainer: L.Trainer) -> bool:
    """Apply ``keep_freed_memory`` (``auto`` | true | false); True if it is now in effect.

    ``auto`` turns it on when the Trainer's device is the CPU (see :mod:`captioner.allocator`).
    Called before fitting, so the DataLoader workers forked later inherit it.
    """
    if setting == "auto":
        setting = trainer.strategy.root_device.type == "cpu"
    if not isinstance(setting, bool):
        raise ValueError(f"keep_freed_memory must be auto, true or false, got {setting!r}")
    if setting and keep_freed_memory():
        log.info("glibc malloc keeps freed memory between steps (keep_freed_memory)")
        return True
    return False


# ---------------------------------------------------------------------- train
def resume_from(cfg: DictConfig, run_dir: Path, checkpoint_dirs: list[Path]) -> str | None:
    """The checkpoint ``trainer.fit`` resumes: ``ckpt_path``, else what ``auto_resume`` finds.

    Raises:
        FileExistsError: a fresh run in a folder holding another run's checkpoints.
        CheckpointError: ``ckpt_path`` is unreadable or holds no training state, or every
            checkpoint ``auto_resume`` found is.
        ValueError: ``auto_resume`` found a checkpoint of a run with other settings.
    """
    ckpt_path = cfg.get("ckpt_path")
    rank_zero = rank_zero_only.rank == 0
    if ckpt_path is not None and not _lightning_ckpt_name(ckpt_path):
        load_checkpoint(ckpt_path, mmap=True, required=RESUME_KEYS)  # refused in one line naming the file
    if ckpt_path is None and cfg.get("auto_resume"):
        found = auto_resume_checkpoint(cfg.auto_resume, run_dir, checkpoint_dirs,
                                       cfg.paths.output_root, cfg.task_name)
        if found is not None:
            check_same_run(found, cfg, f"auto_resume={cfg.auto_resume} found")
        ckpt_path = str(found) if found else None
        if rank_zero:
            log.info("auto_resume=%s: %s", cfg.auto_resume,
                     f"resuming from {ckpt_path}" if ckpt_path else "no checkpoint found, starting fresh")
            if ckpt_path and cfg.get("init_from"):  # a requeued stage-2 job continues itself
                log.info("init_from=%s is superseded by the resumed checkpoint", cfg.init_from)
    if ckpt_path is None:
        refuse_used_folder(run_dir, checkpoint_dirs, cfg)
    own_dirs = {d.resolve() for d in checkpoint_dirs}
    if (ckpt_path and rank_zero and own_dirs
            and Path(ckpt_path).resolve().parent not in own_dirs | {run_dir.resolve()}):
        log.warning("Resuming %s in another run folder (%s): ModelCheckpoint starts its best-score tracking "
                    "afresh here. To keep the best checkpoint and score, resume in the same folder: "
                    "hydra.run.dir=<that run folder>", ckpt_path, run_dir)
    return ckpt_path


def _lightning_ckpt_name(ckpt_path: str | os.PathLike) -> bool:
    """A ``ckpt_path`` Lightning resolves itself: ``last``/``best``/``hpc``, a registry name, a URL."""
    text = str(ckpt_path)
    return text in ("last", "best", "hpc") or text.startswith("registry") or "://" in text


def train(cfg: DictConfig) -> dict[str, float]:
    """Prepare data, fit, and (``test_after_fit``) test the best checkpoint. Returns the metrics."""
    if cfg.get("init_from_required") and not cfg.get("init_from"):
        raise ValueError("this experiment fine-tunes stage 1's model: pass "
                         "init_from=outputs/train/<stage 1 run>/checkpoints/best.ckpt")
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ValueError(f"ckpt_path={cfg.ckpt_path} resumes a run (weights, optimiser, scheduler, loop) and "
                         f"init_from={cfg.init_from} starts a new one from weights only: pass one of them")
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir(cfg)
    callbacks = build_callbacks(cfg)
    # Which checkpoint this run resumes, checked before the data is prepared (it may be refused).
    checkpoint_dirs = [Path(cb.dirpath) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if rank_zero_only.rank == 0:  # before the other ranks start; hpc_ckpt_* go to the run folder
        remove_partial_files([*checkpoint_dirs, run_dir])
    ckpt_path = resume_from(cfg, run_dir, checkpoint_dirs)
    self_critical = cfg.model.get("objective", "xe") == "scst"
    if self_critical and not cfg.get("init_from") and not ckpt_path:
        raise ValueError("model.objective=scst fine-tunes a trained captioner and cannot start from random "
                         "weights: pass init_from=<best.ckpt of a cross-entropy run>, e.g. "
                         "init_from=outputs/train/latest/checkpoints/best.ckpt (or ckpt_path=... to "
                         "resume an SCST run)")

    # SCST rewards each sample against its image's references: the train batches carry them.
    datamodule = instantiate(cfg.data, _convert_="all", **({"train_references": True} if self_critical else {}))
    if rank_zero_only.rank != 0 and datamodule.overwrite is True:
        # data.overwrite: global rank 0 rebuilds; the others use matching files and rebuild
        # only files made with other settings (whichever rank takes the lock first).
        datamodule.overwrite = "stale"
    # Idempotent and lock-protected, so every rank may call it; the word map is needed to
    # build the model before the Trainer exists.
    datamodule.prepare_data()
    word_map = datamodule.word_map
    model = build_model(cfg, word_map, datamodule)
    if cfg.get("init_from"):
        load_weights(model, cfg.init_from)
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor in ("val/bleu4", "val/cider") and monitor != model.monitor and rank_zero_only.rank == 0:
            log.warning("%s monitors %s, but model.objective=%s selects on %s (the LR schedule's); "
                        "set callbacks.*.monitor=%s", type(callback).__name__, monitor,
                        model.objective, model.monitor, model.monitor)

    loggers = build_loggers(cfg)
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    callbacks.insert(0, ExactResume(cfg.seed))  # first: its resume-time LR step precedes the LR monitor
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=build_plugins(cfg))
    configure_allocator(cfg.get("keep_freed_memory", "auto"), trainer)
    batch = batch_summary(trainer, datamodule)
    log_batch_summary(batch, model)

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint_cb = trainer.checkpoint_callback
    best = checkpoint_cb.best_model_path if checkpoint_cb is not None else ""
    if checkpoint_cb is not None and checkpoint_cb.best_model_score is not None:
        metrics[f"val/best_{checkpoint_cb.monitor.split('/')[-1]}"] = float(checkpoint_cb.best_model_score)
    metrics["fit_seconds"] = time.perf_counter() - started
    if checkpoint_cb is not None and (best or checkpoint_cb.last_model_path) and not trainer.fast_dev_run:
        # Only runs that wrote a checkpoint become the one evaluate.py and caption use by default.
        point_latest(run_dir, Path(cfg.paths.output_root) / cfg.task_name)

    if cfg.get("test_after_fit") and not trainer.fast_dev_run:
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("test/") and v.numel() == 1})
        report_test(model, cfg.get("num_print_examples", 5))
    elif cfg.get("test_after_fit") and trainer.fast_dev_run:
        trainer.test(model, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("test/") and v.numel() == 1})
    write_metrics(run_dir / "metrics.json", metrics, best_checkpoint=best, batch=batch)
    return metrics


@rank_zero_only
def write_metrics(path: Path, metrics: dict[str, float], **extra: Any) -> None:
    write_json_atomic(path, {"metrics": metrics, **extra})


@rank_zero_only
def report_test(model: CaptioningModule, num_examples: int) -> None:
    results = model.test_results
    if not results:
        return
    search = results["search"]
    print(f"\nTest split, beam {search['beam_size']}: {len(results['image_ids'])} images")
    print("  " + "  ".join(f"{k.upper()} {v:.4f}" for k, v in results["scores"].items()))
    for image_id, hyp, refs in list(zip(results["image_ids"], results["hypotheses"],
                                        results["references"]))[:num_examples]:
        print(f"  [{image_id}] {' '.join(hyp)}\n        ref: {' '.join(refs[0])}")


# ---------------------------------------------------------------------- evaluate
EVAL_SPLITS = ("test", "val")


def resolve_checkpoint(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    run = latest_run(cfg.paths.output_root, "train")
    best = run / "checkpoints" / "best.ckpt"
    if best.is_file():
        return best
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.warning("%s has no best.ckpt; using last.ckpt", run)
        return last
    raise FileNotFoundError(f"the latest run {run} has no checkpoints/best.ckpt or last.ckpt; "
                            "pass ckpt_path=... explicitly")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score a checkpoint on a split with beam search: nltk BLEU and the COCO scorers."""
    from captioner.metrics import coco_scores

    split = str(cfg.split).lower()  # the tutorial's file names spell it TEST / VAL
    if split not in EVAL_SPLITS:
        raise ValueError(f"split={cfg.split!r}: evaluate.py scores the test or val split "
                         f"(split=test | split=val)")
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_checkpoint(cfg)
    print(f"Evaluating {ckpt_path} on the {split} split with beam size {cfg.beam}")
    # Its config only (mapped, not read): the weights are loaded once, by load_from_checkpoint.
    checkpoint = load_checkpoint(ckpt_path, mmap=True, required=MODEL_KEYS)
    trained_cfg = checkpoint.get("config") or {}
    if "data" not in trained_cfg:
        raise ValueError(f"{ckpt_path} stores no data config, so it was not written by train.py; "
                         "convert a tutorial checkpoint with python -m captioner.convert_tutorial "
                         "(it records the data settings)")
    overrides = {k: v for k, v in (_plain(cfg.get("data")) or {}).items() if v is not None}
    # The training run's data.overwrite rebuilt its data once; scoring never rebuilds unless asked.
    fixed: dict[str, Any] = {"overwrite": False}
    if trained_cfg.get("task_name") == "convert_tutorial":
        # The tutorial's folder is used as it is (converters before a6f9d23 stored raw paths).
        fixed.update(karpathy_json=None, image_folder=None)
    data_cfg = OmegaConf.merge(OmegaConf.create(trained_cfg["data"]), fixed, overrides)
    datamodule = instantiate(data_cfg, eval_batch_size=cfg.batch_size, _convert_="all")
    datamodule.prepare_data()
    search = {"beam_size": cfg.beam, "max_len": cfg.max_len, "length_penalty": cfg.length_penalty}
    # The scores come from the search alone: no teacher-forced test/loss pass (test_loss).
    model = CaptioningModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True,
                                                  word_map=datamodule.word_map, test_search=search,
                                                  test_loss=False)
    bars = [ImageRateProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=bars, _convert_="all")
    configure_allocator(cfg.get("keep_freed_memory", "auto"), trainer)
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    started = time.perf_counter()
    trainer.test(model, dataloaders=loader)
    seconds = time.perf_counter() - started
    results = model.test_results
    assert results is not None

    metrics: dict[str, Any] = {f"bleu{n}_nltk": results["scores"][f"bleu{n}"] for n in range(1, 5)}
    captions = [{"image_id": int(i), "caption": " ".join(h)}
                for i, h in zip(results["image_ids"], results["hypotheses"])]
    if cfg.coco_metrics and trainer.is_global_zero:
        raw = datamodule.raw_references(split)
        coco = coco_scores({i: raw[i] for i in results["image_ids"]},
                           {c["image_id"]: c["caption"] for c in captions}, spice=cfg.spice)
        metrics.update({f"coco_{k}": v for k, v in coco.items()})
    out = output_dir(cfg)
    summary = {"metrics": metrics, "checkpoint": str(ckpt_path), "split": split, "search": search,
               "num_images": len(captions), "seconds": seconds, "images_per_second": len(captions) / seconds,
               "config": _plain(cfg)}
    if trainer.is_global_zero:
        write_json_atomic(out / "results.json", summary)
        write_json_atomic(out / f"captions_{split}_beam{cfg.beam}.json", captions)
        print_table(metrics, split, cfg.beam, len(captions), seconds)
        print(f"Wrote {out / 'results.json'} and {out / f'captions_{split}_beam{cfg.beam}.json'}")
    return summary


def print_table(metrics: dict[str, Any], split: str, beam: int, num_images: int, seconds: float) -> None:
    print(f"\n{split} split, beam {beam}, {num_images} images, {num_images / seconds:.1f} images/s")
    width = max(len(k) for k in metrics)
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {name:<{width}}  {shown}")
