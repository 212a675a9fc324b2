"""ONNX export: the graphs match PyTorch (logits to 1e-4, the same captions through the same beam
search), take any batch size, run without PyTorch, and back ``caption backend=onnx``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from captioner.caption import caption, caption_images
from captioner.export import export
from captioner.onnx_model import CONFIG_FILE, STEP_OUTPUTS, OnnxCaptioner
from conftest import compose
from test_caption import save_checkpoint, write_good_images
from test_serve import varied_model

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint (ResNet-18 up to layer1) exported by ``captioner.export.export``;
    yields (model, checkpoint, export folder, output root)."""
    root = tmp_path_factory.mktemp("export")
    model = varied_model(last_stage=1)
    ckpt = save_checkpoint(model, root / "model.ckpt")
    cfg = compose("export", [f"ckpt_path={ckpt}", f"paths.output_root={root / 'outputs'}",
                             f"paths.output_dir={root / 'outputs' / 'export' / 'run'}"])
    out = export(cfg)
    return model, ckpt, out, root / "outputs"


def images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, S, S) uint8: a random colour per image plus noise (plain noise looks alike to the
    tiny encoder, so every image would get one caption)."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, 256, (n, 3, 1, 1), generator=generator).float()
    noise = torch.randint(-40, 41, (n, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator).float()
    return (colour + noise).clamp(0, 255).to(torch.uint8)


def test_export_writes_the_files_and_points_latest_at_them(exported):
    model, ckpt, out, output_root = exported
    assert (output_root / "export" / "latest").resolve() == out.resolve()
    config = json.loads((out / CONFIG_FILE).read_text())
    word_map = model.word_map
    assert config["source"] == str(ckpt) and config["image_size"] == IMAGE_SIZE
    assert (config["start_id"], config["end_id"], config["vocab_size"]) == (word_map.start_id, word_map.end_id,
                                                                           len(word_map))
    assert config["banned_ids"] == [word_map.pad_id, word_map.start_id]
    assert config["search"] == {"beam_size": 5, "max_len": 50, "length_penalty": 0.0}
    assert json.loads((out / config["files"]["word_map"]).read_text()) == word_map.to_dict()
    onnx_model = OnnxCaptioner(out)
    for session in (onnx_model.encoder, onnx_model.init, onnx_model.step):  # dynamic batch everywhere
        assert all(isinstance(i.shape[0], str) for i in session.get_inputs())
        assert all(isinstance(o.shape[0], str) for o in session.get_outputs())
    assert onnx_model.encoder.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in onnx_model.step.get_outputs()] == STEP_OUTPUTS


