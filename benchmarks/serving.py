"""Serving and export benchmarks: PyTorch vs ONNX Runtime, the HTTP server, and ONNX parity.

:func:`serving_rows` (the ``serving`` group of ``python -m benchmarks``) measures on the CPU,
with random weights (random decoders never emit ``<end>``, so every search runs the full
``decode_max_len`` steps on both sides):

- images/s of beam-5 captioning from uint8 pixels, ``Captioner.generate`` (PyTorch) vs the
  exported graphs under the same beam search (``OnnxCaptioner.generate``), at batch 1 and 32,
  for the quickstart model (ResNet-18 to layer3, 64 px) and a ResNet-101 model at 256 px;
- the server (``python -m captioner.serve`` in its own process, beam 5, batches of up to 16):
  latency p50/p95 of one client sending images one after another, and images/s with 8
  concurrent clients, next to the caption CLI's offline images/s (``caption_images``, batch 16)
  on the same files, model and settings.

:func:`parity` compares the two backends on a trained checkpoint's test split::

    python -m benchmarks.serving --parity --ckpt-path outputs/train/latest/checkpoints/best.ckpt \\
        --model-dir outputs/export/latest
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.models import save_module_checkpoint
from benchmarks.sizes import REPO_ROOT
from benchmarks.timing import measure, rate

BEAM = 5
SERVER_BATCH = 16  # the server's max_batch_size and the CLI's batch_size (both defaults)
CLIENTS = 8


def _model(arch: str, image_size: int, encoded: int, last_stage: int, vocab: int, embed: int, hidden: int):
    """A CaptioningModule with random weights and a synthetic word map of ``vocab`` words."""
    from captioner.lit_module import CaptioningModule
    from captioner.vocab import WordMap

    word_map = WordMap.build([[f"w{i}" for i in range(vocab - 4)]], 1)
    torch.manual_seed(0)
    model = CaptioningModule(
        vocab_size=len(word_map), **word_map.special_ids,
        encoder={"arch": arch, "encoded_image_size": encoded, "pretrained": False, "last_stage": last_stage},
        decoder={"embed_dim": embed, "decoder_dim": hidden, "attention_dim": hidden, "dropout": 0.0},
        word_map=word_map, run_config={"data": {"image_size": image_size}})
    with torch.no_grad():  # never <end>: every search runs its full length on both sides
        model.captioner.decoder.fc.bias[word_map.end_id] = -1e4
    return model.eval()


CLI_CHILD = r"""
import json, sys
from pathlib import Path
from benchmarks.serving import _timed
from captioner.caption import caption_images
from captioner.lit_module import CaptioningModule
args = json.loads(sys.argv[1])
model = CaptioningModule.load_from_checkpoint(args["ckpt"], map_location="cpu", weights_only=True)
files = [Path(f) for f in args["files"]]
times = _timed(lambda: list(caption_images(model, files, args["image_size"], args["beam"], args["max_len"],
                                           batch_size=args["batch_size"])), args["repeats"])
print(json.dumps(times))
"""


MODELS = {  # name -> (model arguments, image side)
    "quickstart": (("resnet18", 64, 4, 3, 60, 128, 256), 64),
    "resnet101": (("resnet101", 256, 14, 4, 10_000, 512, 512), 256),
}
QUICK_MODELS = {"tiny": (("resnet18", 64, 4, 3, 60, 32, 32), 64)}


def _timed(fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after one warm-up call (host code: CPU timing)."""
    return measure(fn, repeats, torch.device("cpu"))


def _row(name: str, impl: str, amount: float, times: list[float], unit: str = "images/s", **extra) -> dict:
    return rate(name, "serving", impl, unit, amount, times, **extra)


