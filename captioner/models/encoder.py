"""ImageEncoder: a torchvision ResNet trunk that turns images into a grid of region features.

Legend: B batch, S image side, P regions (enc_size^2), D encoder channels.

Parameter names follow the sgrvinod tutorial's ``Encoder`` (``resnet`` is an ``nn.Sequential``
of the torchvision children without avgpool/fc, ``adaptive_pool`` has no parameters), so the
tutorial's encoder state dicts load here with ``strict=True``.
"""

from __future__ import annotations

import copy
import logging
import os
from functools import partial
from operator import attrgetter
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Output channels of layer1 for each arch; layerN has base * 2**(N-1).
_LAYER1_CHANNELS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256,
                    "resnet152": 256}
# torchvision child names per stage: stage 0 is the stem, stage N is layerN.
_STAGE_CHILDREN = {0: ("conv1", "bn1", "relu", "maxpool"), 1: ("layer1",), 2: ("layer2",),
                   3: ("layer3",), 4: ("layer4",)}
_MAX_CUDA_GRAPHS = 4  # captured input signatures kept per encoder (train, val and test batches)
_MAX_FOLDED = 2  # folded copies kept per encoder (float32, and the autocast dtype)
_requires_grad = attrgetter("requires_grad")
_version = attrgetter("_version")  # bumped by every in-place change of a tensor


def _weights_enum(arch: str):
    """The tutorial's ImageNet weights for ``arch`` (``ResNet101_Weights.IMAGENET1K_V1``...)."""
    name = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50",
            "resnet101": "ResNet101", "resnet152": "ResNet152"}[arch]
    return getattr(torchvision.models, f"{name}_Weights").IMAGENET1K_V1


def _download_state_dict(arch: str) -> dict[str, Tensor]:
    """Fetch torchvision's ImageNet state dict via the hub cache, or explain how to provide it."""
    weights = _weights_enum(arch)
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # no network, proxy refusal, truncated download, bad hash ...
        raise RuntimeError(
            f"ImageEncoder({arch!r}, pretrained=True) could not get the ImageNet weights "
            f"({type(e).__name__}: {e}). Either download {url} on a machine with network access "
            f"and copy it to {cached} (the torch hub cache, torch.hub.get_dir()/checkpoints/), "
            f"or point the encoder at a local torchvision {arch} state dict with "
            f"model.encoder.weights_path=/path/to/{os.path.basename(url)} "
            f"(or model.encoder.pretrained=false for random weights)."
        ) from e


