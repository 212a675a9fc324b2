"""Rows measured in a fresh interpreter each (see ``benchmarks.run``'s docstring for why).

A spec is a JSON-able dict with ``entry`` (``"module:function"``: the function is called with
the spec in the child and returns one row or a list of rows), ``kind`` (for messages) and
``keep_freed_memory`` (the child turns on :func:`captioner.allocator.keep_freed_memory` before
torch allocates anything, and the row names get :data:`~benchmarks.sizes.KEEP`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import torch

from benchmarks.sizes import REPO_ROOT


def keep_applies(device: torch.device) -> bool:
    """Whether the ``keep_freed_memory`` rows are measured (CPU runs on glibc)."""
    return device.type == "cpu" and platform.libc_ver()[0] == "glibc"


_ROW_CHILD = """
import importlib, json, os, sys
spec = json.loads(sys.argv[1])
# Read when CUDA's caching allocator starts, so set before torch. Rows without a setting run
# the default allocator, whatever the benchmark's own environment says.
for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
    os.environ.pop(name, None)
if spec.get("cuda_alloc_conf"):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = spec["cuda_alloc_conf"]
if spec.get("keep_freed_memory"):  # before torch allocates anything
    from captioner.allocator import keep_freed_memory
    assert keep_freed_memory(), "glibc malloc options could not be set"
from benchmarks.sizes import KEEP
module, function = spec["entry"].split(":")
result = getattr(importlib.import_module(module), function)(spec)
rows = result if isinstance(result, list) else [result]
for row in rows:
    if spec.get("keep_freed_memory"):
        row["name"] += KEEP
        row["malloc"] = "keep_freed_memory"
    print("BENCH_ROW " + json.dumps(row), flush=True)
"""


def run_child(code: str, args: dict, what: str) -> str:
    """Run ``code`` in a fresh interpreter with ``args`` as JSON in ``sys.argv[1]`` (the repo
    importable, as ``benchmarks``/``captioner``); returns its stdout, raises if it failed."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([child_env["PYTHONPATH"]] if child_env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO_ROOT,
                          env=child_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({what}, exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return proc.stdout


def isolated_rows(spec: dict) -> list[dict]:
    """The rows of ``spec`` (one training row, or the decoding rows) in a fresh interpreter
    (see the module docstring)."""
    what = f"{spec['kind']}, fine_tune={spec.get('fine_tune')}"
    rows = [json.loads(line[len("BENCH_ROW "):])
            for line in run_child(_ROW_CHILD, spec, what).splitlines()
            if line.startswith("BENCH_ROW ")]
    if not rows:
        raise RuntimeError(f"benchmark child printed no rows ({what})")
    for row in rows:  # progress, and a record should the run be stopped before its table
        print(f"  measured: {row['name']} [{row['impl']}] {row['value']:.4g} {row['unit']}",
              flush=True)
    return rows

