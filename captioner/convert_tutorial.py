"""Import a checkpoint of sgrvinod's tutorial (``BEST_checkpoint_*.pth.tar``) as a captioner ``.ckpt``.

The tutorial pickles WHOLE modules: ``{epoch, epochs_since_improvement, bleu-4, encoder:
models.Encoder, decoder: models.DecoderWithAttention, encoder_optimizer: Adam | None,
decoder_optimizer: Adam}``. Unpickling normally imports and runs whatever the file names, so
this module loads it through :class:`TutorialUnpickler`, which resolves only an allow-list of
globals (torch.nn layers, torchvision ResNet blocks, Adam, ``OrderedDict``, torch's tensor
rebuild functions) and maps the tutorial's ``models.Encoder``, ``models.Attention`` and
``models.DecoderWithAttention`` to the inert stand-ins below. Anything else is refused with
:class:`UnsafeCheckpointError` naming the global, before it is called.

The result is a plain dict that ``torch.load(weights_only=True)`` and
``CaptioningModule.load_from_checkpoint`` accept: state dict (``captioner.`` prefixes; the
tutorial's parameter names are ours), hyperparameters (ResNet depth detected from the state
dict, the decoder sizes from its attributes), the word map, and a run ``config`` whose ``data``
section describes the tutorial's prepared COCO files, so ``evaluate.py`` and
``python -m captioner.caption`` work on it. Optimiser states are dropped (use ``init_from`` to
continue training from the weights).

    python -m captioner.convert_tutorial BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \\
        WORDMAP_coco_5_cap_per_img_5_min_word_freq.json tutorial.ckpt --data-folder /path/to/prepared
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shlex
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captioner.data.datamodule import DATASETS
from captioner.checkpoints import save_checkpoint
from captioner.vocab import WordMap

# ----------------------------------------------------------------------------- stand-ins


class TutorialEncoder(nn.Module):
    """Inert stand-in for the tutorial's ``models.Encoder``: only its pickled state is read
    (``resnet`` Sequential, ``adaptive_pool``, ``enc_image_size``)."""


class TutorialAttention(nn.Module):
    """Inert stand-in for the tutorial's ``models.Attention`` (``encoder_att``, ``decoder_att``,
    ``full_att``)."""


class TutorialDecoder(nn.Module):
    """Inert stand-in for the tutorial's ``models.DecoderWithAttention``: only its pickled
    state is read (sizes as attributes, ``dropout`` module, the layers)."""


STAND_INS: dict[tuple[str, str], type] = {
    ("models", "Encoder"): TutorialEncoder,
    ("models", "Attention"): TutorialAttention,
    ("models", "DecoderWithAttention"): TutorialDecoder,
}

_NN_LAYERS = {
    "torch.nn.modules.activation": ("ReLU", "Sigmoid", "Softmax", "Tanh"),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.container": ("Sequential", "ModuleList"),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.linear": ("Linear", "Identity"),
    "torch.nn.modules.pooling": ("AdaptiveAvgPool2d", "MaxPool2d", "AvgPool2d"),
    "torch.nn.modules.rnn": ("LSTMCell",),
    "torch.nn.modules.sparse": ("Embedding",),
}
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(module, name) for module, names in _NN_LAYERS.items() for name in names]
    + [("torchvision.models.resnet", name) for name in ("ResNet", "Bottleneck", "BasicBlock")]
    + [("torch.optim.adam", "Adam"),
       ("collections", "OrderedDict"), ("collections", "defaultdict"),
       # Python 3 pickles with protocol 2 spell builtins "__builtin__".
       ("builtins", "dict"), ("builtins", "set"), ("__builtin__", "dict"), ("__builtin__", "set"),
       ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
       ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
       ("torch.nn.parameter", "Parameter"),
       # Forks of the tutorial that wrapped the models in nn.DataParallel before saving them.
       ("torch.nn.parallel.data_parallel", "DataParallel"), ("torch", "device"),
       # nn.Module._backend of PyTorch 0.4 pickles (the tutorial's released checkpoint).
       ("torch.nn.backends.thnn", "_get_thnn_function_backend")])


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it names was called."""


class TutorialUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and the tutorial's classes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in STAND_INS:
            return STAND_INS[(module, name)]
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load the global {module}.{name}: a tutorial checkpoint holds only "
            f"torch.nn layers, torchvision ResNet blocks, Adam and the tutorial's models.Encoder/"
            f"Attention/DecoderWithAttention. The file may be malicious or not a tutorial "
            f"checkpoint; do not load it with plain torch.load")


