"""Importing the tutorial's pickled checkpoint: safe loading, detection, and an exact round trip.

The "tutorial" here is ``tests/tutorial_models/models.py`` (our re-implementation with the
tutorial's class names and math), imported as top-level ``models`` so that the checkpoint is
pickled with the tutorial's globals ``models.Encoder`` / ``models.DecoderWithAttention``.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from captioner.convert_tutorial import (UnsafeCheckpointError, convert, detect_resnet_arch,
                                        load_tutorial_checkpoint, main)
from captioner.data.datamodule import DATASETS
from captioner.data.images import load_image
from captioner.lit_module import CaptioningModule
from captioner.vocab import WordMap

TUTORIAL_MODELS = Path(__file__).parent / "tutorial_models"
REPO = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CAPTIONS = [["a", "red", "square", "on", "a", "grey", "field"], ["two", "blue", "circles"]]
IMAGE_SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine two
    spinning OpenMP threads make each step ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    sys.path.insert(0, str(TUTORIAL_MODELS))
    try:
        yield importlib.import_module("models")
    finally:
        sys.path.remove(str(TUTORIAL_MODELS))
        sys.modules.pop("models", None)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the tutorial's input: /255 then ImageNet mean/std."""
    return (images.float() / 255.0 - MEAN) / STD