def backend_rows(name: str, model, image_size: int, workdir: Path, repeats: int, max_len: int,
                 batches: tuple[int, ...] = (1, 32)) -> list[dict]:
    """PyTorch vs ONNX Runtime images/s of beam-5 captioning at each batch size."""
    from captioner.export import export_onnx
    from captioner.onnx_model import OnnxCaptioner

    folder = workdir / f"onnx-{name}"
    export_onnx(model.captioner, model.word_map, folder, image_size,
                {"beam_size": BEAM, "max_len": max_len}, source="random weights")
    onnx_model = OnnxCaptioner(folder)
    rows = []
    # PyTorch's rows first: ONNX Runtime's worker threads, once they have run, compete with
    # PyTorch's for the cores (measured: PyTorch several times slower after an ONNX Runtime row
    # on a 2-core CPU). Rows of one model share a process; run.py's rows use fresh ones.
    for impl, generate in (("pytorch", model.captioner.generate), ("onnxruntime", onnx_model.generate)):
        for batch in batches:
            calls = max(1, 8 // batch)  # batch 1: 8 images per timed run
            images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)

            def run(generate=generate, images=images, calls=calls):
                for _ in range(calls):
                    generate(images, beam_size=BEAM, max_len=max_len)
            rows.append(_row(f"{name} beam {BEAM}, batch {batch}", impl, batch * calls,
                             _timed(run, repeats), max_len=max_len))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(overrides: list[str], cwd: Path, env: dict | None = None,
                   startup_s: float = 300) -> Iterator[str]:
    """``python -m captioner.serve`` with ``overrides`` on a free loopback port; yields its URL
    once ``/health`` answers (at most ``startup_s`` seconds) and stops it afterwards."""
    import requests

    port = _free_port()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "captioner.serve", f"port={port}", *overrides], cwd=cwd,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {startup_s} s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def server_rows(model, image_size: int, workdir: Path, repeats: int, max_len: int, num_images: int,
                latency_requests: int, label: str = "") -> list[dict]:
    """The server's one-client latency and 8-client images/s, and the caption CLI's images/s;
    ``label`` (the model's name) starts the row names."""
    prefix = f"{label} " if label else ""
    import requests

    workdir = workdir / (label or "server")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = save_module_checkpoint(model, workdir / "server.ckpt")
    rng = np.random.default_rng(0)
    files = []
    for i in range(num_images):
        path = workdir / "images" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (image_size * 2, image_size * 2, 3), dtype=np.uint8)).save(path)
        files.append(path)
    # The CLI's core in a fresh interpreter, as the server runs in its own: the heap an earlier
    # row leaves behind (and ONNX Runtime's threads) would slow it (see benchmarks/run.py).
    child = subprocess.run([sys.executable, "-c", CLI_CHILD, json.dumps({
        "ckpt": str(ckpt), "files": [str(f) for f in files], "image_size": image_size, "beam": BEAM,
        "max_len": max_len, "batch_size": SERVER_BATCH, "repeats": repeats})],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        raise RuntimeError(f"the caption CLI benchmark failed:\n{child.stderr[-3000:]}")
    rows = [_row(f"{prefix}caption CLI offline, beam {BEAM}, batch {SERVER_BATCH}", "caption_images", num_images,
                 json.loads(child.stdout.strip().splitlines()[-1]), max_len=max_len)]
    overrides = [f"ckpt_path={ckpt}", f"beam={BEAM}", f"max_len={max_len}", f"max_batch_size={SERVER_BATCH}",
                 f"paths.output_root={workdir / 'outputs'}"]
    with running_server(overrides, REPO_ROOT) as url:
        blobs = [p.read_bytes() for p in files]

        def send(data: bytes) -> float:
            started = time.perf_counter()
            response = requests.post(f"{url}/predict", files={"image": ("x.jpg", data)}, timeout=600)
            response.raise_for_status()
            return time.perf_counter() - started

        send(blobs[0])  # warm-up
        latencies = [send(blobs[i % len(blobs)]) for i in range(latency_requests)]
        for q in (50, 95):
            rows.append({"name": f"{prefix}server, 1 client, beam {BEAM}, latency p{q}", "group": "serving",
                         "impl": "server", "unit": "ms", "value": 1000 * float(np.percentile(latencies, q)),
                         "requests": latency_requests, "max_len": max_len})

        def clients() -> None:
            with ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(send, blobs))

        rows.append(_row(f"{prefix}server, {CLIENTS} clients, beam {BEAM}, batches <= {SERVER_BATCH}", "server",
                         num_images, _timed(clients, repeats), max_len=max_len))
        rows[-1]["vs_caption_cli"] = rows[-1]["value"] / rows[0]["value"]
    return rows


