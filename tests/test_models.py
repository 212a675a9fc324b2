"""Properties of the model: encoder stages, attention, teacher forcing, checkpoints, search."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

from captioner.models import (AdditiveAttention, AttentionLSTMDecoder, Captioner,
                              CaptionerOutput, ImageEncoder, load_glove_embeddings)

V, E, H, A = 12, 8, 16, 8
PAD, START, END = 0, 10, 11


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_encoder(**kwargs) -> ImageEncoder:
    args = dict(arch="resnet18", encoded_image_size=2, pretrained=False, last_stage=2)
    args.update(kwargs)
    return ImageEncoder(**args)


def tiny_decoder(encoder_dim: int = 6, dropout: float = 0.0, **kwargs) -> AttentionLSTMDecoder:
    return AttentionLSTMDecoder(V, embed_dim=E, decoder_dim=H, attention_dim=A,
                                encoder_dim=encoder_dim, dropout=dropout, **kwargs)


def random_captions(lengths: list[int], num_tokens: int) -> torch.Tensor:
    """Rows ``<start> w.. <end> <pad>..`` with words in 1..9."""
    rows = torch.full((len(lengths), num_tokens), PAD)
    for n, length in enumerate(lengths):
        rows[n, 0] = START
        rows[n, 1:length - 1] = torch.randint(1, 10, (length - 2,))
        rows[n, length - 1] = END
    return rows


# ---------------------------------------------------------------------- attention
def test_attention_weights_are_a_distribution_and_context_is_their_average():
    att = AdditiveAttention(encoder_dim=6, decoder_dim=H, attention_dim=A)
    features, hidden = torch.randn(3, 5, 6), torch.randn(3, H)
    context, alpha = att(features, att.project(features), hidden)
    assert alpha.shape == (3, 5) and context.shape == (3, 6)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    torch.testing.assert_close(context, (alpha[:, :, None] * features).sum(1))

    mask = torch.tensor([[True, True, False, False, True]] * 3)
    _, masked = att(features, att.project(features), hidden, mask=mask)
    assert (masked[~mask] == 0).all()
    torch.testing.assert_close(masked.sum(1), torch.ones(3))


# ---------------------------------------------------------------------- encoder
@pytest.mark.parametrize("arch,last_stage,enc_size,dim", [
    ("resnet18", 1, 3, 64), ("resnet18", 2, 2, 128), ("resnet18", 3, 1, 256),
    ("resnet18", 4, 2, 512), ("resnet34", 4, 1, 512), ("resnet50", 4, 2, 2048),
    ("resnet50", 2, 3, 512), ("resnet101", 4, 2, 2048), ("resnet152", 3, 1, 1024),
])
def test_encoder_output_shape(arch, last_stage, enc_size, dim):
    enc = ImageEncoder(arch, encoded_image_size=enc_size, pretrained=False, last_stage=last_stage)
    enc.eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 32, 32))
    assert enc.encoder_dim == dim and enc.num_regions == enc_size ** 2
    assert out.shape == (2, enc_size ** 2, dim)
    assert len(enc.resnet) == 4 + last_stage


def test_encoder_flattens_in_raster_order():
    enc = tiny_encoder(encoded_image_size=3).eval()
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        grid = enc.adaptive_pool(enc.resnet(images))  # (1, D, 3, 3)
        out = enc(images)
    torch.testing.assert_close(out[0, 1 * 3 + 2], grid[0, :, 1, 2])


def test_cuda_graph_encoder_off_the_gpu_runs_eagerly_and_copies_cleanly():
    """``cuda_graph`` only acts on CUDA images (tests/test_gpu.py checks the replay): on the
    CPU the same features, nothing captured, the same state dict keys, and the module still
    deep-copies and pickles."""
    import copy
    import pickle

    plain = tiny_encoder().eval()
    graphed = tiny_encoder(cuda_graph=True).eval()
    graphed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(graphed(images), plain(images), rtol=0, atol=0)
    assert graphed._graphs == {} and graphed.state_dict().keys() == plain.state_dict().keys()
    graphed._graphs[("sentinel",)] = object()  # stands in for a captured graph
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert clone._graphs == {} and clone.cuda_graph
        torch.testing.assert_close(clone(images), plain(images), rtol=0, atol=0)
    graphed.float()  # a move or cast drops the captured graphs (they read the old memory)
    assert graphed._graphs == {}


def test_cuda_graph_on_a_fine_tuned_encoder_warns_that_it_has_no_effect(caplog):
    with caplog.at_level("WARNING", logger="captioner.models.encoder"):
        tiny_encoder(cuda_graph=True)
        tiny_encoder(cuda_graph=False, fine_tune=True)
        assert not caplog.records
        tiny_encoder(cuda_graph=True, fine_tune=True)
    assert "no effect while the encoder is fine-tuned" in caplog.text


def test_cuda_graph_encoder_keeps_one_capture_per_signature(monkeypatch):
    """The capture cache, on the CPU: a stand-in for the CUDA capture runs the trunk eagerly.
    One capture per (shape, dtype, autocast, inference mode), reused; at most 4, oldest out."""
    from captioner.models import encoder as encoder_module

    made = []

    class Capture:  # stands in for _CapturedForward: same call protocol, no CUDA
        def __init__(self, fn, example):
            self.fn = fn
            made.append(tuple(example.shape))

        def __call__(self, images):
            return self.fn(images).clone()

    monkeypatch.setattr(encoder_module, "_CapturedForward", Capture)
    monkeypatch.setattr(ImageEncoder, "_graphable", lambda self, images: self.cuda_graph)
    plain = tiny_encoder().eval()
    graphed = tiny_encoder(cuda_graph=True).eval()
    graphed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for b in (2, 2, 3, 2):
            images = torch.randn(b, 3, 32, 32)
            torch.testing.assert_close(graphed(images), plain(images), rtol=0, atol=0)
    assert made == [(2, 3, 32, 32), (3, 3, 32, 32)]
    with torch.inference_mode():
        graphed(torch.randn(2, 3, 32, 32))
    assert len(made) == 3 and len(graphed._graphs) == 3
    with torch.no_grad():
        for b in (4, 5):
            graphed(torch.randn(b, 3, 32, 32))
    assert len(graphed._graphs) == 4 and made[-1] == (5, 3, 32, 32)
    assert [key[0] for key in graphed._graphs] == [(3, 3, 32, 32), (2, 3, 32, 32),
                                                    (4, 3, 32, 32), (5, 3, 32, 32)]


def test_channels_last_computes_the_same_features():
    plain = tiny_encoder().eval()
    fast = tiny_encoder(channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), plain(images))
    assert fast.resnet[0].weight.is_contiguous(memory_format=torch.channels_last)


def randomise_batchnorm(encoder: ImageEncoder) -> ImageEncoder:
    """BatchNorm statistics and affine weights far from the identity init, so folding them
    into the convolutions is a real change of weights."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return encoder


