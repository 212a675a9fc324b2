"""Metrics: nltk BLEU equality, DDP-exact gathering, COCO scorers and their Java-free fallback."""

import json
import math
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nltk.translate.bleu_score import corpus_bleu
from torch.utils.data.distributed import DistributedSampler

from captioner.cider import cider_d_corpus
from captioner import metrics
from captioner.metrics import (CaptionAccumulator, coco_scores, corpus_bleu_scores,
                               ptb_tokenize_python, topk_accuracy)
from captioner.vocab import END, PAD, START, UNK

HAS_JAVA = shutil.which("java") is not None

# image id -> (hypothesis tokens, reference token lists); ids deliberately not sorted.
CORPUS = {
    17: ("a dog runs on the grass".split(), ["a dog runs on grass".split(), "the dog is running".split()]),
    3: ("a cat sits".split(), ["a cat sits on a mat".split(), "a small cat".split()]),
    42: ("two men play frisbee in a park".split(), ["two men playing frisbee in the park".split()]),
    8: ([], ["an empty plate on a table".split()]),
    25: ("a red bus on the street".split(), ["a red double decker bus on a street".split(),
                                              "a bus driving down the street".split()]),
    11: ("the the the the".split(), ["the cat".split()]),
    30: ("a man riding a wave on a surfboard".split(), ["a man riding a wave on top of a surfboard".split()]),
}


# ---------------------------------------------------------------------------- corpus BLEU
def test_perfect_hypotheses_score_one():
    # >= 4 tokens each: nltk counts a missing n-gram order as 0/1, so shorter ones score < 1.
    refs = [[c[1][0]] for c in CORPUS.values() if len(c[1][0]) >= 4]
    hyps = [r[0] for r in refs]
    scores = corpus_bleu_scores(refs, hyps)
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4"}
    for v in scores.values():
        assert v == pytest.approx(1.0, abs=1e-12)


def test_bleu_equals_nltk_on_hand_made_corpus():
    hyps = [c[0] for c in CORPUS.values()]
    refs = [c[1] for c in CORPUS.values()]
    ours = corpus_bleu_scores(refs, hyps)
    weights = [(1,), (1 / 2, 1 / 2), (1 / 3, 1 / 3, 1 / 3), (1 / 4, 1 / 4, 1 / 4, 1 / 4)]
    for n, w in enumerate(weights, start=1):
        assert ours[f"bleu{n}"] == corpus_bleu(refs, hyps, weights=w)  # exact, not approx
    assert 0.0 < ours["bleu4"] < ours["bleu1"] < 1.0


def test_bleu_known_values():
    # "a cat sat" vs "a cat sat down": all n-grams match, brevity penalty exp(1 - 4/3).
    one = corpus_bleu_scores([["a cat sat down".split()]], ["a cat sat".split()])
    assert one["bleu1"] == pytest.approx(math.exp(-1 / 3), rel=1e-12)
    assert one["bleu3"] == pytest.approx(math.exp(-1 / 3), rel=1e-12)
    # No 4-gram in a 3-word hypothesis, no smoothing: nltk's tiny positive "zero".
    assert 0.0 <= one["bleu4"] < 1e-70
    # Add "the the the the" vs "the cat": clipped unigrams 4/7, corpus length 7 > 6 so BP = 1.
    two = corpus_bleu_scores([["a cat sat down".split()], ["the cat".split()]],
                             ["a cat sat".split(), "the the the the".split()])
    assert two["bleu1"] == pytest.approx(4 / 7, rel=1e-12)


def test_bleu_rejects_bad_input():
    with pytest.raises(ValueError, match="no hypotheses"):
        corpus_bleu_scores([], [])
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        corpus_bleu_scores([[["a"]]], [["a"], ["b"]])
    with pytest.raises(ValueError, match="token list"):
        corpus_bleu_scores([["a cat"]], ["a cat"])