def _restricted_pickle_module() -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` whose loads are restricted."""
    module = types.ModuleType("captioner_tutorial_pickle")
    module.Unpickler = TutorialUnpickler

    def load(file, **kwargs):
        return TutorialUnpickler(file, **kwargs).load()

    def loads(data, **kwargs):
        import io

        return TutorialUnpickler(io.BytesIO(data), **kwargs).load()

    module.load = load
    module.loads = loads
    module.UnpicklingError = pickle.UnpicklingError
    return module


def load_tutorial_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a tutorial checkpoint safely (see :class:`TutorialUnpickler`).

    Args:
        path: the tutorial's ``BEST_checkpoint_*.pth.tar`` or ``checkpoint_*.pth.tar``.

    Returns:
        The checkpoint dict, with ``encoder`` a :class:`TutorialEncoder` and ``decoder`` a
        :class:`TutorialDecoder` (inert modules holding the tutorial's weights).

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the pickle names a global outside the allow-list.
        ValueError: the file is not a tutorial checkpoint (wrong keys or types).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tutorial checkpoint {path} does not exist")
    with warnings.catch_warnings():
        # Legacy (PyTorch 0.4) files store the source of models.*; ours are stand-ins, so the
        # "source code has changed" warning is expected and meaningless here.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                                    pickle_module=_restricted_pickle_module())
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, TypeError) as e:
            raise ValueError(f"{path} is not a readable tutorial checkpoint "
                             f"({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not the tutorial's checkpoint dict")
    for key in ("encoder", "decoder"):
        if isinstance(checkpoint.get(key), torch.nn.DataParallel):
            checkpoint[key] = checkpoint[key].module
    for key, cls in (("encoder", TutorialEncoder), ("decoder", TutorialDecoder)):
        if not isinstance(checkpoint.get(key), cls):
            found = type(checkpoint.get(key)).__name__ if key in checkpoint else "nothing"
            raise ValueError(f"{path}: checkpoint[{key!r}] is {found}; a tutorial checkpoint holds "
                             f"the pickled models.{'Encoder' if key == 'encoder' else 'DecoderWithAttention'}"
                             f" there (keys found: {_some(sorted(map(str, checkpoint)))})")
    return checkpoint


def _some(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` names, and how many more (a state dict has hundreds of keys)."""
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------- detection
# (block type, blocks per layer1..layer4) -> torchvision arch
RESNETS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
_BLOCK_KEY = re.compile(r"^(\d+)\.(\d+)\.")


def detect_resnet_arch(resnet_state: dict[str, Tensor]) -> str:
    """The torchvision ResNet whose trunk (children without avgpool/fc) has this state dict.

    Args:
        resnet_state: state dict of the tutorial's ``encoder.resnet`` Sequential (keys
            ``0.weight`` = conv1 ... ``7.{block}.conv1.weight`` = layer4).

    Returns:
        ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101`` | ``resnet152``.

    Raises:
        ValueError: not a full torchvision ResNet trunk of a known depth.
    """
    counts = []
    for child in range(4, 8):  # layer1..layer4 are children 4..7 of the trunk
        blocks = {int(m.group(2)) for k in resnet_state if (m := _BLOCK_KEY.match(k)) and int(m.group(1)) == child}
        counts.append(len(blocks))
    block = "bottleneck" if "4.0.conv3.weight" in resnet_state else "basic"
    arch = RESNETS.get((block, tuple(counts)))
    if arch is None:
        raise ValueError(f"the encoder's ResNet has {block} blocks {counts} in layer1..layer4, which "
                         f"is none of {sorted(set(RESNETS.values()))}; only the tutorial's torchvision "
                         f"ResNet trunks (children without avgpool/fc) can be converted")
    return arch


def _pool_size(encoder: nn.Module) -> int:
    pool = getattr(encoder, "adaptive_pool", None)
    size = getattr(pool, "output_size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int):
        return int(size[0])
    raise ValueError(f"the tutorial encoder's adaptive_pool has output_size {size!r}; expected a "
                     f"square (n, n) grid")


def _decoder_sizes(decoder: nn.Module) -> dict[str, Any]:
    """Sizes and dropout from the tutorial decoder's attributes, checked against its weights."""
    sizes = {}
    for name in ("vocab_size", "embed_dim", "decoder_dim", "attention_dim", "encoder_dim"):
        value = getattr(decoder, name, None)
        if not isinstance(value, int):
            raise ValueError(f"the tutorial decoder has no integer attribute {name!r} (found {value!r})")
        sizes[name] = value
    dropout = getattr(decoder, "dropout", None)
    sizes["dropout"] = float(dropout.p if isinstance(dropout, nn.Dropout) else dropout)
    weights = {"fc.weight": (sizes["vocab_size"], sizes["decoder_dim"]),
               "embedding.weight": (sizes["vocab_size"], sizes["embed_dim"]),
               "attention.encoder_att.weight": (sizes["attention_dim"], sizes["encoder_dim"])}
    state = decoder.state_dict()
    for key, shape in weights.items():
        if key not in state or tuple(state[key].shape) != shape:
            found = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(f"the tutorial decoder's {key} is {found}, but its attributes say {shape}")
    return sizes