def batchnorm_calls(encoder: ImageEncoder, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    from benchmarks.calls import CallCount

    with CallCount() as mode:
        out = encoder(images)
    return out, sum(n for name, n in mode.calls[mode.phase].items() if "batch_norm" in name)


@pytest.mark.parametrize("fine_tune,unfolded", [(False, 0), (True, 10)],
                         ids=["frozen", "fine-tuned-from-2"])
def test_folded_batchnorm_computes_the_same_features_and_gradients(fine_tune, unfolded):
    """``fold_batchnorm`` runs the frozen stages from a copy with each BatchNorm folded into its
    convolution: the plain trunk's features and trainable gradients up to float rounding,
    without the frozen stages' BatchNorm calls (resnet18 to layer3 has 15; stages 0-1, frozen
    when fine-tuning from 2, have 5); the state dict and parameters are the plain ones."""
    # Eval mode: BatchNorm on a batch of 2 would amplify the rounding differences.
    plain = randomise_batchnorm(tiny_encoder(last_stage=3, fine_tune=fine_tune,
                                             fold_batchnorm=False)).eval()
    folded = tiny_encoder(last_stage=3, fine_tune=fine_tune).eval()
    folded.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    expected, plain_calls = batchnorm_calls(plain, images)
    out, folded_calls = batchnorm_calls(folded, images)
    assert (plain_calls, folded_calls) == (15, unfolded)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if fine_tune:
        expected.square().sum().backward()
        out.square().sum().backward()
        trainable = [(n, p) for n, p in folded.named_parameters() if p.requires_grad]
        assert trainable
        for (name, p), q in zip(trainable, [p for p in plain.parameters() if p.requires_grad]):
            assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), name  # float rounding
    assert folded.state_dict().keys() == plain.state_dict().keys()
    assert len(list(folded.parameters())) == len(list(plain.parameters()))