def encode_captions(word_map: WordMap, max_len: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    captions = torch.tensor([word_map.encode(c, max_len) for c in CAPTIONS])  # (2, T)
    lengths = torch.tensor([len(c) + 2 for c in CAPTIONS])  # (2,)
    return captions, lengths


@pytest.fixture(scope="module")
def tutorial(models, tmp_path_factory):
    """A trained-to-overfit tutorial model pickled in the tutorial's exact checkpoint form."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tutorial")
    word_map = WordMap.build(CAPTIONS, 1)
    word_map.save(folder / "WORDMAP_coco_5_cap_per_img_5_min_word_freq.json")
    images = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    images[0, 0, 8:40, 8:40] = 220  # a red square
    images[1, 2, 30:60, 5:30] = 200  # something blue
    images += torch.randint(0, 30, images.shape, dtype=torch.uint8)

    encoder = models.Encoder(encoded_image_size=2, arch="resnet18")
    with torch.no_grad():  # move the BatchNorm running statistics away from their defaults
        encoder.train()(normalise(torch.randint(0, 255, (4, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)))
    encoder.eval()
    decoder = models.DecoderWithAttention(attention_dim=16, embed_dim=16, decoder_dim=32,
                                          vocab_size=len(word_map), encoder_dim=512, dropout=0.1)
    encoder_optimizer = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
    decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=5e-3)
    captions, lengths = encode_captions(word_map)
    with torch.no_grad():
        features = encoder(normalise(images))
    for _ in range(150):  # the tutorial's training step, decoder only
        scores, sorted_caps, decode_lengths, alphas, _ = decoder(features, captions, lengths[:, None])
        targets = sorted_caps[:, 1:]
        mask = torch.arange(scores.size(1))[None] < torch.tensor(decode_lengths)[:, None]
        loss = F.cross_entropy(scores[mask], targets[:, :scores.size(1)][mask])
        decoder_optimizer.zero_grad()
        loss.backward()
        decoder_optimizer.step()
    decoder.eval()
    checkpoint = {"epoch": 7, "epochs_since_improvement": 2, "bleu-4": 0.31, "encoder": encoder,
                  "decoder": decoder, "encoder_optimizer": encoder_optimizer,
                  "decoder_optimizer": decoder_optimizer}
    path = folder / "BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar"
    torch.save(checkpoint, path)
    return {"folder": folder, "path": path, "word_map": word_map, "images": images, "encoder": encoder,
            "decoder": decoder, "word_map_path": folder / "WORDMAP_coco_5_cap_per_img_5_min_word_freq.json"}


@pytest.fixture(scope="module")
def converted(tutorial):
    out = tutorial["folder"] / "converted.ckpt"
    rc = main([str(tutorial["path"]), str(tutorial["word_map_path"]), str(out),
               "--data-folder", str(tutorial["folder"]), "--image-size", str(IMAGE_SIZE)])
    assert rc == 0
    model = CaptioningModule.load_from_checkpoint(out, map_location="cpu", weights_only=True)
    return out, model.eval()


def tutorial_beam_search(encoder, decoder, image: torch.Tensor, word_map: WordMap, beam_size: int,
                         max_len: int = 20) -> list[int]:
    """The tutorial's caption_image_beam_search loop (k beams shrink as they finish), one image.

    Like our ``Captioner.generate`` it never emits <pad>/<start> (the tutorial does not mask them).
    Returns the best finished sequence without <start>/<end>.
    """
    k, vocab_size = beam_size, len(word_map)
    encoder_out = encoder(image[None])
    encoder_out = encoder_out.view(1, -1, encoder_out.size(-1)).expand(k, -1, -1)  # (k, P, D)
    prev_words = torch.full((k,), word_map.start_id)
    seqs = prev_words[:, None]
    top_scores = torch.zeros(k, 1)
    complete, complete_scores = [], []
    h, c = decoder.init_hidden_state(encoder_out)
    for step in range(1, max_len + 1):
        weighted, _ = decoder.attention(encoder_out, h)
        weighted = decoder.sigmoid(decoder.f_beta(h)) * weighted
        h, c = decoder.decode_step(torch.cat([decoder.embedding(prev_words), weighted], dim=1), (h, c))
        logits = decoder.fc(h)
        logits[:, [word_map.pad_id, word_map.start_id]] = float("-inf")
        scores = top_scores.expand_as(logits) + F.log_softmax(logits, dim=1)
        flat = scores[0] if step == 1 else scores.view(-1)
        best_scores, best_words = flat.topk(k)
        prev_inds = torch.div(best_words, vocab_size, rounding_mode="floor")
        next_words = best_words % vocab_size
        seqs = torch.cat([seqs[prev_inds], next_words[:, None]], dim=1)
        incomplete = [i for i, w in enumerate(next_words.tolist()) if w != word_map.end_id]
        for i in sorted(set(range(len(next_words))) - set(incomplete)):
            complete.append(seqs[i].tolist())
            complete_scores.append(float(best_scores[i]))
        k = len(incomplete)
        if k == 0:
            break
        seqs = seqs[incomplete]
        keep = prev_inds[incomplete]
        h, c, encoder_out = h[keep], c[keep], encoder_out[keep]
        top_scores = best_scores[incomplete][:, None]
        prev_words = next_words[incomplete]
    assert complete, "no beam finished: the test model did not learn to emit <end>"
    best = complete[max(range(len(complete)), key=complete_scores.__getitem__)]
    return best[1:-1]


# ----------------------------------------------------------------------------- the result
def test_converted_checkpoint_is_weights_only_and_describes_the_model(tutorial, converted):
    out, model = converted
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    assert hp["encoder"]["arch"] == "resnet18"
    assert hp["encoder"]["encoded_image_size"] == 2
    assert hp["encoder"]["pretrained"] is False
    assert hp["decoder"] == {"embed_dim": 16, "decoder_dim": 32, "attention_dim": 16, "dropout": 0.1}
    assert hp["vocab_size"] == len(tutorial["word_map"])
    assert hp["fine_tune_encoder"] is True  # the tutorial saved an encoder optimiser
    assert WordMap.from_dict(checkpoint["word_map"]) == tutorial["word_map"]
    data = checkpoint["config"]["data"]
    assert data["_target_"] == "captioner.data.datamodule.CaptionDataModule"
    assert (data["dataset"], data["captions_per_image"], data["min_word_freq"]) == ("coco", 5, 5)
    assert data["image_size"] == IMAGE_SIZE and data["data_folder"] == str(tutorial["folder"])
    assert checkpoint["tutorial"]["epoch"] == 7 and checkpoint["tutorial"]["bleu4"] == pytest.approx(0.31)
    assert "pytorch-lightning_version" in checkpoint
    # every tutorial tensor arrived under the captioner. prefix, unchanged
    ours = model.state_dict()
    for prefix, module in (("captioner.encoder.", tutorial["encoder"]), ("captioner.decoder.", tutorial["decoder"])):
        for key, value in module.state_dict().items():
            assert torch.equal(ours[prefix + key], value), key
    assert ours["captioner.encoder.resnet.1.running_mean"].abs().sum() > 0  # BN stats, not defaults


def test_round_trip_teacher_forcing_logits_match_the_tutorial_modules(tutorial, converted):
    _, model = converted
    captions, lengths = encode_captions(tutorial["word_map"])
    images = tutorial["images"]
    with torch.no_grad():
        ours = model.captioner(images, captions[:, None], lengths[:, None])
        features = tutorial["encoder"](normalise(images))
        predictions, _, decode_lengths, alphas, sort_ind = tutorial["decoder"](features, captions, lengths[:, None])
    unsorted = torch.empty_like(predictions)
    unsorted[sort_ind] = predictions
    unsorted_alphas = torch.empty_like(alphas)
    unsorted_alphas[sort_ind] = alphas
    assert ours.logits.shape == unsorted.shape
    torch.testing.assert_close(ours.logits, unsorted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.alphas, unsorted_alphas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_round_trip_beam_captions_match_the_tutorial_search(tutorial, converted, beam_size):
    _, model = converted
    word_map, images = tutorial["word_map"], tutorial["images"]
    hyps = model.captioner.generate(images, beam_size=beam_size, max_len=20)
    with torch.no_grad():
        expected = [tutorial_beam_search(tutorial["encoder"], tutorial["decoder"], image, word_map, beam_size)
                    for image in normalise(images)]
    assert [h[0].tokens for h in hyps] == expected
    assert all(h[0].finished for h in hyps)
    assert [word_map.decode(t) for t in expected] == CAPTIONS  # the model learned its two captions


def test_converted_checkpoint_captions_files_like_the_tutorial(tutorial, converted, tmp_path):
    from captioner.caption import caption_images

    _, model = converted
    path = tmp_path / "square.png"
    from PIL import Image

    Image.fromarray(tutorial["images"][0].permute(1, 2, 0).numpy()).resize((150, 90)).save(path)
    (result,) = caption_images(model, [path], image_size=model.run_config["data"]["image_size"], beam_size=3)
    pixels = torch.from_numpy(load_image(path, IMAGE_SIZE))
    with torch.no_grad():
        expected = tutorial_beam_search(tutorial["encoder"], tutorial["decoder"], normalise(pixels[None])[0],
                                        tutorial["word_map"], 3)
    assert result.ok and result.tokens == expected


def prepare_tutorial_files(tutorial, tmp_path: Path, dataset: str = "coco") -> Path:
    """The tutorial model's two images as a prepared ``dataset`` folder (3 train, 1 val, 1 test
    image; min_word_freq 1); returns the folder, whose word map is the tutorial's."""
    from PIL import Image

    from captioner.data.preprocess import create_input_files

    raw = tmp_path / "raw"
    raw.mkdir()
    entries = []
    for i, (split, which) in enumerate([("train", 0), ("train", 1), ("val", 1), ("test", 0)]):
        Image.fromarray(tutorial["images"][which].permute(1, 2, 0).numpy()).save(raw / f"{i}.png")
        tokens = CAPTIONS[which]
        entries.append({"filename": f"{i}.png", "split": split, "cocoid": 100 + i,
                        "sentences": [{"tokens": tokens, "raw": " ".join(tokens)}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"dataset": dataset, "images": entries}))
    prepared = tmp_path / "prepared"
    result = create_input_files(dataset, tmp_path / "karpathy.json", raw, captions_per_image=5, min_word_freq=1,
                                output_folder=prepared, max_len=8, image_size=IMAGE_SIZE, num_workers=0,
                                progress=False)
    assert WordMap.load(result.word_map_path) == tutorial["word_map"]
    return prepared