# ----------------------------------------------------------------------------- conversion
def tutorial_data_config(data_folder: str, dataset: str = "coco", captions_per_image: int = 5,
                         min_word_freq: int = 5, image_size: int = 256, max_len: int = 50,
                         karpathy_json: str | None = None, image_folder: str | None = None) -> dict[str, Any]:
    """The ``data`` section for the tutorial's prepared files.

    ``min_word_freq`` is the number in the tutorial's file names (``..._5_min_word_freq``): the
    data module then finds ``WORDMAP_coco_5_cap_per_img_5_min_word_freq.json`` and the HDF5/JSON
    files there. (The tutorial kept words seen MORE than 5 times; we never rebuild its word map:
    the checkpoint stores it, and preprocessing refuses to overwrite files it did not write.)
    """
    return {"_target_": "captioner.data.datamodule.CaptionDataModule",
            "dataset": dataset,
            "data_folder": str(data_folder),
            # No raw inputs unless given: the tutorial's folder is used as it is, never rebuilt,
            # even where data/coco holds the raw COCO inputs.
            "karpathy_json": karpathy_json,
            "image_folder": image_folder,
            "captions_per_image": captions_per_image,
            "min_word_freq": min_word_freq,
            "max_len": max_len,
            "image_size": image_size}


def convert_tutorial_checkpoint(tutorial: dict[str, Any], word_map: WordMap,
                                data: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Turn an unpickled tutorial checkpoint into our checkpoint dict.

    Args:
        tutorial: from :func:`load_tutorial_checkpoint`.
        word_map: the tutorial's ``WORDMAP_*.json``; its size must equal the decoder's vocab.
        data: the run config's ``data`` section (see :func:`tutorial_data_config`).
        source: where the tutorial checkpoint came from (recorded in the result).

    Returns:
        A dict of plain types and tensors (``torch.load(weights_only=True)`` loads it) with
        ``state_dict``, ``hyper_parameters``, ``word_map``, ``data_fingerprint``, ``config``,
        ``pytorch-lightning_version``, ``epoch``, ``global_step`` and ``tutorial`` (epoch, BLEU-4).

    Raises:
        ValueError: word map / vocabulary mismatch, or weights that do not fit the detected
            architecture.
    """
    import lightning

    from captioner.lit_module import CaptioningModule

    encoder, decoder = tutorial["encoder"], tutorial["decoder"]
    sizes = _decoder_sizes(decoder)
    if len(word_map) != sizes["vocab_size"]:
        raise ValueError(f"the word map has {len(word_map)} entries but the tutorial decoder's vocab_size "
                         f"is {sizes['vocab_size']}: pass the WORDMAP_*.json the checkpoint was trained with")
    resnet_state = encoder.resnet.state_dict()
    arch = detect_resnet_arch(resnet_state)
    encoder_state = encoder.state_dict()
    for key in list(encoder_state):
        # PyTorch 0.4.0 BatchNorm had no num_batches_tracked buffer (only used with momentum=None).
        if key.endswith(".running_mean") and key.replace("running_mean", "num_batches_tracked") not in encoder_state:
            encoder_state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    state_dict = {f"captioner.encoder.{k}": v for k, v in encoder_state.items()}
    state_dict.update({f"captioner.decoder.{k}": v for k, v in decoder.state_dict().items()})

    name = f"{data['dataset']}_{data['captions_per_image']}_cap_per_img_{data['min_word_freq']}_min_word_freq"
    config = {"data": dict(data), "task_name": "convert_tutorial",
              "converted_from": {"checkpoint": source, "epoch": _plain_number(tutorial.get("epoch")),
                                 "bleu4": _plain_number(tutorial.get("bleu-4"))}}
    model = CaptioningModule(
        vocab_size=sizes["vocab_size"], **word_map.special_ids,
        encoder={"arch": arch, "encoded_image_size": _pool_size(encoder), "pretrained": False,
                 "weights_path": None, "fine_tune_from": 2, "last_stage": 4},
        decoder={k: sizes[k] for k in ("embed_dim", "decoder_dim", "attention_dim", "dropout")},
        fine_tune_encoder=tutorial.get("encoder_optimizer") is not None,
        data={"name": name, "fingerprint": None, "word_map_fingerprint": word_map.fingerprint()},
        word_map=word_map, run_config=config)
    if sizes["encoder_dim"] != model.captioner.encoder.encoder_dim:
        raise ValueError(f"the tutorial decoder expects encoder_dim={sizes['encoder_dim']} but its "
                         f"{arch} encoder gives {model.captioner.encoder.encoder_dim} channels")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the tutorial weights do not fit a {arch} captioner: {e}") from e

    checkpoint: dict[str, Any] = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(_plain_number(tutorial.get("epoch")) or 0),
        "global_step": 0,
        "tutorial": {"checkpoint": source,
                     "epoch": _plain_number(tutorial.get("epoch")),
                     "epochs_since_improvement": _plain_number(tutorial.get("epochs_since_improvement")),
                     "bleu4": _plain_number(tutorial.get("bleu-4"))},
    }
    model.on_save_checkpoint(checkpoint)  # word map, config, data fingerprint, download-free hparams
    return checkpoint


def _plain_number(value: Any) -> int | float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def convert(tutorial_checkpoint: str | os.PathLike, word_map_path: str | os.PathLike,
            output: str | os.PathLike, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load, convert, check and write; returns the written checkpoint dict.

    The written file is reloaded with ``torch.load(weights_only=True)`` as a final check.
    """
    word_map = WordMap.load(word_map_path)
    tutorial = load_tutorial_checkpoint(tutorial_checkpoint)
    checkpoint = convert_tutorial_checkpoint(tutorial, word_map, data or tutorial_data_config("data/coco/prepared"),
                                             source=str(tutorial_checkpoint))
    save_checkpoint(checkpoint, output)  # atomic: a temp file beside it, on disk, renamed over it
    torch.load(output, map_location="cpu", weights_only=True)
    return checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captioner.convert_tutorial",
        description="Convert sgrvinod's tutorial checkpoint (pickled modules) into a captioner .ckpt, "
                    "loading it with a restricted unpickler.")
    parser.add_argument("checkpoint", help="the tutorial's BEST_checkpoint_*.pth.tar")
    parser.add_argument("word_map", help="the tutorial's WORDMAP_*.json used to train it")
    parser.add_argument("output", help="where to write the .ckpt")
    parser.add_argument("--data-folder", default="data/coco/prepared",
                        help="folder with the tutorial's prepared HDF5/JSON files (stored as data.data_folder; "
                             "evaluate.py also takes ++data.data_folder=... later)")
    parser.add_argument("--dataset", default="coco", choices=DATASETS,
                        help="dataset name in the prepared files' names (default coco)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--min-word-freq", type=int, default=5,
                        help="the number in the tutorial's file names (default 5)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the HDF5 images (the tutorial's 256)")
    parser.add_argument("--max-len", type=int, default=50)
    args = parser.parse_args(argv)
    data = tutorial_data_config(args.data_folder, args.dataset, args.captions_per_image, args.min_word_freq,
                                args.image_size, args.max_len)
    try:
        checkpoint = convert(args.checkpoint, args.word_map, args.output, data)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    hp = checkpoint["hyper_parameters"]
    print(f"Wrote {args.output}: {hp['encoder']['arch']} encoder ({hp['encoder']['encoded_image_size']}^2 regions), "
          f"decoder {hp['decoder']}, vocabulary {hp['vocab_size']}, tutorial epoch "
          f"{checkpoint['tutorial']['epoch']}, BLEU-4 {checkpoint['tutorial']['bleu4']}")
    out, folder = shlex.quote(f"ckpt_path={args.output}"), shlex.quote(f"++data.data_folder={args.data_folder}")
    print(f"Evaluate: python evaluate.py {out} {folder}\n"
          f"Caption:  python -m captioner.caption {out} image=path/to/images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
