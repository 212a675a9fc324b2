"""CUDA checks: the same numbers on the GPU as on the CPU, and a bf16 run end to end.

Skipped without CUDA (CI has none); run them on a GPU machine with ``pytest -m gpu``.
Float32 comparisons turn TF32 off, so the GPU computes in full float32 like the CPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from captioner import run
from captioner.losses import caption_loss
from captioner.models import AttentionLSTMDecoder, Captioner, ImageEncoder
from conftest import compose, tiny_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V, PAD, START, END = 40, 0, 38, 39


@pytest.fixture
def float32_matmuls():
    """Full float32 matrix products and convolutions on the GPU for the duration of a test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_captioner(channels_last: bool = False, cuda_graph: bool = False) -> Captioner:
    encoder = ImageEncoder(arch="resnet18", encoded_image_size=4, pretrained=False, last_stage=2,
                           channels_last=channels_last, cuda_graph=cuda_graph)
    decoder = AttentionLSTMDecoder(V, embed_dim=32, decoder_dim=48, attention_dim=40,
                                   encoder_dim=encoder.encoder_dim, dropout=0.0)
    return Captioner(encoder, decoder, PAD, START, END).eval()


def batch(b: int = 3, k: int = 2, s: int = 64, t: int = 9):
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    lengths = torch.randint(3, t + 1, (b, k))
    captions = torch.full((b, k, t), PAD)
    for i in range(b):
        for j in range(k):
            n = int(lengths[i, j])
            captions[i, j, 0], captions[i, j, n - 1] = START, END
            captions[i, j, 1:n - 1] = torch.randint(1, START, (n - 2,))
    return images, captions, lengths


def test_teacher_forced_pass_on_cuda_equals_cpu(float32_matmuls):
    cpu = small_captioner()
    gpu = copy.deepcopy(cpu).cuda()
    images, captions, lengths = batch()
    with torch.no_grad():
        a, b = cpu(images, captions, lengths), gpu(images, captions, lengths)
    torch.testing.assert_close(b.logits.cpu(), a.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.alphas.cpu(), a.alphas, atol=1e-5, rtol=1e-4)
    assert torch.equal(b.mask.cpu(), a.mask) and torch.equal(b.targets.cpu(), a.targets)


def test_gradients_on_cuda_equal_cpu(float32_matmuls):
    cpu = small_captioner().train()
    gpu = copy.deepcopy(cpu).cuda()
    images, captions, lengths = batch()
    for model in (cpu, gpu):
        out = model(images, captions, lengths)
        caption_loss(out.logits, out.targets, out.mask, out.alphas).loss.backward()
    for (name, p), q in zip(cpu.decoder.named_parameters(), gpu.decoder.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_gradients_under_cuda_bf16_autocast_follow_float32(float32_matmuls):
    """The decoder's own backward pass on CUDA under bf16 autocast (the fused LSTM backward
    kernel, fp32 softmax): each decoder gradient within 5% of the CPU float32 one, in norm
    (3% holds on the CPU with bf16 autocast; the GPU's bf16 products round differently)."""
    cpu = small_captioner().train()
    gpu = copy.deepcopy(cpu).cuda()
    images, captions, lengths = batch()
    out = cpu(images, captions, lengths)
    caption_loss(out.logits, out.targets, out.mask, out.alphas).loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(images, captions, lengths)
        assert out.logits.dtype == torch.bfloat16
        caption_loss(out.logits.float(), out.targets, out.mask,
                     out.alphas.float()).loss.backward()
    for (name, p), q in zip(cpu.decoder.named_parameters(), gpu.decoder.parameters()):
        if name == "attention.full_att.bias":  # 0 but for rounding: softmax ignores a shift
            continue
        error = float((q.grad.cpu() - p.grad).norm() / p.grad.norm())
        assert error <= 0.05, (name, error)


def test_finite_loss_check_does_not_wait_for_the_gpu_unless_asked():
    """A loss still being computed is not waited for at the next step's check; a check that
    must wait (before validation or a checkpoint) reports it."""
    from captioner.lit_module import FiniteLossCheck

    check = FiniteLossCheck()
    torch.cuda._sleep(2_000_000_000)  # keeps the stream busy for about a second
    nan = torch.full((), float("nan"), device="cuda")
    check.add(nan, nan, nan, epoch=0, step=5)
    check.check(wait=False)  # the copy is still queued behind the sleep: no wait, no report
    with pytest.raises(FloatingPointError, match="at epoch 0, step 5"):
        check.check(wait=True)


def test_beam_search_on_cuda_picks_the_cpu_captions(float32_matmuls):
    cpu = small_captioner()
    with torch.no_grad():
        cpu.decoder.fc.weight.mul_(20.0)  # peaky distributions, so beams finish
    gpu = copy.deepcopy(cpu).cuda()
    images = batch(b=6)[0]
    for beam in (1, 3):
        a = cpu.generate(images, beam_size=beam, max_len=12, num_return=beam)
        b = gpu.generate(images, beam_size=beam, max_len=12, num_return=beam)
        assert [[h.tokens for h in hyps] for hyps in b] == [[h.tokens for h in hyps] for hyps in a]
        for ha, hb in zip(a, b):
            assert [h.score for h in hb] == pytest.approx([h.score for h in ha], abs=1e-3)


def test_channels_last_on_cuda_computes_the_same_features(float32_matmuls):
    plain = small_captioner().cuda()
    fast = small_captioner(channels_last=True).cuda()
    fast.load_state_dict(plain.state_dict())
    images = batch()[0].cuda()
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(images), plain.encode(images), atol=1e-4, rtol=1e-4)