def test_evaluate_scores_the_converted_checkpoint_on_prepared_files(tutorial, tmp_path, monkeypatch):
    """evaluate.py on the converted checkpoint, data found through its stored data config."""
    from captioner.run import evaluate
    from conftest import compose

    prepared = prepare_tutorial_files(tutorial, tmp_path)
    word_map = prepared / "WORDMAP_coco_5_cap_per_img_1_min_word_freq.json"
    out = tmp_path / "tutorial.ckpt"
    assert main([str(tutorial["path"]), str(word_map), str(out), "--data-folder", str(prepared),
                 "--min-word-freq", "1", "--image-size", str(IMAGE_SIZE)]) == 0

    stored = torch.load(out, weights_only=True)["config"]["data"]
    assert (stored["karpathy_json"], stored["image_folder"]) == (None, None)
    # The README's raw COCO layout under the working directory: the converted checkpoint's data
    # is the prepared folder only, which is never rebuilt (it was: a fingerprint conflict).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "coco" / "images").mkdir(parents=True)
    (tmp_path / "data" / "coco" / "dataset_coco.json").write_text('{"images": []}')
    before = {f: f.stat().st_mtime_ns for f in prepared.iterdir()}
    cfg = compose("evaluate", [f"ckpt_path={out}", "trainer=cpu", "coco_metrics=false", "beam=3",
                               "batch_size=2", "++data.num_workers=0", f"paths.output_root={tmp_path / 'outputs'}",
                               f"paths.output_dir={tmp_path / 'outputs' / 'eval'}",
                               "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"])
    summary = evaluate(cfg)
    assert summary["num_images"] == 1
    assert summary["metrics"]["bleu4_nltk"] == pytest.approx(1.0)  # it reproduces its 7-word test caption
    assert {f: f.stat().st_mtime_ns for f in prepared.iterdir()} == before
    # Converted before a6f9d23: the raw paths stored are the README's; evaluate ignores them.
    old = torch.load(out, weights_only=True)
    old["config"]["data"].update(karpathy_json="data/coco/dataset_coco.json", image_folder="data/coco/images")
    torch.save(old, tmp_path / "old.ckpt")
    cfg.ckpt_path = str(tmp_path / "old.ckpt")
    assert evaluate(cfg)["metrics"] == summary["metrics"]
    assert {f: f.stat().st_mtime_ns for f in prepared.iterdir()} == before


