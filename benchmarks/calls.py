"""ATen calls per training step, by phase: the host's work that bounds a GPU training step.

``python -m benchmarks.calls [--device cpu|cuda] [--fine-tune] [--cuda-graph] [--bucketed]``

On one GPU a training step of this model is bound by the host (docs/performance.md): its time
follows the number of calls the host dispatches, not the arithmetic. This counts them with a
``TorchDispatchMode`` (every ATen call below autograd, forward and backward) over a few training
steps as the benchmark's training rows run them (bf16 autocast, ``caption_loss``, backward,
clipping by value, Adam), grouped into encoder, decoder + loss, backward and optimiser, with the
calls that launch a kernel counted apart (all but views, aliases, allocations and reads of a
CPU scalar). Not counted: ``detach``,
which autograd calls on every tensor it saves only while a dispatch mode is active.

On CUDA the counts are the real ones. On the CPU the decoder is sent down its CUDA path: its
LSTM cell calls the fused ``_thnn_fused_lstm_cell`` (CUDA-only), which the mode computes itself,
forward and backward, and Adam uses its multi-tensor (``foreach``) kernels, its default on CUDA.
The rest runs under CPU autocast, whose casts differ from CUDA's (CUDA autocast runs softmax in
float32, for one), so CPU counts approximate the CUDA ones. Sizes are
the benchmark's (ResNet-101, dims 512, 10k words, 32 images x 5 captions of COCO-like length) at
64 px images: the counts do not depend on the image size.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from contextlib import ExitStack
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.models import build_ours
from benchmarks.sizes import FULL
from benchmarks.synthetic import special_ids, synthetic_batch
from benchmarks.timing import autocast, setup_device
import captioner.models.decoder as decoder_module
from captioner.losses import caption_loss

aten = torch.ops.aten
# Calls that launch no kernel: views and aliases of their input, and allocations.
NO_KERNEL = {"empty", "empty_strided", "t", "view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze",
         "split", "split_with_sizes", "unbind", "transpose", "permute", "expand", "alias",
         "narrow", "as_strided", "lift_fresh", "unsafe_split", "unsafe_split_with_sizes",
         "unsafe_chunk", "_reshape_alias", "reshape"}
PHASES = ("encoder", "decoder + loss", "backward", "optimiser")


def _fused_lstm_cell(input_gates, hidden_gates, cx, input_bias=None, hidden_bias=None):
    """``_thnn_fused_lstm_cell`` on the CPU: (hy, cy, workspace = activated gates i|f|g|o),
    by the decoder's own CPU arithmetic."""
    if input_bias is not None:
        input_gates = input_gates + input_bias + hidden_bias
    return decoder_module._lstm_cell_arithmetic(input_gates, hidden_gates, cx)


def _fused_lstm_cell_backward(grad_hy, grad_cy, cx, cy, workspace, has_bias):
    """``_thnn_fused_lstm_cell_backward_impl`` on the CPU: (grad_gates, grad_cx, grad_bias)."""
    grad_hy = torch.zeros_like(cy) if grad_hy is None else grad_hy
    grad_cy = torch.zeros_like(cy) if grad_cy is None else grad_cy
    grad_gates, grad_cx = decoder_module._lstm_cell_backward_arithmetic(grad_hy, grad_cy, cx, cy,
                                                                        workspace)
    return grad_gates, grad_cx, grad_gates.sum(0) if has_bias else None


class CallCount(TorchDispatchMode):
    """Counts ATen calls per phase; on the CPU computes the CUDA-only fused LSTM kernels."""

    def __init__(self):
        super().__init__()
        self.phase = PHASES[0]
        self.calls = {phase: Counter() for phase in PHASES}
        self.kernel_calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name != "detach":  # autograd's, for saved tensors, only under a dispatch mode
            self.calls[self.phase][name] += 1
            # A host scalar read (Adam's step counts) copies nothing and launches nothing.
            host_read = name == "_local_scalar_dense" and not args[0].is_cuda
            if name not in NO_KERNEL and not host_read:
                self.kernel_calls[self.phase] += 1
        if func is aten._thnn_fused_lstm_cell.default and not args[0].is_cuda:
            return _fused_lstm_cell(*args, **kwargs)
        if func is aten._thnn_fused_lstm_cell_backward_impl.default and not args[2].is_cuda:
            return _fused_lstm_cell_backward(*args, **kwargs)
        return func(*args, **kwargs)