def serving_rows(quick: bool, repeats: int, workdir: Path,
                 report: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every row of the ``serving`` group (``quick``: one tiny model, few images); ``report``
    gets each model's rows as soon as they are measured."""
    torch.manual_seed(0)
    max_len = 8 if quick else 20
    rows = []
    for name, (args, image_size) in (QUICK_MODELS if quick else MODELS).items():
        rows += backend_rows(name, _model(*args), image_size, workdir, repeats, max_len,
                             batches=(1, 4) if quick else (1, 32))
        if report is not None:
            report(rows[-4:])
    for name, (args, image_size) in (QUICK_MODELS if quick else MODELS).items():
        rows += server_rows(_model(*args), image_size, workdir, repeats, max_len,
                            num_images=16 if quick else 64,
                            latency_requests=5 if quick else 30 if name == "quickstart" else 10,
                            label=name)
        if report is not None:
            report(rows[-4:])
    return rows


def serving_ratios(rows: list[dict]) -> list[dict]:
    """ONNX Runtime / PyTorch per model and batch, and the server's 8 clients / the caption CLI."""
    by_key = {(r["name"], r["impl"]): r["value"] for r in rows if r.get("group") == "serving"}
    out = [{"ratio": f"{name}: ONNX Runtime / PyTorch images/s", "value": value / by_key[(name, "pytorch")],
            "target": "(report)"}
           for (name, impl), value in by_key.items() if impl == "onnxruntime" and (name, "pytorch") in by_key]
    out += [{"ratio": f"{r['name']} / caption CLI images/s", "value": r["vs_caption_cli"], "target": ">= 0.8"}
            for r in rows if "vs_caption_cli" in r]
    return out


# ---------------------------------------------------------------------------- parity
def parity(ckpt_path: str, model_dir: str, split: str = "test", beam: int = BEAM, max_len: int = 50,
           logits_images: int = 64) -> dict:
    """PyTorch vs ONNX Runtime captions of a checkpoint's split (the prepared references file).

    Returns:
        identical caption fraction, BLEU-4 of each backend, the largest step-logit difference
        (on the split's first ``logits_images`` images), and both backends' images/s.
    """
    from captioner.caption import caption_images
    from captioner.data.images import load_image
    from captioner.export import step_logits_difference
    from captioner.lit_module import CaptioningModule
    from captioner.metrics import corpus_bleu_scores
    from captioner.onnx_model import OnnxCaptioner

    model = CaptioningModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    data = model.run_config["data"]
    prepared = Path(data["data_folder"])
    found = sorted(prepared.glob(f"{split.upper()}_REFERENCES_*.json"))
    if not found:
        raise FileNotFoundError(f"no {split.upper()}_REFERENCES_*.json in {prepared}")
    references = json.loads(found[0].read_text())
    paths = [Path(p) for p in references["paths"]]
    onnx_model = OnnxCaptioner(model_dir)
    image_size = onnx_model.image_size
    results, rates = {}, {}
    for name, backend in (("pytorch", model), ("onnxruntime", onnx_model)):
        started = time.perf_counter()
        results[name] = list(caption_images(backend, paths, image_size, beam, max_len,
                                            draft_min_ratio=onnx_model.draft_min_ratio))
        rates[name] = len(paths) / (time.perf_counter() - started)
        failed = [r.path for r in results[name] if not r.ok]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} images failed, e.g. {failed[0]}")
    same = sum(a.tokens == b.tokens for a, b in zip(results["pytorch"], results["onnxruntime"]))
    bleu = {name: corpus_bleu_scores(references["tokens"], [r.words for r in rs])["bleu4"]
            for name, rs in results.items()}
    images = torch.stack([torch.from_numpy(load_image(p, image_size, onnx_model.draft_min_ratio))
                          for p in paths[:logits_images]])
    difference = step_logits_difference(model.captioner, onnx_model, images, steps=10)
    return {"checkpoint": str(ckpt_path), "model_dir": str(model_dir), "split": split, "images": len(paths),
            "beam": beam, "max_len": max_len, "identical_captions": same / len(paths),
            "bleu4_pytorch": bleu["pytorch"], "bleu4_onnxruntime": bleu["onnxruntime"],
            "bleu4_difference": abs(bleu["pytorch"] - bleu["onnxruntime"]),
            "max_step_logit_difference": difference, "images_per_s": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--parity", action="store_true", help="compare the backends on a checkpoint's split")
    parser.add_argument("--ckpt-path")
    parser.add_argument("--model-dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.parity:
        if not (args.ckpt_path and args.model_dir):
            parser.error("--parity needs --ckpt-path and --model-dir")
        print(json.dumps(parity(args.ckpt_path, args.model_dir, args.split), indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="captioner-serving-") as workdir:
        def show(rows: list[dict]) -> None:
            for row in rows:
                print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)

        rows = serving_rows(args.quick, args.repeats, Path(workdir), report=show)
        show(rows[-4:] + serving_ratios(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