def test_cuda_graph_encoder_replays_the_eager_features(float32_matmuls):
    """The frozen encoder's CUDA graph gives the eager features, for new images at every call
    (its input buffer is refreshed, earlier outputs are not overwritten), per input shape and
    autocast setting, and again after the model moves; a trainable encoder is not captured."""
    eager = small_captioner(channels_last=True).cuda()
    graphed = small_captioner(channels_last=True, cuda_graph=True).cuda()
    graphed.load_state_dict(eager.state_dict())
    first, second = batch(b=4)[0].cuda(), batch(b=4)[0].cuda()
    with torch.no_grad():
        out_first = graphed.encode(first)
        out_second = graphed.encode(second)
        torch.testing.assert_close(out_first, eager.encode(first), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_second, eager.encode(second), atol=1e-5, rtol=1e-5)
        assert len(graphed.encoder._graphs) == 1
        torch.testing.assert_close(graphed.encode(first[:2]), eager.encode(first[:2]),
                                   atol=1e-5, rtol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast, reference = graphed.encode(first), eager.encode(first)
        assert fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast, reference, atol=2e-2, rtol=2e-2)
        assert len(graphed.encoder._graphs) == 3
    with torch.inference_mode():  # as Lightning validates: a graph of its own
        torch.testing.assert_close(graphed.encode(second), eager.encode(second),
                                   atol=1e-5, rtol=1e-5)
    assert len(graphed.encoder._graphs) == 4
    with torch.no_grad():
        torch.testing.assert_close(graphed.encode(second), eager.encode(second),
                                   atol=1e-5, rtol=1e-5)
        graphed.cpu().cuda()
        assert graphed.encoder._graphs == {}
        torch.testing.assert_close(graphed.encode(second), eager.encode(second),
                                   atol=1e-5, rtol=1e-5)
        # Frozen statistics edited in place: the folded copy is rebuilt and the graphs over it
        # dropped, so replays see the edit.
        for model in (eager, graphed):
            model.encoder.resnet[1].running_var.mul_(4.0)
        torch.testing.assert_close(graphed.encode(second), eager.encode(second),
                                   atol=1e-5, rtol=1e-5)
        assert len(graphed.encoder._graphs) == 1
    graphed.encoder.set_fine_tune(True, 2)
    graphed.encoder._graphs.clear()
    graphed.encode(first)
    assert graphed.encoder._graphs == {}