def test_folded_batchnorm_follows_loaded_and_edited_weights():
    """The folded copy is rebuilt when the frozen weights change: loaded from a state dict or
    edited in place, parameters and statistics (their version counters); it is kept while
    nothing changes, and dropped by a move, a copy and a pickle."""
    import copy
    import pickle

    encoder = tiny_encoder(last_stage=3).eval()
    images = torch.randn(2, 3, 32, 32)
    encoder(images)
    other = randomise_batchnorm(tiny_encoder(last_stage=3, fold_batchnorm=False)).eval()
    encoder.load_state_dict(other.state_dict())
    torch.testing.assert_close(encoder(images), other(images), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for model in (encoder, other):
            model.resnet[1].running_var.mul_(4.0)
            model.resnet[4][0].conv1.weight.neg_()
    torch.testing.assert_close(encoder(images), other(images), rtol=1e-5, atol=1e-5)
    built = encoder._folded[(images.device, None)][0]
    encoder(images)
    assert encoder._folded[(images.device, None)][0] is built and len(encoder._folded) == 1
    for clone in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        assert clone._folded == {}
        torch.testing.assert_close(clone(images), other(images), rtol=1e-5, atol=1e-5)
    encoder.float()
    assert encoder._folded == {}


def test_folded_batchnorm_in_an_encoder_built_under_inference_mode():
    """Parameters created under ``torch.inference_mode()`` (a checkpoint loaded there) have no
    version counter: the folded copy is built once and gives the plain trunk's features."""
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        plain = randomise_batchnorm(tiny_encoder(last_stage=3, fold_batchnorm=False)).eval()
        folded = tiny_encoder(last_stage=3).eval()
        folded.load_state_dict(plain.state_dict())
        assert next(folded.parameters()).is_inference()
        torch.testing.assert_close(folded(images), plain(images), rtol=1e-5, atol=1e-5)
        built = folded._folded[(images.device, None)][0]
        folded(images)
        assert folded._folded[(images.device, None)][0] is built


def test_folded_batchnorm_under_autocast_keeps_weights_in_the_autocast_dtype():
    """Under (CPU) bf16 autocast the folded copy's weights are bf16 already, so no convolution
    casts its weight at each call (the plain trunk casts every convolution's weight at every
    call); the features stay within bf16 rounding of float32 (0.7% and 0.6% in norm)."""
    from benchmarks.calls import CallCount

    plain = randomise_batchnorm(tiny_encoder(last_stage=3, fold_batchnorm=False)).eval()
    folded = tiny_encoder(last_stage=3).eval()
    folded.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    exact = plain(images)
    casts, errors = [], []
    for model in (plain, folded):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)  # the first call builds the folded copy
            with CallCount() as mode:
                out = model(images)
        casts.append(mode.calls[mode.phase]["_to_copy"])
        assert out.dtype == torch.bfloat16
        errors.append(float((out.float() - exact).norm() / exact.norm()))
    convolutions = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert casts[0] >= convolutions and casts[1] <= 1  # the images' cast only
    assert errors[0] < 0.02 and errors[1] < 0.02, errors  # bf16 rounding, both ways


def _stage_params(enc: ImageEncoder, stage: int) -> list[nn.Parameter]:
    return [p for m in enc._stage_modules(stage) for p in m.parameters()]


@pytest.mark.parametrize("fine_tune,fine_tune_from,trainable", [
    (False, 2, []), (True, 2, [2, 3]), (True, 0, [0, 1, 2, 3]),
])
def test_gradients_reach_exactly_the_trainable_stages(fine_tune, fine_tune_from, trainable):
    encoder = tiny_encoder(last_stage=3, fine_tune=fine_tune, fine_tune_from=fine_tune_from)
    model = Captioner(encoder, tiny_decoder(encoder.encoder_dim), PAD, START, END).train()
    captions = random_captions([5, 4], 6).view(2, 1, 6)
    out = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), captions,
                torch.tensor([[5], [4]]))
    (out.logits.sum() + out.alphas.sum()).backward()
    for stage in range(4):
        for p in _stage_params(encoder, stage):
            if stage in trainable:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
            else:
                assert not p.requires_grad and p.grad is None
    for name, p in model.decoder.named_parameters():
        assert p.grad is not None, name
    assert encoder.frozen_stages() == [s for s in range(4) if s not in trainable]


def test_frozen_stages_keep_batchnorm_statistics_in_train_mode():
    enc = tiny_encoder(last_stage=3, fine_tune=True, fine_tune_from=2)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.train()
    enc(torch.randn(2, 3, 32, 32))
    after = enc.state_dict()
    frozen_prefixes = ("resnet.1.", "resnet.4.")  # bn1 (stage 0), layer1 (stage 1)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    checked = 0
    for key, value in before.items():
        if key.endswith(buffers):
            if key.startswith(frozen_prefixes):
                assert torch.equal(after[key], value), key
                checked += 1
            elif key.startswith(("resnet.5.", "resnet.6.")) and key.endswith("num_batches_tracked"):
                assert after[key] == value + 1, key  # trainable stages still update
    assert checked > 0
    assert not enc.resnet[1].training and not enc.resnet[4].training
    assert enc.resnet[5].training and enc.resnet[6].training