# ---------------------------------------------------------------------------- accumulator
def test_accumulator_dedups_sorts_and_matches_direct_bleu():
    acc = CaptionAccumulator()
    items = list(CORPUS.items())
    for start in range(0, len(items), 3):
        chunk = items[start:start + 3]
        acc.update(torch.tensor([k for k, _ in chunk]), [v[0] for _, v in chunk],
                   [v[1] for _, v in chunk])
    first_id, (first_hyp, first_refs) = items[0]
    acc.update([first_id], [["padding", "copy"]], [first_refs])  # a later duplicate is dropped
    ids, hyps, refs = acc.gather()
    assert ids == sorted(CORPUS)
    assert hyps[ids.index(first_id)] == first_hyp
    expected = corpus_bleu_scores([CORPUS[i][1] for i in ids], [CORPUS[i][0] for i in ids])
    expected["cider"] = cider_d_corpus([CORPUS[i][1] for i in ids], [CORPUS[i][0] for i in ids])
    assert acc.compute() == expected
    acc.reset()
    assert len(acc) == 0
    with pytest.raises(ValueError, match="no hypotheses"):
        acc.compute()
    with pytest.raises(ValueError, match="length B"):
        acc.update([1, 2], [["a"]], [[["a"]]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        ids = list(CORPUS)
        sampler = DistributedSampler(ids, num_replicas=world, rank=rank, shuffle=False)
        mine = [ids[i] for i in sampler]  # padded: rank 1 repeats the first image
        acc = CaptionAccumulator()
        for start in range(0, len(mine), 2):
            batch = mine[start:start + 2]
            acc.update(torch.tensor(batch), [CORPUS[i][0] for i in batch],
                       [CORPUS[i][1] for i in batch])
        gathered = acc.gather()
        result = {"local": mine, "ids": gathered[0], "hyps": gathered[1], "bleu": acc.compute()}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ddp_gather_equals_single_process(tmp_path):
    world = 2
    assert len(CORPUS) % world == 1  # odd: DistributedSampler pads with a duplicate
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert sum(len(r["local"]) for r in results) == len(CORPUS) + 1  # the duplicate was there
    ids = sorted(CORPUS)
    single = corpus_bleu_scores([CORPUS[i][1] for i in ids], [CORPUS[i][0] for i in ids])
    single["cider"] = cider_d_corpus([CORPUS[i][1] for i in ids], [CORPUS[i][0] for i in ids])
    assert single["cider"] > 0.5  # a real CIDEr-D, so the equality below is a check
    for r in results:
        assert r["ids"] == ids
        assert r["hyps"] == [CORPUS[i][0] for i in ids]
        assert r["bleu"] == single  # exact float equality, every key


# ---------------------------------------------------------------------------- top-k accuracy
def test_topk_accuracy_known_values():
    logits = torch.tensor([[[0.1, 0.5, 0.2, 0.9], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 9.0, 0.0]]])
    targets = torch.tensor([[3, 2, 0]])  # ranks: 1st, 3rd, (masked)
    mask = torch.tensor([[True, True, False]])
    assert topk_accuracy(logits, targets, mask, k=1).item() == pytest.approx(50.0)
    assert topk_accuracy(logits, targets, mask, k=3).item() == pytest.approx(100.0)
    assert topk_accuracy(logits, targets, torch.ones_like(mask), k=1).item() == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="between 1 and the vocabulary size"):
        topk_accuracy(logits, targets, mask, k=5)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        topk_accuracy(logits, targets[:, :2], mask, k=1)


# ---------------------------------------------------------------------------- COCO scorers
RAW_REFS = {
    1: ["A dog runs on the grass.", "The dog is running outside."],
    2: ["A cat sits on a mat.", "A small cat, sitting."],
    3: ["Two men play frisbee in a park!", "Men throwing a frisbee."],
    4: ["A red bus on a city street.", "A double-decker bus drives down the road."],
}
PUNCT_CAPTIONS = ["A man's hat (red) isn't blue!", 'She said "hello," then left...',
                  "Two dogs; one cat: e.g. pets -- U.S.A. style", "It's 3.5 miles, 1,000 feet at 10:30.",
                  "A t-shirt [white] and {braces}", "The kids' toys won't fit", "A CAFÉ – open… cannot"]
# The word map's special tokens, glued to words and punctuation, and other tag shapes.
TAG_CAPTIONS = ["a <unk> sitting on a bench", "a<unk> on <UNK>.", "<unk>'s hat <unk>-like <unk>!",
                "<start> a dog <end> <pad>", "<unk><unk>,<unk>", "a < b and c > d, <1> <3 <>",
                "</a> <a b='c d'/> <a b=c> <a  > <!-- x -->", "<<unk>> and << quotes >>"]


