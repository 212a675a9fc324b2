"""Timing helpers: medians of timed runs, page faults and CPU time per run, result rows."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], repeats: int, device: torch.device,
            warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return measure_with_usage(fn, repeats, device, warmup)[0]


def measure_with_usage(fn: Callable[[], object], repeats: int, device: torch.device,
                       warmup: int = 1) -> tuple[list[float], dict]:
    """:func:`measure`, plus this process's mean minor page faults and CPU seconds per timed call.

    The page faults show what the allocator costs: memory handed back to the kernel after a
    step is zero-filled again, one fault per 4 KiB page, on the next step.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, usage_per_run(before, resource.getrusage(resource.RUSAGE_SELF), repeats)


def usage_per_run(before, after, runs: int) -> dict:
    """Mean minor page faults and user/system CPU seconds per run between two ``getrusage``."""
    return {"minor_faults_per_run": (after.ru_minflt - before.ru_minflt) / runs,
            "user_s_per_run": (after.ru_utime - before.ru_utime) / runs,
            "sys_s_per_run": (after.ru_stime - before.ru_stime) / runs}


def rate(name: str, group: str, impl: str, unit: str, amount: float, times: list[float],
         **extra) -> dict:
    """A result row: ``amount`` units per run over the run times, median and spread."""
    return {"name": name, "group": group, "impl": impl, "unit": unit,
            "value": amount / statistics.median(times), "low": amount / max(times),
            "high": amount / min(times), "runs": len(times), "times_s": times, **extra}


def setup_device(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA (what training runs with); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else nullcontext())


def cuda_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def per_step(usage: dict, steps: int) -> dict:
    """:func:`measure_with_usage`'s per-run usage divided over ``steps`` optimisation steps."""
    return {key.replace("_per_run", "_per_step"): value / steps for key, value in usage.items()}