def printed_evaluate_command(tutorial, tmp_path: Path, capsys, dataset: str) -> tuple[Path, list[str]]:
    """Convert the tutorial model for ``dataset`` files; the checkpoint and the printed
    ``python evaluate.py ...`` command, split as a shell would."""
    prepared = prepare_tutorial_files(tutorial, tmp_path, dataset)
    word_map = prepared / f"WORDMAP_{dataset}_5_cap_per_img_1_min_word_freq.json"
    out = tmp_path / "my model.ckpt"  # a space: the printed command quotes its arguments
    assert main([str(tutorial["path"]), str(word_map), str(out), "--data-folder", str(prepared),
                 "--dataset", dataset, "--min-word-freq", "1", "--image-size", str(IMAGE_SIZE),
                 "--max-len", "8"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Evaluate: ")]
    command = shlex.split(line.removeprefix("Evaluate: "))
    assert command[:2] == ["python", "evaluate.py"]
    return out, command


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_printed_evaluate_command_scores_every_dataset(tutorial, tmp_path, capsys, dataset):
    """The printed command's overrides score the converted checkpoint for every ``--dataset`` the
    converter accepts (shapes failed: its raw paths could not be null); other names are refused."""
    from captioner.run import evaluate
    from conftest import compose

    out, command = printed_evaluate_command(tutorial, tmp_path, capsys, dataset)
    summary = evaluate(compose("evaluate", command[2:] + [  # in this process, without the COCO scorers
        "trainer=cpu", "coco_metrics=false", f"paths.output_root={tmp_path / 'outputs'}",
        f"paths.output_dir={tmp_path / 'outputs' / 'eval'}", "++trainer.enable_progress_bar=false"]))
    assert summary["num_images"] == 1 and summary["checkpoint"] == str(out)
    assert summary["metrics"]["bleu4_nltk"] == pytest.approx(1.0)
    with pytest.raises(SystemExit):
        main([str(tutorial["path"]), str(out), str(tmp_path / "x.ckpt"), "--dataset", "mscoco"])
    assert "invalid choice: 'mscoco'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_printed_evaluate_command_runs_as_printed(tutorial, tmp_path, capsys):
    """The whole printed command in a subprocess (COCO scorers included), for shapes files."""
    out, command = printed_evaluate_command(tutorial, tmp_path, capsys, "shapes")
    done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *command[2:]], cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "outputs" / "evaluate").glob("*/results.json")
    summary = json.loads(results.read_text())
    assert summary["num_images"] == 1 and summary["checkpoint"] == str(out)
    assert summary["metrics"]["bleu4_nltk"] == pytest.approx(1.0) and "coco_cider" in summary["metrics"]


