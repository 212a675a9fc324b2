"""The ratios to the tutorial and to the targets, the printed table and the machine record."""

from __future__ import annotations

import os
import platform

import torch

from benchmarks.preprocess import PREP
from benchmarks.sizes import KEEP


TARGETS = [  # (label, numerator, denominator, target); a side is (name, impl[, field])
    # Like for like: both sides with the same malloc setting. Ours as train.py/evaluate.py
    # run it on the CPU is the keep_freed_memory row.
    ("train frozen: ours / tutorial captions/s, keep_freed_memory (both)",
     ("train frozen encoder" + KEEP, "ours"), ("train frozen encoder" + KEEP, "tutorial"),
     ">= 4x (CPU)"),
    ("train frozen: ours / tutorial captions/s, default malloc (both)",
     ("train frozen encoder", "ours"), ("train frozen encoder", "tutorial"), ">= 4x (CPU)"),
    ("train fine-tuned: ours / tutorial captions/s, keep_freed_memory (both)",
     ("train fine-tuned encoder (blocks 2-4)" + KEEP, "ours"),
     ("train fine-tuned encoder (blocks 2-4)" + KEEP, "tutorial"), "(report)"),
    ("train fine-tuned: ours / tutorial captions/s, default malloc (both)",
     ("train fine-tuned encoder (blocks 2-4)", "ours"),
     ("train fine-tuned encoder (blocks 2-4)", "tutorial"), "(report)"),
    ("train frozen: + HDF5 loader / synthetic batch images/s, keep_freed_memory",
     ("train frozen encoder + HDF5 loader" + KEEP, "ours"),
     ("train frozen encoder" + KEEP, "ours", "images_per_s"),
     "(report; ~1: loader not the bottleneck)"),
    ("train frozen: + HDF5 loader / synthetic batch images/s, default malloc",
     ("train frozen encoder + HDF5 loader", "ours"),
     ("train frozen encoder", "ours", "images_per_s"), "(report)"),
    ("train frozen + HDF5 loader: length-bucketed / plain batches images/s",
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"),
     ("train frozen encoder + HDF5 loader", "ours"), "(report)"),
    ("train frozen + HDF5 loader: length-bucketed / plain batches, keep_freed_memory",
     ("train frozen encoder + HDF5 loader, length-bucketed batches" + KEEP, "ours"),
     ("train frozen encoder + HDF5 loader" + KEEP, "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: expandable_segments / default allocator",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, expandable_segments allocator",
      "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: encoder CUDA graph / eager",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, encoder CUDA graph", "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: Lightning loop (train.py) / plain step",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, Lightning loop (train.py)",
      "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches", "ours"), "(report)"),
    ("train frozen + HDF5 loader, length-bucketed: Lightning loop (train.py) / plain step, "
     "keep_freed_memory",
     ("train frozen encoder + HDF5 loader, length-bucketed batches, Lightning loop (train.py)"
      + KEEP, "ours"),
     ("train frozen encoder + HDF5 loader, length-bucketed batches" + KEEP, "ours"), "(report)"),
    ("train frozen + HDF5 loader, plain batches: expandable_segments / default allocator",
     ("train frozen encoder + HDF5 loader, expandable_segments allocator", "ours"),
     ("train frozen encoder + HDF5 loader", "ours"), "(report)"),
    ("train frozen, ours: keep_freed_memory / default malloc",
     ("train frozen encoder" + KEEP, "ours"), ("train frozen encoder", "ours"),
     "(report; CPU page-fault cost)"),
    ("train frozen, tutorial: keep_freed_memory / default malloc",
     ("train frozen encoder" + KEEP, "tutorial"), ("train frozen encoder", "tutorial"),
     "(report)"),
    ("decode beam-5: ours / tutorial images/s, keep_freed_memory (both)",
     ("decode beam-5 (test)" + KEEP, "ours"), ("decode beam-5 (test)" + KEEP, "tutorial"),
     ">= 3x CPU"),
    ("decode beam-5: ours / tutorial images/s" + " (default malloc on CPU)",
     ("decode beam-5 (test)", "ours"), ("decode beam-5 (test)", "tutorial"),
     ">= 3x CPU, >= 30x GPU"),
    ("decode beam-5: ours at batch 128 / tutorial images/s",
     ("decode beam-5 (test), batch 128", "ours"), ("decode beam-5 (test)", "tutorial"),
     ">= 30x GPU"),
    ("preprocess: 2 / 1 worker processes", (f"{PREP}2", "ours"), (f"{PREP}1", "ours"), ">= 1.7x"),
    ("preprocess per process: 1 worker / plain PIL", (f"{PREP}1", "ours"),
     ("preprocess plain PIL (full decode, resize)", "baseline"), ">= 2x"),
    ("preprocess draft gain: 1 worker default / full decode", (f"{PREP}1", "ours"),
     (f"{PREP}1 draft_min_ratio=None (full decode)", "ours"), "(report)"),
    ("preprocess: in-process / plain PIL", (f"{PREP}0", "ours"),
     ("preprocess plain PIL (full decode, resize)", "baseline"), "(report)"),
    ("preprocess: 2 workers / in-process", (f"{PREP}2", "ours"), (f"{PREP}0", "ours"), "(report)"),
]