def _read_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a torchvision-resnet state dict file: raw, or under "state_dict"/"model"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights_path {path} does not exist; set "
                                f"model.encoder.weights_path to a torchvision resnet .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"encoder weights_path {path} is not a loadable torch state dict "
                         f"file ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"encoder weights_path {path} holds no state dict: expected "
                         f"{{name: tensor}} or a dict with a 'state_dict'/'model' entry")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _autocast_state(device_type: str = "cuda") -> tuple[bool, torch.dtype]:
    """Autocast's current (enabled, dtype) for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cuda":
            return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


def _fold_batchnorm(trunk: nn.Sequential) -> nn.Sequential:
    """A copy of frozen trunk modules with every BatchNorm folded into the convolution before
    it (``conv`` then ``bn`` in eval mode is one convolution with scaled weights and a bias),
    the BatchNorm replaced by ``nn.Identity``. The same function up to float rounding, with
    one kernel fewer per convolution. Pairs: consecutive children of a ``Sequential`` (the
    stem's ``conv1``/``bn1``, ``downsample``) and a block's ``convK``/``bnK``."""
    folded = copy.deepcopy(trunk)
    for module in list(folded.modules()):
        children = dict(module.named_children())
        names = list(children)
        if isinstance(module, nn.Sequential):
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(f"conv{k}", f"bn{k}") for k in range(1, 4)
                     if f"conv{k}" in children and f"bn{k}" in children]
        for conv_name, bn_name in pairs:
            conv, bn = children[conv_name], children[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
                children[bn_name] = None  # a folded BatchNorm is nobody's partner again
    return folded


class _CapturedForward:
    """One CUDA graph of ``fn`` for inputs like ``example``: replaying it launches every kernel
    of the forward pass with one call, instead of one Python-driven launch per kernel.

    ``fn`` must not depend on anything that changes between calls except its input, which is
    copied into the graph's own input buffer; the output is cloned out of the graph's buffer,
    so the next replay cannot overwrite a tensor the caller still holds (e.g. saved for
    backward). The parameters are read from their memory at every replay, so in-place updates
    (``load_state_dict``) are seen; a move (``.to()``) needs a new capture.
    """

    def __init__(self, fn, example: Tensor):
        device = example.device
        self.input = example.clone()
        with torch.cuda.device(device):  # the capture runs on the current device
            # Warm-up outside the capture, on a side stream as PyTorch requires: cuDNN chooses
            # its algorithms (benchmark mode) and lazy initialisation happens here.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(self.input)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may use CUDA during the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = fn(self.input)

    def __call__(self, images: Tensor) -> Tensor:
        self.input.copy_(images)
        self.graph.replay()
        return self.output.clone()


class ImageEncoder(nn.Module):
    """A ResNet trunk (up to ``layer{last_stage}``) plus adaptive pooling to a fixed grid.

    Args:
        arch: one of resnet18/34/50/101/152.
        encoded_image_size: side of the output grid; P = encoded_image_size**2.
        pretrained: load torchvision's ImageNet weights (``IMAGENET1K_V1``, the tutorial's).
        weights_path: a local torchvision-resnet state dict file; used instead of the download
            (for offline clusters). A raw state dict or a dict with "state_dict"/"model".
        fine_tune: False freezes every parameter; True trains stages >= ``fine_tune_from``.
        fine_tune_from: first trainable stage (0 = stem conv1/bn1, 1..4 = layer1..layer4).
            The tutorial's "blocks 2 through 4" is 2.
        last_stage: the trunk stops after ``layer{last_stage}`` (1..4). Small images need a
            shallower trunk: at 64 px resnet18 keeps a 4x4 map up to layer3.
        channels_last: run the trunk in channels-last memory format (faster convs on GPUs).
        cuda_graph: when every parameter is frozen and the images are on a CUDA device,
            capture the forward pass as a CUDA graph per input shape (and autocast and
            inference-mode setting) and replay it: one launch instead of ~450 for ResNet-101,
            whose Python-side cost bounds a frozen-encoder training step on a fast GPU. Same
            kernels, same features. Off by default until measured (docs/performance.md).
        fold_batchnorm: run the frozen stages from a copy with each BatchNorm folded into the
            convolution before it (in the autocast dtype when autocast is on): for a frozen
            ResNet-101, 104 BatchNorm passes over the activations and, under autocast, 104
            weight casts fewer per forward, the same features up to float rounding. The copy
            is not part of the state dict (checkpoints are unchanged) and is rebuilt when the
            frozen weights or statistics change (``load_state_dict``, in-place edits) or move.

    Frozen stages are kept in eval mode by :meth:`train`, so their BatchNorm running
    statistics never change (the tutorial's ``encoder.train()`` updates them silently).
    """

    def __init__(self, arch: str = "resnet101", encoded_image_size: int = 14,
                 pretrained: bool = True, weights_path: str | os.PathLike | None = None,
                 fine_tune: bool = False, fine_tune_from: int = 2, last_stage: int = 4,
                 channels_last: bool = True, cuda_graph: bool = False,
                 fold_batchnorm: bool = True):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"ImageEncoder arch={arch!r} is not supported; use one of {ARCHS}")
        if not 1 <= last_stage <= 4:
            raise ValueError(f"ImageEncoder last_stage={last_stage}; it must be 1..4 (layerN)")
        if encoded_image_size < 1:
            raise ValueError(f"ImageEncoder encoded_image_size={encoded_image_size}; must be >= 1")
        self.arch = arch
        self.encoded_image_size = encoded_image_size
        self.last_stage = last_stage
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.fold_batchnorm = fold_batchnorm
        # Not state: dropped on copy, pickle and move.
        self._graphs: dict[tuple, _CapturedForward] = {}
        self._folded: dict[tuple, tuple[nn.Sequential, int]] = {}  # key -> (copy, version)
        # The frozen trunk children, their parameters and buffers.
        self._frozen: tuple[list[nn.Module], list[Tensor], list[Tensor]] | None = None

        resnet = getattr(torchvision.models, arch)(weights=None)
        kept = [name for stage in range(last_stage + 1) for name in _STAGE_CHILDREN[stage]]
        if weights_path is not None:
            self._load_trunk(resnet, _read_state_dict_file(weights_path), kept, str(weights_path))
        elif pretrained:
            self._load_trunk(resnet, _download_state_dict(arch), kept, f"torchvision {arch}")
        children = dict(resnet.named_children())
        # Same child order as the tutorial's list(resnet.children())[:-2], cut at last_stage.
        self.resnet = nn.Sequential(*(children[name] for name in kept))
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        if channels_last:
            self.resnet.to(memory_format=torch.channels_last)
        self.set_fine_tune(fine_tune, fine_tune_from)

    @staticmethod
    def _load_trunk(resnet: nn.Module, state_dict: dict[str, Tensor], kept: list[str],
                    source: str) -> None:
        """Load the kept trunk keys strictly; keys of dropped stages and fc are ignored.

        BatchNorm's ``num_batches_tracked`` may be absent (files saved before PyTorch 0.4.1, like
        the ImageNet files of the tutorial's time): it only counts training batches, and is
        left at 0 as torchvision's own strict loading does.
        """
        in_kept = {k for k in state_dict if k.split(".", 1)[0] in kept}
        trunk_keys = {k for k in resnet.state_dict() if k.split(".", 1)[0] in kept}
        missing = sorted(k for k in trunk_keys - in_kept if not k.endswith(".num_batches_tracked"))
        # Keys of the kept stages this arch lacks: a deeper arch's file (resnet101's into resnet50).
        unexpected = sorted(in_kept - trunk_keys)
        if missing or unexpected:
            problem = (f"lacks {len(missing)} trunk key(s) this encoder needs, e.g. {missing[:3]}"
                       if missing else
                       f"has {len(unexpected)} trunk key(s) this arch does not, e.g. {unexpected[:3]}")
            raise ValueError(f"{source}: the state dict {problem}; is it a torchvision "
                             f"{type(resnet).__name__} state dict of the same arch "
                             f"(model.encoder.arch)?")
        subset = {k: state_dict[k] for k in trunk_keys & in_kept}
        try:
            resnet.load_state_dict(subset, strict=False)
        except RuntimeError as e:
            raise ValueError(f"{source}: the state dict does not fit this arch ({e})") from e

    # ------------------------------------------------------------------ trainable stages
    def _stage_modules(self, stage: int) -> list[nn.Module]:
        """Modules of ``stage`` in ``self.resnet`` (0 = stem children, N = layerN)."""
        if stage == 0:
            return list(self.resnet[:4])
        return [self.resnet[3 + stage]]

    def set_fine_tune(self, fine_tune: bool, fine_tune_from: int | None = None) -> None:
        """Choose the trainable stages (the tutorial's ``Encoder.fine_tune``).

        Args:
            fine_tune: False freezes everything; True trains stages >= ``fine_tune_from``.
            fine_tune_from: 0..4 (<= last_stage when fine-tuning); None keeps the current value.
        """
        if fine_tune_from is None:
            fine_tune_from = self.fine_tune_from
        if not 0 <= fine_tune_from <= 4:
            raise ValueError(f"ImageEncoder fine_tune_from={fine_tune_from}; it must be in "
                             f"0..4 (0 = stem conv1/bn1, N = layerN)")
        if fine_tune and fine_tune_from > self.last_stage:
            raise ValueError(f"ImageEncoder fine_tune=True with fine_tune_from={fine_tune_from} "
                             f"> last_stage={self.last_stage} would train nothing; lower "
                             f"fine_tune_from or set fine_tune=false")
        self.fine_tune = bool(fine_tune)
        self.fine_tune_from = fine_tune_from
        self._drop_derived()
        for stage in range(self.last_stage + 1):
            trainable = self.fine_tune and stage >= fine_tune_from
            for module in self._stage_modules(stage):
                module.requires_grad_(trainable)
        self.train(self.training)
        if self.cuda_graph and self.fine_tune:
            log.warning("ImageEncoder cuda_graph=True has no effect while the encoder is "
                        "fine-tuned (stages >= %d train): only a fully frozen encoder is "
                        "captured", fine_tune_from)

    def frozen_stages(self) -> list[int]:
        """Stages whose parameters are frozen (and kept in eval mode)."""
        first = self.fine_tune_from if self.fine_tune else self.last_stage + 1
        return list(range(min(first, self.last_stage + 1)))

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Set train/eval mode; frozen stages always stay in eval mode (BN stats fixed)."""
        super().train(mode)
        for stage in self.frozen_stages():
            for module in self._stage_modules(stage):
                module.eval()
        return self

    # ------------------------------------------------------------------ forward
    @property
    def encoder_dim(self) -> int:
        """D: channels of the last kept stage."""
        return _LAYER1_CHANNELS[self.arch] * 2 ** (self.last_stage - 1)

    @property
    def num_regions(self) -> int:
        """P = encoded_image_size ** 2."""
        return self.encoded_image_size ** 2

    def forward(self, images: Tensor) -> Tensor:
        """Encode normalised images.

        Args:
            images: (B, 3, S, S) float, ImageNet-normalised.

        Returns:
            (B, P, D) region features, rows in raster order over the grid.
        """
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError(f"ImageEncoder expects images of shape (B, 3, S, S), "
                             f"got {tuple(images.shape)}")
        if self._graphable(images):
            # The graphs read the folded copy's weights: rebuilding it after an in-place change
            # of the frozen weights drops them (at the cost of the version check, ~47 us).
            self._folded_stages(images)
            enabled, dtype = _autocast_state()
            # Inference mode too: a graph captured under it (Lightning's validation) owns
            # inference tensors, which a training step may not copy into.
            key = (tuple(images.shape), images.dtype, images.device, enabled, dtype,
                   torch.is_inference_mode_enabled())
            captured = self._graphs.get(key)
            if captured is None:
                if len(self._graphs) >= _MAX_CUDA_GRAPHS:
                    self._graphs.pop(next(iter(self._graphs)))  # the oldest signature
                captured = _CapturedForward(partial(self._trunk_under, enabled, dtype), images)
                self._graphs[key] = captured
            return captured(images)
        return self._trunk(images)

    def _trunk(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out, children = images, list(self.resnet)
        folded = self._folded_stages(images)
        if folded is not None:  # the frozen stages, folded; the trainable ones as they are
            out, children = folded(out), children[len(folded):]
        for child in children:
            out = child(out)
        out = self.adaptive_pool(out)  # (B, D, enc, enc)
        return out.permute(0, 2, 3, 1).flatten(1, 2)  # (B, P, D)

    def _folded_stages(self, images: Tensor) -> nn.Sequential | None:
        """The frozen stages with BatchNorm folded (``fold_batchnorm``), for this device and
        autocast dtype: built on first use and again after the frozen weights change (their
        version counters), or None when nothing is folded."""
        if not self.fold_batchnorm:
            return None
        if self._frozen is None:
            stages = self.frozen_stages()
            count = 0 if not stages else 4 + len(stages) - 1  # stem children, then layerN
            children = list(self.resnet)[:count]
            self._frozen = (children, [p for child in children for p in child.parameters()],
                            [b for child in children for b in child.buffers()])
        children, params, buffers = self._frozen
        if not children or any(child.training for child in children) \
                or any(map(_requires_grad, params)):
            return None  # not frozen after all (set by hand): run them as they are
        # Every in-place change bumps a tensor's version (DDP's buffer broadcast before each
        # training forward does not: tests/test_ddp.py checks the copy is not rebuilt per step).
        try:
            version = sum(map(_version, params)) + sum(map(_version, buffers))
        except RuntimeError:  # inference tensors (a model built under inference_mode) have none
            version = -1  # and no in-place change outside inference mode: fold once
        enabled, dtype = _autocast_state(images.device.type)
        key = (images.device, dtype if enabled else None)
        entry = self._folded.get(key)
        if entry is not None and entry[1] == version:
            return entry[0]
        with torch.no_grad(), torch.inference_mode(False):
            folded = _fold_batchnorm(nn.Sequential(*children))
            if enabled:
                folded.to(dtype)  # the convolutions' autocast dtype: no cast per call
            if self.channels_last:
                folded.to(memory_format=torch.channels_last)
        if entry is not None or len(self._folded) >= _MAX_FOLDED:
            # Captured graphs read the weights of the copy they ran: drop them with it.
            self._graphs.clear()
            self._folded.pop(key if entry is not None else next(iter(self._folded)))
        self._folded[key] = (folded, version)
        log.debug("ImageEncoder: BatchNorm folded into the frozen stages' convolutions "
                  "(%d trunk children, %s, autocast dtype %s)", len(children), images.device,
                  key[1])
        return folded

    def _trunk_under(self, enabled: bool, dtype: torch.dtype, images: Tensor) -> Tensor:
        """:meth:`_trunk` under the caller's autocast setting, its cast cache off (a cached
        cast made inside a graph capture would outlive it)."""
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            return self._trunk(images)

    def _graphable(self, images: Tensor) -> bool:
        """Whether this call replays a CUDA graph (``cuda_graph`` and a fully frozen trunk)."""
        return (self.cuda_graph and images.is_cuda and not images.requires_grad
                and not torch.cuda.is_current_stream_capturing()
                and not any(p.requires_grad for p in self.parameters()))

    def _drop_derived(self) -> None:
        """Forget the captured graphs and folded copies (they follow the weights)."""
        self._graphs.clear()
        self._folded.clear()
        self._frozen = None

    def _apply(self, fn, *args, **kwargs):
        self._drop_derived()  # .to()/.cuda()/.half() move the parameters these read
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_derived()  # the weights and statistics they were built from change
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # CUDA graphs and folded copies are neither copied nor pickled.
        state.update(_graphs={}, _folded={}, _frozen=None)
        return state