def test_set_fine_tune_switches_stages_after_construction():
    enc = tiny_encoder(last_stage=3)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.set_fine_tune(True, 3)
    assert all(p.requires_grad for p in _stage_params(enc, 3))
    assert not any(p.requires_grad for p in _stage_params(enc, 2))
    with pytest.raises(ValueError, match="fine_tune_from=4"):
        enc.set_fine_tune(True, 4)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module_prefix", "pre_0.4.1"])
def test_weights_path_loads_a_torchvision_state_dict(tmp_path, wrap):
    reference = torchvision.models.resnet18(weights=None).eval()
    state = reference.state_dict()
    if wrap == "pre_0.4.1":  # files saved before BatchNorm had num_batches_tracked (the tutorial's era)
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap != "raw":
        state = {wrap: state, "epoch": 3}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    enc = ImageEncoder("resnet18", encoded_image_size=2, pretrained=True, weights_path=path,
                       last_stage=3).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk = nn.Sequential(*list(reference.children())[:7])  # conv1 .. layer3
        expected = nn.functional.adaptive_avg_pool2d(trunk(images), 2).permute(0, 2, 3, 1)
        torch.testing.assert_close(enc(images), expected.flatten(1, 2))


def test_weights_path_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\")):
        ImageEncoder("resnet18", pretrained=False, weights_path=path)
    # A deeper arch of the same block type has every key of the shallower one, and more.
    deeper = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"resnet34.pth: the state dict has \d+ trunk key\(s\) this arch "
                                         r"does not.*layer1.2.*model.encoder.arch"):
        ImageEncoder("resnet18", pretrained=False, weights_path=deeper)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        ImageEncoder("resnet18", weights_path=tmp_path / "missing.pth")


def test_pretrained_without_network_explains_both_fixes(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as info:
        ImageEncoder("resnet101", pretrained=True)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet101-63fe2227.pth") in message
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in message
    assert "model.encoder.weights_path=" in message
    assert "network is unreachable" in message


def test_pretrained_reads_the_hub_cache_offline(tmp_path, monkeypatch):
    reference = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("must not download"))
    enc = ImageEncoder("resnet18", pretrained=True, last_stage=1)
    torch.testing.assert_close(enc.resnet[0].weight, reference.conv1.weight)
    torch.testing.assert_close(enc.resnet[4][1].conv2.weight, reference.layer1[1].conv2.weight)