def test_a_checkpoint_of_dataparallel_models_converts_like_the_plain_one(tutorial, converted, tmp_path):
    """Forks of the tutorial saved nn.DataParallel-wrapped models (attributes as on a GPU): the
    wrapped modules convert to the same checkpoint."""
    checkpoint = {k: v for k, v in torch.load(tutorial["path"], weights_only=False).items()}
    for key in ("encoder", "decoder"):
        wrapped = torch.nn.DataParallel(checkpoint[key])
        wrapped.device_ids, wrapped.output_device, wrapped.src_device_obj = [0], 0, torch.device("cuda", 0)
        checkpoint[key] = wrapped
    path = tmp_path / "dataparallel.pth.tar"
    torch.save(checkpoint, path)
    out = tmp_path / "dataparallel.ckpt"
    assert main([str(path), str(tutorial["word_map_path"]), str(out), "--data-folder", str(tutorial["folder"]),
                 "--image-size", str(IMAGE_SIZE)]) == 0
    expected = torch.load(converted[0], weights_only=True)["state_dict"]
    actual = torch.load(out, weights_only=True)["state_dict"]
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


def test_a_plain_state_dict_is_named_briefly(tmp_path):
    path = tmp_path / "state_dict.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"keys found: .*, \.\.\. \d+ more\)$"):
        load_tutorial_checkpoint(path)


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_detect_resnet_arch_from_the_trunk_state_dict(arch):
    with torch.device("meta"):  # shapes only, no memory, no download
        resnet = getattr(torchvision.models, arch)(weights=None)
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])
    assert detect_resnet_arch(trunk.state_dict()) == arch


def test_detect_resnet_arch_rejects_a_cut_trunk():
    with torch.device("meta"):
        resnet = torchvision.models.resnet50(weights=None)
    trunk = torch.nn.Sequential(*list(resnet.children())[:-3])  # no layer4
    with pytest.raises(ValueError, match=r"bottleneck blocks \[3, 4, 6, 0\]"):
        detect_resnet_arch(trunk.state_dict())


# ----------------------------------------------------------------------------- refusals
class _Gadget:
    """Unpickling this calls ``func(*args)``: the classic pickle code-execution gadget."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("gadget", ["system", "eval", "subclass"])
def test_malicious_pickle_is_refused_before_anything_runs(tutorial, tmp_path, gadget, capsys):
    marker = tmp_path / "pwned"
    if gadget == "system":
        payload, name = _Gadget(os.system, f"touch {marker}"), "system"
    elif gadget == "eval":
        payload, name = _Gadget(builtins.eval, f"open({str(marker)!r}, 'w').close()"), r"builtin__\.eval"
    else:  # hidden inside an allowed container
        payload, name = torch.nn.Sequential(), "system"
        payload._modules["x"] = _Gadget(os.system, f"touch {marker}")
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "encoder": payload, "decoder": None}, path)
    with pytest.raises(UnsafeCheckpointError, match=name):
        load_tutorial_checkpoint(path)
    rc = main([str(path), str(tutorial["word_map_path"]), str(tmp_path / "out.ckpt")])
    assert rc == 1
    assert "refusing to load the global" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out.ckpt").exists()


def test_word_map_of_another_size_is_rejected(tutorial, tmp_path):
    other = WordMap.build(CAPTIONS + [["extra", "words"]], 1)
    other.save(tmp_path / "wm.json")
    with pytest.raises(ValueError, match=f"{len(other)} entries but the tutorial decoder's vocab_size is "
                                         f"{len(tutorial['word_map'])}"):
        convert(tutorial["path"], tmp_path / "wm.json", tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_a_pickle_without_the_tutorial_modules_is_rejected(tmp_path):
    path = tmp_path / "plain.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"checkpoint\['encoder'\] is nothing"):
        load_tutorial_checkpoint(path)
    with pytest.raises(ValueError, match="not a readable tutorial checkpoint"):
        (tmp_path / "junk.pth.tar").write_bytes(pickle.dumps([1, 2]) + b"garbage")
        load_tutorial_checkpoint(tmp_path / "junk.pth.tar")