def ratios(rows: list[dict], targets: list[tuple] = TARGETS) -> list[dict]:
    """One row per target of ``targets`` whose two sides were measured, then the COCO epoch
    minutes and the preprocessing memory growth of the rows that carry them."""
    by_key = {(r["name"], r["impl"]): r for r in rows}
    out = []
    for label, num, den, target in targets:
        if num[:2] in by_key and den[:2] in by_key:
            value = (by_key[num[:2]][num[2] if len(num) > 2 else "value"]
                     / by_key[den[:2]][den[2] if len(den) > 2 else "value"])
            out.append({"ratio": label, "value": value, "target": target})
    for r in rows:
        if "coco_epoch_min" in r:
            frozen = "fine-tuned" not in r["name"]
            out.append({"ratio": f"COCO epoch (113k images x 5 captions), minutes, from "
                                  f"'{r['name']}'",
                        "value": r["coco_epoch_min"],
                        "target": "<= 3 min on one H100" if frozen else "(report)"})
        if "main_growth_mib_per_1000_images" in r:
            out += [{"ratio": "preprocess peak RSS growth per 1,000 images, main MiB",
                     "value": r["main_growth_mib_per_1000_images"],
                     "target": "(report; ~0: metadata streams)"},
                    {"ratio": "preprocess peak RSS growth per 1,000 images, worker MiB",
                     "value": r["worker_growth_mib_per_1000_images"], "target": "(report)"}]
    return out


def format_table(rows: list[dict], ratio_rows: list[dict]) -> str:
    width = max([58] + [len(r["name"]) for r in rows] + [len(r["ratio"]) for r in ratio_rows])
    lines = [f"{'benchmark':{width}} {'impl':9} {'median':>10} {'spread (min..max)':>22}  unit",
             "-" * (width + 52)]
    for r in rows:
        spread = f"{r['low']:.3g}..{r['high']:.3g}" if "low" in r else ""
        extra = ""
        if "minor_faults_per_step" in r and r.get("cuda_max_memory_allocated_mib") is None:
            extra = (f"  {r['minor_faults_per_step'] / 1e3:.3g}k page faults, "
                     f"{r['sys_s_per_step']:.2f} s sys per step")
        if "cuda_max_memory_allocated_mib" in r:
            extra = f"  peak {r['cuda_max_memory_allocated_mib']:.0f} MiB"
        if "decoder_steps_per_batch" in r:
            extra += f", {r['decoder_steps_per_batch']:.1f} decoder steps per batch"
        if "largest_worker_mib" in r:
            extra = f"  largest worker {r['largest_worker_mib']:.0f} MiB"
        if "mean_abs_diff" in r:
            extra = f"  mean |diff| {r['mean_abs_diff']:.3g}, max {r['max_abs_diff']} grey levels"
        lines.append(f"{r['name']:{width}} {r['impl']:9} {r['value']:10.4g} {spread:>22}  "
                     f"{r['unit']}{extra}")
    if ratio_rows:
        lines += ["", f"{'ratio':{width}} {'value':>10}  target", "-" * (width + 32)]
        lines += [f"{r['ratio']:{width}} {r['value']:10.3g}  {r['target']}" for r in ratio_rows]
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