def cuda_lstm_path():
    """Sends the decoder's teacher-forced loop down its CUDA path on the CPU: its own calls of
    the fused LSTM kernels, forward and backward (which :class:`CallCount` computes)."""
    return mock.patch.object(decoder_module, "_fused_lstm", lambda x: True)


def count(device: torch.device, fine_tune: bool, cuda_graph: bool, bucketed: bool,
          steps: int, seed: int = 0) -> dict:
    """Counts over ``steps`` training steps after two uncounted ones."""
    sizes = dataclasses.replace(FULL, image_size=64)
    setup_device(device)
    torch.manual_seed(seed)
    module, optimizer = build_ours(sizes, device, fine_tune, cuda_graph=cuda_graph)
    params = [p for p in module.parameters() if p.requires_grad]
    if device.type != "cuda":  # Adam's default on CUDA: multi-tensor (foreach) kernels
        for group in optimizer.param_groups:
            group["foreach"] = True
    ids = special_ids(sizes)
    rng = np.random.default_rng(seed)

    def make_batch() -> dict:
        return synthetic_batch(rng, sizes, ids, pool=8 if bucketed else 1)

    def step(batch: dict, mode: CallCount | None) -> None:
        def enter(phase: str) -> None:
            if mode is not None:
                mode.phase = phase

        enter("encoder")  # the images' normalisation belongs to encoding
        with ExitStack() as stack:
            if mode is not None:
                stack.enter_context(mode)
            handles = [module.captioner.encoder.register_forward_pre_hook(
                           lambda *_: enter("encoder")),
                       module.captioner.encoder.register_forward_hook(
                           lambda *_: enter("decoder + loss"))]
            try:
                with autocast(device):
                    out = module.captioner(batch["images"], batch["captions"], batch["lengths"])
                    loss = caption_loss(out.logits.float(), out.targets, out.mask,
                                        out.alphas.float()).loss
                optimizer.zero_grad(set_to_none=True)
                enter("backward")
                loss.backward()
                enter("optimiser")
                torch.nn.utils.clip_grad_value_(params, 5.0)
                optimizer.step()
            finally:
                for handle in handles:
                    handle.remove()

    for _ in range(2):
        step(make_batch(), None)  # warm-up (lazy state, CUDA graph capture), not counted
    decoder_steps = []
    with ExitStack() as stack:
        if device.type != "cuda":
            stack.enter_context(cuda_lstm_path())
        mode = CallCount()
        for _ in range(steps):
            batch = make_batch()
            decoder_steps.append(int(batch["lengths"].max()) - 1)
            step(batch, mode)
    result = {"device": str(device), "fine_tune": fine_tune, "cuda_graph": cuda_graph,
              "bucketed": bucketed, "steps": steps,
              "decoder_steps_per_batch": float(np.mean(decoder_steps)), "phases": {}}
    for phase, calls in mode.calls.items():
        total = sum(calls.values())
        kernels = mode.kernel_calls[phase]
        result["phases"][phase] = {"calls": total / steps, "kernel_calls": kernels / steps,
                                   "top": {name: n / steps for name, n in calls.most_common(12)}}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--fine-tune", action="store_true", help="train encoder blocks 2-4")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="model.encoder.cuda_graph (replays a frozen encoder on CUDA)")
    parser.add_argument("--bucketed", action="store_true",
                        help="batches of images of alike longest caption, as data.bucket_by_length")
    parser.add_argument("--steps", type=int, default=3, help="counted training steps")
    parser.add_argument("-v", "--verbose", action="store_true", help="the most frequent calls")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    result = count(torch.device(args.device), args.fine_tune, args.cuda_graph, args.bucketed,
                   args.steps)
    print(f"ATen calls per training step on {result['device']} ({args.steps} steps, "
          f"{result['decoder_steps_per_batch']:.1f} decoder steps per batch; encoder "
          f"{'fine-tuned' if args.fine_tune else 'frozen'}"
          f"{', CUDA graph' if args.cuda_graph else ''}):")
    print(f"{'phase':<16}{'calls':>10}{'kernel calls':>14}")
    total = kernels = 0.0
    for phase, counts in result["phases"].items():
        total, kernels = total + counts["calls"], kernels + counts["kernel_calls"]
        print(f"{phase:<16}{counts['calls']:>10.0f}{counts['kernel_calls']:>14.0f}")
        if args.verbose:
            print("    " + ", ".join(f"{name} {n:.0f}" for name, n in counts["top"].items()))
    print(f"{'total':<16}{total:>10.0f}{kernels:>14.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