def test_python_tokenizer_known_output():
    assert ptb_tokenize_python("A man's hat (red) isn't blue!") == "a man 's hat -lrb- red -rrb- is n't blue"
    assert ptb_tokenize_python("It's 3.5 miles, 1,000 feet.") == "it 's 3.5 miles 1,000 feet"
    assert ptb_tokenize_python("...") == ""
    assert ptb_tokenize_python("A <unk> on a<unk>.") == "a <unk> on a <unk>"
    assert ptb_tokenize_python("a < b and c > d") == "a < b and c > d"


def test_python_tokenizer_keeps_word_map_tokens():
    # Decoded captions are word-map tokens joined by spaces; none of them may be split.
    words = ["a", UNK, "on", START, END, PAD, "bench", UNK]
    assert ptb_tokenize_python(" ".join(words)).split(" ") == words


def test_punctuation_list_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
    assert metrics.PTB_PUNCTUATIONS == frozenset(PUNCTUATIONS)


@pytest.mark.skipif(not HAS_JAVA, reason="PTBTokenizer needs Java")
def test_python_tokenizer_equals_ptbtokenizer():
    captions = PUNCT_CAPTIONS + TAG_CAPTIONS
    java = metrics._ptb_tokenize_java({"x": captions})["x"]
    assert [ptb_tokenize_python(c) for c in captions] == java


def _perfect_and_wrong():
    perfect = {k: v[0] for k, v in RAW_REFS.items()}
    wrong = {1: "A bowl of soup.", 2: "A plane in the sky.", 3: "A clock tower.", 4: "Pizza on a plate."}
    return perfect, wrong


@pytest.mark.parametrize("tokenizer", ["python", pytest.param(
    "ptb", marks=pytest.mark.skipif(not HAS_JAVA, reason="PTBTokenizer needs Java"))])
def test_coco_scores_perfect_beats_wrong(tokenizer, monkeypatch):
    monkeypatch.setattr(metrics, "_meteor_score", lambda *a, **k: 0.5)  # METEOR has its own test
    perfect, wrong = _perfect_and_wrong()
    good = coco_scores(RAW_REFS, perfect, tokenizer=tokenizer)
    bad = coco_scores(RAW_REFS, wrong, tokenizer=tokenizer)
    assert good["tokenizer"] == bad["tokenizer"] == tokenizer
    assert good["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert good["bleu1"] == pytest.approx(1.0, abs=1e-6)
    assert good["rougeL"] == pytest.approx(1.0, abs=1e-6)
    assert good["cider"] > 1.0
    for key in ("bleu1", "bleu4", "rougeL", "cider"):
        assert bad[key] < good[key]


def test_coco_scores_without_java_falls_back(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    perfect, _ = _perfect_and_wrong()
    with pytest.warns(RuntimeWarning, match="Java") as record:
        result = coco_scores(RAW_REFS, perfect, spice=True)
    messages = " ".join(str(w.message) for w in record)
    assert "METEOR skipped" in messages and "SPICE skipped" in messages
    assert result["tokenizer"] == "python"
    assert "meteor" not in result and "spice" not in result
    assert result["bleu4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(RuntimeError, match="needs Java"):
        coco_scores(RAW_REFS, perfect, tokenizer="ptb")


def test_coco_scores_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="only in references"):
        coco_scores(RAW_REFS, {1: "a dog"}, tokenizer="python")
    with pytest.raises(ValueError, match="one caption string"):
        coco_scores({1: ["a dog"]}, {1: ["a", "dog"]}, tokenizer="python")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="METEOR needs Java")
def test_meteor_runs_closes_and_handles_empty_hypothesis(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_module

    procs = []
    original_init = meteor_module.Meteor.__init__

    def tracking_init(self):
        original_init(self)
        procs.append(self.meteor_p)

    monkeypatch.setattr(meteor_module.Meteor, "__init__", tracking_init)
    perfect, _ = _perfect_and_wrong()
    with_empty = {**perfect, 2: ""}
    good = coco_scores(RAW_REFS, perfect, tokenizer="ptb")
    worse = coco_scores(RAW_REFS, with_empty, tokenizer="ptb")
    assert good["meteor"] > 0.9
    assert 0.0 < worse["meteor"] < good["meteor"]  # the empty caption counts, as a miss
    with pytest.warns(RuntimeWarning, match="METEOR skipped"):  # the watchdog ends a stall
        stalled = coco_scores(RAW_REFS, perfect, tokenizer="ptb", meteor_timeout_s=0.001)
    assert "meteor" not in stalled and stalled["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert len(procs) == 3 and all(p.poll() is not None for p in procs)  # subprocesses closed