def test_training_steps_with_a_cuda_graph_encoder_equal_eager(float32_matmuls):
    eager = small_captioner(channels_last=True).cuda().train()
    graphed = small_captioner(channels_last=True, cuda_graph=True).cuda().train()
    graphed.load_state_dict(eager.state_dict())
    for _ in range(2):  # the second step replays the graph captured by the first
        images, captions, lengths = batch()
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            out = model(images, captions, lengths)
            caption_loss(out.logits, out.targets, out.mask, out.alphas).loss.backward()
        for (name, p), q in zip(eager.decoder.named_parameters(), graphed.decoder.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert len(graphed.encoder._graphs) == 1


def test_bf16_autocast_stays_close_to_float32(float32_matmuls):
    model = small_captioner(channels_last=True).cuda()
    images, captions, lengths = batch(b=8, k=3)
    with torch.no_grad():
        exact = model(images, captions, lengths)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = model(images, captions, lengths)
    loss_exact = caption_loss(exact.logits, exact.targets, exact.mask, exact.alphas).loss
    loss_fast = caption_loss(fast.logits.float(), fast.targets, fast.mask, fast.alphas.float()).loss
    assert float(loss_fast) == pytest.approx(float(loss_exact), rel=2e-2)
    agree = (fast.logits.argmax(-1) == exact.logits.argmax(-1))[exact.mask].float().mean()
    assert agree > 0.9


def test_train_py_steps_do_not_wait_for_the_gpu(tmp_path):
    """Between an epoch's first and last batch, a train.py step (forward, loss, the non-finite
    check, backward, clipping, Adam, logging, callbacks, Lightning's end-of-batch metric
    handling and the next batch's transfer) makes no synchronising CUDA call, so the host
    queues the next step while the GPU runs this one: a step on one GPU is bound by the host.
    (The progress bar, which reads the loss at each refresh, refreshes only at the epoch's
    first and last batch here.) Each window runs from a batch's start to the next one's."""
    from lightning.pytorch import Callback
    from test_run import train_with

    checked = []

    class NoSync(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")  # the previous batch's window ends here
            if 0 < batch_idx < trainer.num_training_batches - 1:
                checked.append(batch_idx)
                torch.cuda.set_sync_debug_mode("error")

        def on_train_epoch_end(self, trainer, module):
            torch.cuda.set_sync_debug_mode("default")

    cfg = compose("train", tiny_overrides(tmp_path, num_train=64) + [
        "trainer=gpu", "trainer.devices=1", "trainer.benchmark=false", "trainer.max_epochs=1",
        "++trainer.log_every_n_steps=1000", "++trainer.limit_val_batches=1", "logger=none",
        "test_after_fit=false", "callbacks.progress_bar.min_refresh_interval=3600"])
    try:
        train_with(cfg, [NoSync()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked == list(range(1, 7))  # 64 images in batches of 8


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_train_and_evaluate_on_one_gpu_in_bf16(tmp_path, cuda_graph):
    """The quickstart on trainer=gpu (bf16-mixed, HDF5 read by 2 workers into pinned memory):
    finite loss, BLEU in range, float32 checkpoint; evaluate.py on the GPU reproduces the test
    BLEU-4 training reported. Also with the frozen encoder replayed as CUDA graphs (training,
    validation under inference mode, test and evaluate.py batches)."""
    cfg = compose("train", tiny_overrides(tmp_path) + [
        "trainer=gpu", "trainer.devices=1", "trainer.benchmark=false", "data.num_workers=2",
        "logger=csv"] + (["model.encoder.cuda_graph=true", "model.fine_tune_encoder=false"]
                         if cuda_graph else []))
    assert cfg.trainer.precision == "bf16-mixed"
    metrics = run.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    assert 0.0 <= metrics["test/bleu4"] <= 1.0
    run_dir = tmp_path / "outputs" / "run"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    assert {t.dtype for t in checkpoint["state_dict"].values() if t.is_floating_point()} \
        == {torch.float32}

    eval_cfg = compose("evaluate", [
        f"paths.output_root={tmp_path / 'outputs'}", f"paths.output_dir={tmp_path / 'eval'}",
        f"paths.data_dir={tmp_path / 'data'}", "trainer=gpu", "trainer.devices=1",
        "trainer.benchmark=false", f"batch_size={cfg.data.batch_size}", "coco_metrics=false",
        f"beam={cfg.model.test_search.beam_size}", f"max_len={cfg.model.test_search.max_len}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "data.num_workers=2"])
    summary = run.evaluate(eval_cfg)
    # Same weights, search, batches and kernels (no cuDNN autotuning): the same captions.
    assert summary["metrics"]["bleu4_nltk"] == pytest.approx(metrics["test/bleu4"], abs=1e-6)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["num_images"] == 16 and results["search"]["beam_size"] == summary["search"]["beam_size"]
