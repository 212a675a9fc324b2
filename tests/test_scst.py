"""Self-critical sequence training: the sampler, the loss and baselines, and the SCST stage of
train.py (configs, refusal from random weights, rewards, val/cider, checkpoints)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner import run
from captioner.cider import DocumentFrequencies
from captioner.lit_module import CaptioningModule
from captioner.losses import new_self_critical_baseline, self_critical_loss
from conftest import compose, one_thread
from test_models import END, PAD, START, V, random_captions, tiny_captioner
from test_run import DATA_NAME, run_overrides, split_images, tb_events, train_with


# ---------------------------------------------------------------------- sampler
def _features(model, batch: int = 3):
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    return model.encode(images)


def test_samples_are_well_formed_and_reproducible():
    model = tiny_captioner().train()
    features = _features(model)
    torch.manual_seed(5)
    out = model.sample(features, num_samples=4, max_len=9)
    rows, steps = out.tokens.shape
    assert rows == 12 and steps <= 9
    assert out.log_probs.shape == out.mask.shape == out.entropy.shape == (rows, steps)
    real = out.tokens[out.mask]
    assert not ((real == PAD) | (real == START)).any()  # never sampled
    assert torch.equal(out.tokens[~out.mask], torch.full_like(out.tokens[~out.mask], PAD))
    lengths = out.mask.sum(1)
    for row, n in zip(out.tokens, lengths.tolist()):
        assert (row[:n - 1] != END).all() and (row[n - 1] == END or n == steps)  # stops at <end>
    assert (out.log_probs[out.mask] < 0).all() and (out.log_probs[~out.mask] == 0).all()
    assert (out.entropy[out.mask] > 0).all()
    assert len(set(map(tuple, out.tokens.tolist()))) > 1  # sampled, not one caption copied
    torch.manual_seed(5)
    again = model.sample(features, num_samples=4, max_len=9)
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.log_probs, out.log_probs)


def test_sample_log_probs_are_the_teacher_forced_log_probs_of_the_samples():
    """The policy's log-probs equal the teacher-forced decoder's on the same tokens (dropout
    off), and their gradient reaches the decoder and the image features."""
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    k = 3
    features = model.encode(images).detach().requires_grad_()
    out = model.sample(features, num_samples=k, max_len=8, temperature=1.0)
    lengths = out.mask.sum(1) + 1  # <start> + drawn tokens (incl. <end> when drawn)
    captions = torch.cat([torch.full((2 * k, 1), START), out.tokens], dim=1)
    forced = model(images, captions.view(2, k, -1), lengths.view(2, k))
    expected = forced.logits.index_fill(2, torch.tensor([PAD, START]), float("-inf")).log_softmax(-1)
    expected = expected.gather(2, forced.targets.clamp(max=V - 1)[..., None]).squeeze(2)
    torch.testing.assert_close(out.log_probs[:, :forced.mask.shape[1]][forced.mask], expected[forced.mask])
    out.log_probs.sum().backward()
    assert model.decoder.fc.weight.grad.abs().sum() > 0
    assert features.grad.abs().sum() > 0  # and through the features to a fine-tuned encoder


def test_greedy_sample_equals_greedy_search():
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        out = model.sample(model.encode(images), num_samples=1, max_len=10, greedy=True)
    words = [row[:n].tolist() for row, n in zip(out.tokens, out.mask.sum(1))]
    words = [w[:-1] if w and w[-1] == END else w for w in words]
    assert words == model.greedy(images, max_len=10)


def test_temperature_sharpens_the_distribution():
    model = tiny_captioner().train()
    features = _features(model)
    torch.manual_seed(0)
    cold = model.sample(features, num_samples=8, max_len=6, temperature=0.2)
    torch.manual_seed(0)
    hot = model.sample(features, num_samples=8, max_len=6, temperature=5.0)
    assert cold.entropy[:, 0].mean() < hot.entropy[:, 0].mean()


def test_sample_rejects_bad_arguments():
    model = tiny_captioner()
    with pytest.raises(ValueError, match="temperature"):
        model.sample(torch.zeros(1, 4, model.encoder.encoder_dim), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, P, D\)"):
        model.sample(torch.zeros(4, model.encoder.encoder_dim))


# ---------------------------------------------------------------------- loss and baselines
def test_new_self_critical_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    expected = torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]])
    torch.testing.assert_close(new_self_critical_baseline(rewards), expected)
    with pytest.raises(ValueError, match="K >= 2"):
        new_self_critical_baseline(torch.ones(3, 1))


def test_self_critical_loss_is_the_token_mean_of_advantage_times_log_prob():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantage = torch.tensor([2.0, -1.0])
    loss = self_critical_loss(log_probs, mask, advantage)
    assert loss.item() == pytest.approx(-(2.0 * -6.0 + -1.0 * -1.0) / 5)
    loss.backward()
    # Gradient descent raises the log-probs of samples that beat the baseline, lowers the others.
    assert (log_probs.grad[0] < 0).all() and (log_probs.grad[1, :2] > 0).all()
    assert log_probs.grad[1, 2] == 0


# ---------------------------------------------------------------------- module
def _module(**kwargs) -> CaptioningModule:
    words = ["<pad>", "a", "red", "circle", "blue", "square", "<unk>", "<start>", "<end>"]
    word_map = {w: i for i, w in enumerate(words)}
    return CaptioningModule(
        vocab_size=len(words), pad_id=0, unk_id=6, start_id=7, end_id=8,
        encoder={"arch": "resnet18", "pretrained": False, "last_stage": 1, "encoded_image_size": 2},
        decoder={"embed_dim": 8, "decoder_dim": 16, "attention_dim": 8, "dropout": 0.0},
        word_map=word_map, objective="scst",
        cider_document_frequencies=DocumentFrequencies.from_references([[[1, 2, 3]], [[1, 4, 5]]]),
        **kwargs)


@pytest.mark.parametrize("baseline", ["new_self_critical", "greedy"])
def test_scst_training_step_rewards_samples_and_logs(baseline, monkeypatch):
    module = _module(scst={"train_sample_n": 4, "max_len": 6, "baseline": baseline})
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    batch = {"images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "captions": random_captions([4, 5], 6).view(2, 1, 6), "lengths": torch.tensor([[4], [5]]),
             "references": [[["a", "red", "circle"]], [["a", "blue", "square", "zebra"]]],
             "image_ids": torch.tensor([0, 1])}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert {"train/loss", "train/reward", "train/baseline", "train/advantage", "train/sample_len",
            "train/entropy"} <= set(logged)
    assert float(logged["train/reward"]) >= 0 and float(logged["train/entropy"]) > 0
    if baseline == "new_self_critical":  # the other samples' mean: advantages sum to 0 per image
        assert float(logged["train/advantage"]) == pytest.approx(0.0, abs=1e-6)
        assert float(logged["train/baseline"]) == pytest.approx(float(logged["train/reward"]), abs=1e-6)
    assert module.captioner.decoder.training  # the greedy baseline restores train mode
    assert module.monitor == "val/cider"


def test_scst_step_under_bf16_autocast_has_fp32_log_probs_and_finite_gradients(monkeypatch):
    module = _module(scst={"train_sample_n": 3, "max_len": 5})
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    batch = {"images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "references": [[["a", "red", "circle"]], [["a", "blue", "square"]]]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = module.captioner.encode(batch["images"])
        samples = module.captioner.sample(features, num_samples=3, max_len=5)
        assert samples.log_probs.dtype == torch.float32
        loss = module.training_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in module.captioner.decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_scst_needs_references_and_document_frequencies():
    module = _module()
    batch = {"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="train_references=True"):
        module.training_step(batch, 0)
    module._cider = None
    with pytest.raises(RuntimeError, match="cider_document_frequencies"):
        module.training_step({**batch, "references": [[["a"]]]}, 0)
    with pytest.raises(ValueError, match="objective"):
        _module(scst=None).__class__(**{**_module().hparams, "objective": "rl"})
    with pytest.raises(ValueError, match="baseline"):
        _module(scst={"baseline": "mean"})
    with pytest.raises(ValueError, match="train_sample_n"):
        _module(scst={"train_sample_n": 1})


# ---------------------------------------------------------------------- train.py
def test_scst_refuses_random_weights(tmp_path):
    for overrides in (["experiment=quickstart_scst"], ["experiment=quickstart", "model.objective=scst"]):
        cfg = compose("train", run_overrides(tmp_path, tmp_path / "data", overrides))
        with pytest.raises(ValueError, match="init_from="):
            run.train(cfg)
    assert not (tmp_path / "data").exists()  # refused before touching any data


@pytest.fixture(scope="module")
def scst_run(tmp_path_factory):
    """A tiny quickstart (cross-entropy) run, then quickstart_scst from its best checkpoint."""
    root = tmp_path_factory.mktemp("scst")
    with one_thread():
        xe_cfg = compose("train", run_overrides(root, root / "data", [
            "trainer.max_epochs=2", "test_after_fit=false", "paths.output_dir=" + str(root / "xe")]))
        xe_metrics, _ = train_with(xe_cfg)
        best = root / "xe" / "checkpoints" / "best.ckpt"
        cfg = compose("train", run_overrides(root, root / "data", [
            "experiment=quickstart_scst", f"init_from={best}", "trainer.log_every_n_steps=1",
            "model.scst.max_len=10", "model.test_search.beam_size=2",
            "paths.output_dir=" + str(root / "scst")]))
        metrics, model = train_with(cfg)
    return {"root": root, "xe_metrics": xe_metrics, "metrics": metrics, "model": model,
            "run_dir": root / "scst", "xe_best": best}


def test_scst_run_selects_on_val_cider_and_logs_rewards(scst_run):
    metrics = scst_run["metrics"]
    assert scst_run["model"].objective == "scst"
    assert metrics["val/best_cider"] == pytest.approx(metrics["val/cider"])  # one epoch
    assert metrics["val/cider"] >= 0 and "test/cider" in metrics and "val/bleu4" in metrics
    saved = json.loads((scst_run["run_dir"] / "metrics.json").read_text())
    assert saved["best_checkpoint"].endswith("best.ckpt")
    tags = tb_events(scst_run["run_dir"] / "tensorboard").Tags()
    for key in ("train/reward", "train/baseline", "train/advantage", "train/sample_len",
                "train/entropy", "train/loss", "train/reward_epoch", "val/cider", "val/bleu4"):
        assert key in tags["scalars"], key
    # The train references' document frequencies are cached next to the prepared files.
    prepared = scst_run["root"] / "data" / "shapes" / "prepared"
    assert (prepared / f"TRAIN_CIDER_DF_{DATA_NAME}.npz").is_file()


def test_scst_changes_the_weights_and_the_checkpoint_captions_like_any_other(scst_run):
    xe = torch.load(scst_run["xe_best"], weights_only=True)["state_dict"]
    best = scst_run["run_dir"] / "checkpoints" / "best.ckpt"
    scst = torch.load(best, weights_only=True)["state_dict"]
    assert xe.keys() == scst.keys()
    assert any(not torch.equal(xe[k], scst[k]) for k in xe if k.startswith("captioner.decoder"))
    model = CaptioningModule.load_from_checkpoint(best, map_location="cpu").eval()
    images = split_images(scst_run["root"] / "data", 2)
    with torch.no_grad():
        hyps = model.captioner.generate(images, beam_size=2, max_len=10)
    assert len(hyps) == 2 and model.objective == "scst"


def test_train_references_reach_the_train_batches(scst_run):
    from captioner.data.datamodule import CaptionDataModule

    data = dict(dataset="shapes", data_folder=scst_run["root"] / "data" / "shapes" / "prepared",
                karpathy_json=scst_run["root"] / "data" / "shapes" / "dataset_shapes.json",
                image_folder=scst_run["root"] / "data" / "shapes", min_word_freq=1, max_len=20,
                image_size=64, batch_size=4, num_workers=2, persistent_workers=True)  # the shapes config's loader
    with_refs = CaptionDataModule(**data, train_references=True)
    with_refs.setup("fit")
    batch = next(iter(with_refs.train_dataloader()))
    assert len(batch["references"]) == 4 and all(len(r) == 5 for r in batch["references"])
    plain = CaptionDataModule(**data)
    plain.setup("fit")
    assert "references" not in next(iter(plain.train_dataloader()))
    df = plain.cider_document_frequencies()  # read from the cache the SCST run wrote
    assert df.num_documents == len(plain.datasets["train"])
    assert np.all(df.counts >= 1) and np.all(np.diff(df.keys) > 0)