# ---------------------------------------------------------------------- tutorial checkpoints
def test_tutorial_encoder_state_dict_loads_strictly_and_computes_the_same():
    # The tutorial's Encoder: resnet = Sequential(children()[:-2]), then pool + permute.
    resnet = torchvision.models.resnet18(weights=None)
    tutorial = nn.Module()
    tutorial.resnet = nn.Sequential(*list(resnet.children())[:-2])
    tutorial.adaptive_pool = nn.AdaptiveAvgPool2d((2, 2))
    tutorial.eval()
    ours = ImageEncoder("resnet18", encoded_image_size=2, pretrained=False).eval()
    ours.load_state_dict(tutorial.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tutorial.adaptive_pool(tutorial.resnet(images)).permute(0, 2, 3, 1)
        torch.testing.assert_close(ours(images), expected.reshape(2, 4, 512))


def test_tutorial_decoder_state_dict_loads_strictly():
    D = 6
    shapes = {  # DecoderWithAttention(attention_dim=A, embed_dim=E, decoder_dim=H, vocab_size=V, encoder_dim=D)
        "attention.encoder_att.weight": (A, D), "attention.encoder_att.bias": (A,),
        "attention.decoder_att.weight": (A, H), "attention.decoder_att.bias": (A,),
        "attention.full_att.weight": (1, A), "attention.full_att.bias": (1,),
        "embedding.weight": (V, E),
        "decode_step.weight_ih": (4 * H, E + D), "decode_step.weight_hh": (4 * H, H),
        "decode_step.bias_ih": (4 * H,), "decode_step.bias_hh": (4 * H,),
        "init_h.weight": (H, D), "init_h.bias": (H,), "init_c.weight": (H, D), "init_c.bias": (H,),
        "f_beta.weight": (D, H), "f_beta.bias": (D,), "fc.weight": (V, H), "fc.bias": (V,),
    }
    tutorial_state = {k: torch.randn(s) for k, s in shapes.items()}
    decoder = tiny_decoder(D)
    decoder.load_state_dict(tutorial_state, strict=True)
    for key, value in tutorial_state.items():
        assert torch.equal(decoder.state_dict()[key], value), key


def test_step_matches_the_papers_equations():
    decoder = tiny_decoder(6).eval()
    features, tokens = torch.randn(2, 5, 6), torch.tensor([START, 3])
    state = decoder.init_state(features)
    out = decoder.step(tokens, state, features, decoder.project(features))

    p = dict(decoder.named_parameters())
    lin = lambda x, name: x @ p[f"{name}.weight"].T + p[f"{name}.bias"]  # noqa: E731
    mean = features.mean(1)
    h0, c0 = lin(mean, "init_h"), lin(mean, "init_c")
    scores = lin(torch.relu(lin(features, "attention.encoder_att")
                            + lin(h0, "attention.decoder_att")[:, None]), "attention.full_att")
    alpha = scores.squeeze(2).softmax(1)
    context = torch.sigmoid(lin(h0, "f_beta")) * (alpha[:, :, None] * features).sum(1)
    x = torch.cat([p["embedding.weight"][tokens], context], 1)
    gates = (x @ p["decode_step.weight_ih"].T + p["decode_step.bias_ih"]
             + h0 @ p["decode_step.weight_hh"].T + p["decode_step.bias_hh"])
    i, f, g, o = gates.chunk(4, 1)
    c1 = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(c1)
    torch.testing.assert_close(out.alpha, alpha)
    torch.testing.assert_close(out.state.h, h1)
    torch.testing.assert_close(out.state.c, c1)
    torch.testing.assert_close(out.logits, lin(h1, "fc"))


def test_init_matches_the_tutorial():
    decoder = AttentionLSTMDecoder(500, embed_dim=64, decoder_dim=32, attention_dim=8,
                                   encoder_dim=6)
    assert decoder.embedding.weight.abs().max() <= 0.1
    assert decoder.embedding.weight.std() > 0.05  # uniform(-0.1, 0.1) has std 0.058
    assert decoder.fc.weight.abs().max() <= 0.1
    assert torch.equal(decoder.fc.bias, torch.zeros(500))


# ---------------------------------------------------------------------- teacher forcing
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_teacher_forcing_equals_feeding_step_token_by_token(autocast):
    """Also under (CPU) bf16 autocast, where the teacher-forced pass casts its weights once and
    groups its matrix products differently from :meth:`step` (one bf16 rounding apart: within
    1% of the largest logit, 0.05 here)."""
    decoder = tiny_decoder(6, dropout=0.5).eval()
    lengths = [6, 3, 5]
    captions = random_captions(lengths, 7)
    features = torch.randn(3, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if autocast:  # as the encoder gives them under autocast
            features = features.to(torch.bfloat16)
        out = decoder(features, captions, torch.tensor(lengths))
        projected = decoder.project(features)
        state = decoder.init_state(features)
        steps = []
        for t in range(5):
            steps.append(decoder.step(captions[:, t], state, features, projected))
            state = steps[-1].state
    assert out.logits.shape == (3, 5, V) and out.alphas.shape == (3, 5, 4)

    tolerance = dict(atol=5e-4, rtol=2e-2) if autocast else {}
    for t, step in enumerate(steps):
        for n, length in enumerate(lengths):
            if t < length - 1:
                torch.testing.assert_close(out.logits[n, t], step.logits[n], **tolerance)
                torch.testing.assert_close(out.alphas[n, t], step.alpha[n], **tolerance)
            else:  # past the caption: exactly zero, nothing computed
                assert (out.logits[n, t] == 0).all() and (out.alphas[n, t] == 0).all()


def stepwise_gradients(decoder, features, captions, lengths, weights, inputs, alpha_loss=True):
    """The loss of the teacher-forced tests, fed through :meth:`step` token by token: the
    plain path, differentiated by autograd."""
    real = torch.arange(weights.size(1))[None, :] < torch.tensor(lengths)[:, None] - 1  # (N, L)
    projected, state, loss = decoder.project(features), decoder.init_state(features), 0.0
    for t in range(weights.size(1)):
        step = decoder.step(captions[:, t], state, features, projected)
        state, keep = step.state, real[:, t, None]
        loss = loss + (step.logits * weights[:, t] * keep).sum()
        if alpha_loss:
            loss = loss + (step.alpha.square() * keep).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("fine_tuned,alpha_loss", [(True, True), (False, True), (True, False)],
                         ids=["features-and-alphas", "frozen-features", "no-alpha-loss"])
def test_teacher_forced_gradients_equal_feeding_step_token_by_token(fine_tuned, alpha_loss):
    """The teacher-forced loop regroups its matrix products (the hidden state's three in one,
    the tokens' part of the LSTM input for all steps at once) and has a backward pass of its
    own (every weight's gradient from one product over all steps): every parameter, and the
    features (a fine-tuned encoder's output), get the gradients of the plain step; also when
    the features need none (a frozen encoder) or the loss does not use the attention maps."""
    decoder = tiny_decoder(6)
    lengths = [6, 3, 5]
    captions = random_captions(lengths, 7)
    features = torch.randn(3, 4, 6, requires_grad=fine_tuned)
    weights = torch.randn(3, 5, V)  # a loss that reaches every real position
    inputs = [features] * fine_tuned + list(decoder.parameters())

    out = decoder(features, captions, torch.tensor(lengths))
    loss = (out.logits * weights).sum() + alpha_loss * out.alphas.square().sum()
    teacher_forced = torch.autograd.grad(loss, inputs)
    stepwise = stepwise_gradients(decoder, features, captions, lengths, weights, inputs,
                                  alpha_loss)

    names = ["features"] * fine_tuned + [name for name, _ in decoder.named_parameters()]
    for name, a, b in zip(names, teacher_forced, stepwise, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_teacher_forced_gradients_under_bf16_autocast_follow_float32():
    """Under (CPU) bf16 autocast the loop's backward pass runs in bf16 on the forward's bf16
    tensors: every gradient within 3% of the float32 plain path's, in norm (bf16 keeps 8 bits
    of mantissa; measured 0.2-2.1%, as autograd's backward of the same loop gives)."""
    decoder = tiny_decoder(6)
    lengths = [6, 3, 5]
    captions = random_captions(lengths, 7)
    features = torch.randn(3, 4, 6, requires_grad=True)
    weights = torch.randn(3, 5, V)
    inputs = [features, *decoder.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder(features.to(torch.bfloat16), captions, torch.tensor(lengths))
        loss = (out.logits.float() * weights).sum() + out.alphas.float().square().sum()
    assert out.logits.dtype == torch.bfloat16
    bf16 = torch.autograd.grad(loss, inputs)
    float32 = stepwise_gradients(decoder, features, captions, lengths, weights, inputs)

    names = ["features"] + [name for name, _ in decoder.named_parameters()]
    for name, a, b in zip(names, bf16, float32, strict=True):
        assert a.dtype == b.dtype == torch.float32, name
        if name == "attention.full_att.bias":  # 0 but for rounding: softmax ignores a shift
            assert a.abs().max() < 1e-3 and b.abs().max() < 1e-6
            continue
        assert (a - b).norm() <= 0.03 * b.norm(), (name, float((a - b).norm() / b.norm()))


def test_the_decoders_cuda_lstm_branch_computes_what_its_cpu_branch_does():
    """On CUDA the teacher-forced loop calls PyTorch's fused LSTM kernels, forward and backward.
    Sent down that branch on the CPU (``benchmarks.calls.cuda_lstm_path``), with the counter's
    CPU stand-ins for the two kernels (gates i, f, g, o in the workspace), the decoder's own
    calls of them give the CPU branch's outputs and gradients: their arguments are in place."""
    from benchmarks.calls import CallCount, cuda_lstm_path

    decoder = tiny_decoder(6)
    lengths = torch.tensor([6, 3, 5])
    captions, features = random_captions(lengths.tolist(), 7), torch.randn(3, 4, 6)
    outputs = []
    for branch in ("cpu", "cuda"):
        decoder.zero_grad()
        with cuda_lstm_path() if branch == "cuda" else contextlib.nullcontext(), \
                CallCount() as mode:
            out = decoder(features, captions, lengths)
            (out.logits.square().sum() + out.alphas.square().sum()).backward()
        called = sum(mode.calls[mode.phase][name] for name in ("_thnn_fused_lstm_cell",
                                                                "_thnn_fused_lstm_cell_backward_impl"))
        assert called == (2 * 5 if branch == "cuda" else 0)  # 5 steps, forward and backward
        outputs.append((out, [p.grad.clone() for p in decoder.parameters()]))
    (cpu, cpu_grads), (cuda, cuda_grads) = outputs
    torch.testing.assert_close(cuda.logits, cpu.logits)
    torch.testing.assert_close(cuda.alphas, cpu.alphas)
    for (name, _), a, b in zip(decoder.named_parameters(), cuda_grads, cpu_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_padding_a_longer_caption_into_the_batch_changes_nothing():
    decoder = tiny_decoder(6).eval()
    features = torch.randn(2, 4, 6)
    short = random_captions([4, 3], 5)
    alone = decoder(features, short, torch.tensor([4, 3]))
    long = random_captions([9], 10)
    padded = torch.cat([nn.functional.pad(short, (0, 5), value=PAD), long])
    batch = decoder(torch.cat([features, torch.randn(1, 4, 6)]), padded, torch.tensor([4, 3, 9]))
    torch.testing.assert_close(batch.logits[:2, :3], alone.logits)
    torch.testing.assert_close(batch.alphas[:2, :3], alone.alphas)
    assert (batch.logits[:2, 3:] == 0).all()


def test_permuting_the_batch_permutes_the_outputs():
    decoder = tiny_decoder(6).eval()
    lengths = torch.tensor([3, 7, 5, 7, 2])
    captions, features = random_captions(lengths.tolist(), 8), torch.randn(5, 4, 6)
    out = decoder(features, captions, lengths)
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = decoder(features[perm], captions[perm], lengths[perm])
    torch.testing.assert_close(permuted.logits, out.logits[perm])
    torch.testing.assert_close(permuted.alphas, out.alphas[perm])


def test_captions_per_image_equals_repeating_the_images():
    decoder = tiny_decoder(6).eval()
    lengths = torch.tensor([4, 6, 3, 5, 6, 2])
    captions, features = random_captions(lengths.tolist(), 6), torch.randn(2, 4, 6)
    shared = decoder(features, captions, lengths, captions_per_image=3)
    repeated = decoder(features.repeat_interleave(3, 0), captions, lengths)
    torch.testing.assert_close(shared.logits, repeated.logits)
    torch.testing.assert_close(shared.alphas, repeated.alphas)


def test_decoder_rejects_inconsistent_shapes():
    decoder = tiny_decoder(6)
    features, captions = torch.randn(2, 4, 6), random_captions([3, 3, 3], 4)
    with pytest.raises(ValueError, match="captions_per_image"):
        decoder(features, captions, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="lengths must lie in 2..T=4"):
        decoder(features[:1], captions[:2], torch.tensor([3, 5]), captions_per_image=2)


# ---------------------------------------------------------------------- embeddings
def test_glove_vectors_fill_known_words_and_others_keep_the_init(tmp_path, caplog):
    word_to_id = {"<pad>": 0, "cat": 1, "dog": 2, "zebra": 3, "<unk>": 4}
    path = tmp_path / "glove.txt"
    path.write_text("5 3\ncat 0.1 0.2 0.3\nbird 1 2 3\ndog -1 -2 -3.5 \ncat 9 9 9\n",
                    encoding="utf-8")
    with caplog.at_level("INFO"):
        emb = load_glove_embeddings(path, word_to_id, 3)
    assert emb.shape == (5, 3)
    torch.testing.assert_close(emb[1], torch.tensor([0.1, 0.2, 0.3]))  # first occurrence wins
    torch.testing.assert_close(emb[2], torch.tensor([-1.0, -2.0, -3.5]))
    assert emb[[0, 3, 4]].abs().max() <= 0.1 and emb[[0, 3, 4]].abs().sum() > 0
    assert "2 of 5 words" in caplog.text

    decoder = AttentionLSTMDecoder(5, embed_dim=3, decoder_dim=4, attention_dim=2, encoder_dim=2,
                                   pretrained_embeddings=emb, fine_tune_embeddings=False)
    assert torch.equal(decoder.embedding.weight, emb)
    assert not decoder.embedding.weight.requires_grad


@pytest.mark.parametrize("line", ["dog 1 2\n", "dog 1 2 3 4\n"])
def test_glove_vector_of_the_wrong_dimension_names_file_and_line(tmp_path, line):
    path = tmp_path / "glove.txt"
    path.write_text("cat 0.1 0.2 0.3\n" + line, encoding="utf-8")
    with pytest.raises(ValueError, match=r"glove\.txt, line 2: .* expected embed_dim=3"):
        load_glove_embeddings(path, {"<pad>": 0, "dog": 1}, 3)


# ---------------------------------------------------------------------- captioner
def tiny_captioner(**decoder_kwargs) -> Captioner:
    encoder = tiny_encoder(last_stage=1)
    return Captioner(encoder, tiny_decoder(encoder.encoder_dim, **decoder_kwargs), PAD, START, END)


def test_captioner_refuses_an_encoder_decoder_dimension_mismatch():
    with pytest.raises(ValueError, match="encoder_dim=64"):
        Captioner(tiny_encoder(last_stage=2), tiny_decoder(64), PAD, START, END)


def test_encode_treats_uint8_as_0_255_and_float_as_0_1():
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images), model.encode(images.float() / 255))
        normalised = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        torch.testing.assert_close(model.encode(images), model.encoder(normalised))
    assert "image_mean" not in model.state_dict()


def test_captioner_forward_runs_the_encoder_once_per_image():
    model = tiny_captioner().eval()
    calls = []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    lengths = torch.tensor([[4, 6, 3], [5, 2, 4]])
    captions = random_captions(lengths.flatten().tolist(), 7).view(2, 3, 7)
    out = model(images, captions, lengths)
    assert calls == [2]
    assert out.logits.shape == (6, 5, V) and out.alphas.shape == (6, 5, model.encoder.num_regions)
    assert torch.equal(out.targets, captions.view(6, 7)[:, 1:6])
    assert torch.equal(out.mask.sum(1), lengths.flatten() - 1)
    assert (out.targets[out.mask] != PAD).all() and (out.targets[~out.mask] == PAD).all()
    with torch.no_grad():
        per_image = model.decoder(model.encode(images).repeat_interleave(3, 0),
                                  captions.view(6, 7), lengths.flatten())
    torch.testing.assert_close(out.logits, per_image.logits)


def test_greedy_generation_follows_the_argmax_of_step():
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    hyps = model.generate(images, beam_size=1, max_len=6)
    assert len(hyps) == 2 and all(len(h) == 1 for h in hyps)
    with torch.no_grad():
        features = model.encode(images)
        projected = model.decoder.project(features)
        for b in range(2):
            state = model.decoder.init_state(features[b:b + 1])
            token, expected = torch.tensor([START]), []
            for _ in range(6):
                out = model.decoder.step(token, state, features[b:b + 1], projected[b:b + 1])
                logits = out.logits.clone()
                logits[:, [PAD, START]] = float("-inf")
                token, state = logits.argmax(1), out.state
                if token.item() == END:
                    break
                expected.append(token.item())
            assert hyps[b][0].tokens == expected


def test_beam_generation_returns_sorted_hypotheses_without_special_tokens():
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    beams = model.generate(images, beam_size=3, max_len=5, num_return=2)
    assert len(beams) == 3
    for hyps in beams:
        assert len(hyps) == 2 and hyps[0].score >= hyps[1].score
        for hyp in hyps:
            assert not {PAD, START, END} & set(hyp.tokens) and len(hyp.tokens) <= 5
    alone = model.generate(images[1:2], beam_size=3, max_len=5, num_return=2)
    assert [h.tokens for h in alone[0]] == [h.tokens for h in beams[1]]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_precomputed_features_give_what_images_give_without_another_encoder_pass(beam_size):
    """encode once, then forward_features and generate(features=): validation's one pass."""
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    lengths = torch.tensor([[4, 6, 3], [5, 2, 4]])
    captions = random_captions(lengths.flatten().tolist(), 7).view(2, 3, 7)
    with torch.no_grad():
        expected = model(images, captions, lengths)
        hyps = model.generate(images, beam_size=beam_size, max_len=6, num_return=beam_size)
        calls = []
        model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        features = model.encode(images)
        out = model.forward_features(features, captions, lengths)
        from_features = model.generate(features=features, beam_size=beam_size, max_len=6,
                                       num_return=beam_size)
        without_alphas = model.generate(features=features, beam_size=beam_size, max_len=6,
                                        num_return=beam_size, return_alphas=False)
    assert calls == [2]
    for name in CaptionerOutput._fields:
        assert torch.equal(getattr(out, name), getattr(expected, name)), name
    for per_image in (from_features, without_alphas):
        assert [[(h.tokens, h.score, h.finished) for h in hs] for hs in per_image] == \
            [[(h.tokens, h.score, h.finished) for h in hs] for hs in hyps]
    for a, b in zip(sum(from_features, []), sum(hyps, [])):
        assert a.alphas.shape == (a.length, model.encoder.num_regions)
        assert torch.equal(a.alphas, b.alphas)
    assert all(h.alphas is None for h in sum(without_alphas, []))


def test_generate_takes_images_or_features_not_both():
    model = tiny_captioner().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features = model.encode(images)
    for kwargs in ({}, {"images": images, "features": features}):
        with pytest.raises(ValueError, match="images .* or features .*exactly one"):
            model.generate(**kwargs)
    with pytest.raises(ValueError, match=r"features must be \(B, P, D\)"):
        model.generate(features=features[0])
    with pytest.raises(ValueError, match=r"features must be \(B, P, D\)"):
        model.forward_features(features[0], torch.zeros(2, 1, 4, dtype=torch.long),
                               torch.full((2, 1), 4))


def test_importing_models_needs_neither_lightning_nor_hydra():
    code = textwrap.dedent("""
        import sys
        for name in ("lightning", "pytorch_lightning", "hydra", "omegaconf"):
            sys.modules[name] = None
        try:
            import lightning
        except ImportError:
            pass
        else:
            raise SystemExit("blocking failed")
        import captioner.models, captioner.losses
        print(captioner.models.Captioner.__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Captioner"


@pytest.mark.slow
def test_tiny_model_overfits_four_images():
    from captioner.losses import caption_loss

    torch.manual_seed(0)
    model = tiny_captioner(dropout=0.0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    lengths = torch.tensor([[5], [4], [6], [3]])
    captions = random_captions(lengths.flatten().tolist(), 6).view(4, 1, 6)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    expected = [captions[b, 0, 1:lengths[b, 0] - 1].tolist() for b in range(4)]
    for step in range(1, 401):
        model.train()
        out = model(images, captions, lengths)
        loss = caption_loss(out.logits, out.targets, out.mask, out.alphas).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 and model.eval().greedy(images, max_len=10) == expected:
            break
    assert model.eval().greedy(images, max_len=10) == expected, f"loss {loss.item():.3f}"
