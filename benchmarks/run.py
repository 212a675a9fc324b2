"""Throughput benchmarks of captioner, side by side with our re-implementation of the tutorial.

Run ``python -m benchmarks --help``. Groups (``--only``): ``train`` (captions/s and images/s of a
full optimisation step, frozen and fine-tuned encoder, plus ours with the real HDF5 loader in
the loop, and that row run by Lightning's ``Trainer.fit`` as ``train.py`` runs it), ``decode``
(greedy and beam-5 images/s), ``preprocess`` (JPEG -> HDF5 images/s with 0/1/2 worker
processes, full decode vs draft mode, a plain PIL loop, draft-mode fidelity in dB, peak RSS for
a small and a large Karpathy JSON) and ``loader`` (``CaptionH5Dataset`` + DataLoader images/s by
worker count), ``evaluate`` (``evaluate.py`` end to end next to ``generate`` alone and the tutorial's eval loop),
``scst`` (the CIDEr-D reward's captions/s next to pycocoevalcap's, its
share of an SCST step) and ``serving`` (PyTorch vs ONNX Runtime images/s, the HTTP server's
latency and throughput next to the caption CLI). Every number is the median of
``--repeats`` timed runs after one warm-up run (training rows: after two warm-up steps; the
loader-in-the-loop rows on CUDA after 160), with the min..max spread. Results are printed
as a table and written as JSON to ``benchmarks/results/<machine>-<time>.json``.

Each training and decoding row runs in a fresh interpreter after the same warm-up: the state an
earlier row leaves in the C allocator changes the cost of a CPU step by up to 2x (glibc returns
freed activation memory to the kernel and every step page-faults it back in; after a fine-tuned
step it no longer does), so rows sharing one process would depend on their order. On CPU with
glibc every training and decoding row is measured twice, on both sides: with the default malloc
settings and with ``captioner.allocator.keep_freed_memory`` (row names end in
``, keep_freed_memory``), which train.py and evaluate.py turn on for CPU runs.

All models use random weights (``pretrained=False``): nothing is downloaded. Random decoders
never emit ``<end>``, so both decoders run exactly ``decode_max_len`` steps per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import decode, evaluate_loop, loader, scst, serving, train
from benchmarks.equivalence import check_equivalence
from benchmarks.preprocess import DataSet, bench_preprocess, prepare_only
from benchmarks.report import format_table, machine_info, ratios
from benchmarks.sizes import FULL, FULL_CUDA, QUICK, RESULTS_DIR, Sizes
from benchmarks.timing import setup_device
from captioner.files import write_json_atomic


@dataclass
class Context:
    """What a benchmark family is given: the parsed options and the prepared HDF5 dataset."""

    sizes: Sizes
    device: torch.device
    repeats: int
    loader_workers: list[int]  # DataLoader worker counts (--loader-workers)
    train_rows: str | None  # --train-rows
    data: DataSet | None  # the preprocessed benchmark dataset, for families in NEEDS_DATA
    quick: bool = False  # --quick
    workdir: Path | None = None  # a scratch folder for the run (--workdir or a temp folder)


# The families after ``preprocess`` (which also prepares the dataset the others read), run in
# this order; ``--only`` names them. A family is a function of the Context returning its rows
# (dicts as built by benchmarks.timing.rate). To add one: write benchmarks/<topic>.py with
# that function, add a line here (and its name to NEEDS_DATA if it reads ctx.data), and put its
# ratio targets in benchmarks.report.TARGETS. Rows that must not share a process with others run
# through benchmarks.isolation.isolated_rows (see benchmarks/decode.py for the pattern).
FAMILIES: dict[str, Callable[[Context], list[dict]]] = {
    "loader": lambda ctx: loader.bench_loader(ctx.sizes, ctx.device, ctx.repeats, ctx.data,
                                              ctx.loader_workers),
    "train": lambda ctx: train.bench_train(ctx.sizes, ctx.device, ctx.repeats, ctx.data,
                                           max(ctx.loader_workers), ctx.train_rows),
    "decode": lambda ctx: decode.bench_decode(ctx.sizes, ctx.device, ctx.repeats),
    "evaluate": lambda ctx: evaluate_loop.bench_evaluate(ctx.sizes, ctx.device, ctx.repeats, ctx.data,
                                                         ctx.workdir),
    "scst": lambda ctx: scst.scst_rows(ctx.repeats, ctx.quick),
    "serving": lambda ctx: serving.serving_rows(ctx.quick, ctx.repeats, ctx.workdir),
}
# Ratios a family computes from its own rows (next to benchmarks.report.TARGETS).
FAMILY_RATIOS: list[Callable[[list[dict]], list[dict]]] = [evaluate_loop.ratio_rows, serving.serving_ratios]
NEEDS_DATA = {"loader", "train", "evaluate"}
GROUPS = ("preprocess", *FAMILIES)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of {','.join(GROUPS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per benchmark (median)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a fast check")
    parser.add_argument("--loader-workers", default=None,
                        help="comma-separated DataLoader worker counts (default: 0,1,2 on CPU, "
                             "0,4,8 on CUDA)")
    parser.add_argument("--train-rows", default=None, metavar="REGEX",
                        help="only the training rows whose kind:encoder:variant key matches, e.g. "
                             "'loader:frozen:bucketed' or 'loader:.*expandable' (keys: ours, "
                             "tutorial or loader; frozen or fine-tuned; synthetic, pinned, "
                             "bucketed, lightning, unpinned or preloaded, +expandable, +graph, "
                             "+keep_freed_memory)")
    parser.add_argument("--workdir", default=None,
                        help="where the JPEGs and HDF5 files go (default: a temp folder, removed)")
    parser.add_argument("--out", default=None,
                        help="JSON result path (default benchmarks/results/<machine>-<time>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"--only: unknown group(s) {unknown}; choose from {','.join(GROUPS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device(args.device)
    setup_device(device)
    sizes = QUICK if args.quick else FULL_CUDA if device.type == "cuda" else FULL
    workers_list = ([int(w) for w in args.loader_workers.split(",")] if args.loader_workers
                    else [0, 1, 2] if device.type == "cpu" else [0, 4, 8])
    if args.quick and not args.loader_workers:
        workers_list = [0, 2]
    torch.manual_seed(0)

    check = check_equivalence()
    print(f"tutorial reference vs ours, same math: {'OK' if check['ok'] else 'MISMATCH'} {check}",
          flush=True)
    rows: list[dict] = []
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="captioner-bench-")
    workdir = Path(args.workdir or tmp.name).resolve()  # children run in the repo root
    started = time.perf_counter()
    try:
        ctx = Context(sizes, device, args.repeats, workers_list, args.train_rows, data=None,
                      quick=args.quick, workdir=workdir)
        if "preprocess" in groups:
            prep_rows, ctx.data = bench_preprocess(sizes, args.repeats, workdir)
            rows += prep_rows
            print(format_table(prep_rows, []), flush=True)
        if ctx.data is None and NEEDS_DATA.intersection(groups):
            ctx.data = prepare_only(sizes, workdir)
        # Each group's table is printed as soon as it is measured, so a run stopped early
        # (a time limit on a lent GPU machine) still leaves its finished rows in the log.
        for group in (g for g in FAMILIES if g in groups):
            group_rows = FAMILIES[group](ctx)
            rows += group_rows
            print(format_table(group_rows, []), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    ratio_rows = ratios(rows) + [r for family in FAMILY_RATIOS for r in family(rows)]
    print()
    print(format_table(rows, ratio_rows))
    report = {"machine": machine_info(device), "quick": args.quick, "repeats": args.repeats,
              "groups": groups, "sizes": dataclasses.asdict(sizes), "equivalence": check, "wall_s": time.perf_counter() - started,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows, "ratios": ratio_rows}
    if args.out:
        out = Path(args.out)
    else:
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", platform.node() or "machine")
        out = RESULTS_DIR / f"{host}-{args.device}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(out, report)
    print(f"\nwrote {out}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