@pytest.mark.parametrize("batch", [1, 5])
@torch.no_grad()
def test_graphs_match_pytorch_step_by_step(exported, batch):
    model, _, out, _ = exported
    onnx_model = OnnxCaptioner(out, threads=1)
    captioner = model.captioner
    pixels = images(batch, seed=batch)
    features = captioner.encode(pixels)
    np.testing.assert_allclose(onnx_model.encode(pixels), features.numpy(), atol=1e-4)
    projected = captioner.decoder.project(features)
    state = captioner.decoder.init_state(features)
    h, c, onnx_projected = onnx_model.init.run(None, {"features": features.numpy()})
    np.testing.assert_allclose(onnx_projected, projected.numpy(), atol=1e-4)
    tokens = torch.full((batch,), captioner.start_id)
    for _ in range(4):  # from the same state each step: the step graph alone
        out_t = captioner.decoder.step(tokens, state, features, projected)
        log_probs, h_next, c_next, alpha, logits = onnx_model.step.run(None, {
            "tokens": tokens.numpy(), "h": state.h.numpy(), "c": state.c.numpy(),
            "features": features.numpy(), "projected": projected.numpy()})
        np.testing.assert_allclose(logits, out_t.logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(h_next, out_t.state.h.numpy(), atol=1e-5)
        np.testing.assert_allclose(c_next, out_t.state.c.numpy(), atol=1e-5)
        np.testing.assert_allclose(alpha, out_t.alpha.numpy(), atol=1e-5)
        # log_probs: the search's masked log-softmax (<pad> and <start> never generated).
        banned = [captioner.pad_id, captioner.start_id]
        assert np.isneginf(log_probs[:, banned]).all()
        expected = out_t.logits.index_fill(1, torch.tensor(banned), float("-inf")).log_softmax(-1)
        keep = np.isfinite(expected.numpy())
        np.testing.assert_allclose(log_probs[keep], expected.numpy()[keep], atol=1e-4)
        state, tokens = out_t.state, out_t.logits.argmax(1)


@pytest.mark.parametrize("beam", [1, 3])
def test_onnx_beam_search_gives_pytorchs_captions(exported, beam):
    model, _, out, _ = exported
    onnx_model = OnnxCaptioner(out, threads=1)
    pixels = images(6, seed=11)
    want = model.captioner.generate(pixels, beam_size=beam, max_len=8, num_return=beam)
    got = onnx_model.generate(pixels, beam_size=beam, max_len=8, num_return=beam)
    assert len({tuple(h[0].tokens) for h in want}) > 1  # the images get different captions
    for want_hyps, got_hyps in zip(want, got):
        assert [h.tokens for h in got_hyps] == [h.tokens for h in want_hyps]
        assert [h.finished for h in got_hyps] == [h.finished for h in want_hyps]
        np.testing.assert_allclose([h.score for h in got_hyps], [h.score for h in want_hyps], atol=1e-4)
        np.testing.assert_allclose(got_hyps[0].alphas.numpy(), want_hyps[0].alphas.numpy(), atol=1e-5)


def test_caption_cli_with_backend_onnx_prints_the_pytorch_captions(exported, tmp_path, capsys):
    model, ckpt, out, output_root = exported
    files = write_good_images(tmp_path / "images")
    common = [f"image={tmp_path / 'images'}", f"paths.output_root={output_root}", "beam=3", "max_len=8",
              "attention=false"]
    assert caption(compose("caption", [*common, f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'pt'}"])) == 0
    torch_out = capsys.readouterr().out
    # model_dir left out: the latest export under paths.output_root.
    assert caption(compose("caption", [*common, "backend=onnx", f"output_dir={tmp_path / 'onnx'}"])) == 0
    captured = capsys.readouterr()
    assert f"Captioning with {out}" in captured.err or "export/latest" in captured.err
    assert captured.out == torch_out and len(captured.out.splitlines()) == len(files)
    onnx_results = list(caption_images(OnnxCaptioner(out), files, IMAGE_SIZE, beam_size=3, max_len=8))
    assert [r.caption for r in onnx_results] == [line.split(": ", 1)[1] if ": " in line else ""
                                                 for line in torch_out.splitlines()]


def test_an_unfinished_export_is_refused_with_the_fix(exported, tmp_path):
    _, _, out, _ = exported
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "encoder.onnx").write_bytes((out / "encoder.onnx").read_bytes())
    with pytest.raises(FileNotFoundError, match="not a finished export; run python -m captioner.export"):
        OnnxCaptioner(partial)
    with pytest.raises(ValueError, match="backend='tensorflow'"):
        caption(compose("caption", [f"image={partial}", "backend=tensorflow"]))


NO_TORCH_LOOP = r'''
import builtins, json, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ImportError("PyTorch is blocked in this process")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import numpy as np
import onnxruntime as ort
folder, images_file, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = json.load(open(f"{folder}/captioner.json"))
run = {name: ort.InferenceSession(f"{folder}/{config['files'][name]}").run
       for name in ("encoder", "decoder_init", "decoder_step")}
images = np.load(images_file)
features, = run["encoder"](None, {"images": images})
h, c, projected = run["decoder_init"](None, {"features": features})
tokens = np.full(len(images), config["start_id"], dtype=np.int64)
done = np.zeros(len(images), dtype=bool)
captions = [[] for _ in images]
for _ in range(max_len):  # greedy search: the most likely token each step
    log_probs, h, c, alpha, logits = run["decoder_step"](None, {
        "tokens": tokens, "h": h, "c": c, "features": features, "projected": projected})
    tokens = log_probs.argmax(axis=1)
    for i, token in enumerate(tokens):
        if not done[i] and token != config["end_id"]:
            captions[i].append(int(token))
    done |= tokens == config["end_id"]
    if done.all():
        break
print(json.dumps(captions))
'''


def test_the_graphs_run_without_pytorch(exported, tmp_path):
    """A greedy loop over the three graphs with numpy and ONNX Runtime only, torch blocked,
    gives the greedy captions of the PyTorch model."""
    model, _, out, _ = exported
    pixels = images(4, seed=3)
    np.save(tmp_path / "images.npy", pixels.numpy())
    (tmp_path / "loop.py").write_text(NO_TORCH_LOOP)
    proc = subprocess.run([sys.executable, str(tmp_path / "loop.py"), str(out), str(tmp_path / "images.npy"),
                           "8"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = [h[0].tokens for h in model.captioner.generate(pixels, beam_size=1, max_len=8)]
    assert json.loads(proc.stdout) == want
