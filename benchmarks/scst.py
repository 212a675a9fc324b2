"""Self-critical training benchmark: the CIDEr-D reward's cost, ours next to pycocoevalcap's.

Rows (group ``scst``):

* the reward of one SCST batch (B images x K samples, 5 references per image, document
  frequencies of a train corpus) in captions/s: ours (``captioner.cider.CiderD``, numpy) and
  pycocoevalcap's ``CiderScorer`` (the code of self-critical.pytorch's ``CiderD`` with cached
  document frequencies: it cooks every caption's n-grams in Python dicts per call), on the
  same captions and document frequencies; the largest difference of their scores is recorded;
* one SCST optimisation step of the quickstart model (ResNet-18 to layer3, 64 px; sample K
  captions per image, reward, backward, Adam) in images/s, with the reward's share of the step,
  and the share pycocoevalcap's reward would have in the same step.

Captions are synthetic (a COCO-sized vocabulary, lengths ~ N(11.5, 2.5), candidates are
references with 30% of the words replaced); the model has random weights, so its samples run
to ``max_len`` tokens (the longest, most expensive captions).
"""

from __future__ import annotations

import time
import numpy as np
import torch

from benchmarks.timing import measure, rate
from captioner.cider import CiderD, DocumentFrequencies

VOCAB = 9487  # COCO's Karpathy word map


def _captions(rng: np.random.Generator, num_images: int, refs_per_image: int = 5):
    words = np.minimum(rng.zipf(1.3, size=(num_images, refs_per_image, 24)), VOCAB - 1)
    lengths = np.clip(np.rint(rng.normal(11.5, 2.5, size=(num_images, refs_per_image))), 3, 24).astype(int)
    return [[words[i, j, :lengths[i, j]].tolist() for j in range(refs_per_image)] for i in range(num_images)]


def _samples(rng: np.random.Generator, references, k: int):
    samples = []
    for refs in references:
        for _ in range(k):
            caption = list(refs[rng.integers(len(refs))])
            for t in range(len(caption)):
                if rng.random() < 0.3:
                    caption[t] = int(rng.integers(VOCAB))
            samples.append(caption)
    return samples


def _pycocoevalcap_reward(corpus):
    """pycocoevalcap's CiderScorer with the corpus DF, as self-critical.pytorch's cached CiderD."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    df_scorer = CiderScorer(n=4, sigma=6.0)
    for refs in corpus:
        df_scorer.cook_append(None, [text(r) for r in refs])
    df_scorer.compute_doc_freq()
    frequencies, num_documents = df_scorer.document_frequency, len(df_scorer.crefs)

    class CorpusSized(list):  # compute_cider takes ref_len = log(len(crefs)): the corpus's
        def __len__(self):
            return num_documents

    def scores(candidates, references, image_index):
        scorer = CiderScorer(n=4, sigma=6.0)
        for candidate, i in zip(candidates, image_index):
            scorer.cook_append(text(candidate), [text(r) for r in references[i]])
        scorer.document_frequency = frequencies  # shared, as CiderD.copy_empty shares it
        scorer.crefs = CorpusSized(scorer.crefs)
        return np.array(scorer.compute_cider())
    return scores


def _scst_module(word_map: dict[str, int], document_frequencies: DocumentFrequencies, k: int):
    from captioner.lit_module import CaptioningModule

    module = CaptioningModule(
        vocab_size=len(word_map), pad_id=word_map["<pad>"], unk_id=word_map["<unk>"],
        start_id=word_map["<start>"], end_id=word_map["<end>"],
        encoder={"arch": "resnet18", "pretrained": False, "last_stage": 3, "encoded_image_size": 4},
        decoder={"embed_dim": 128, "decoder_dim": 256, "attention_dim": 256, "dropout": 0.3},
        fine_tune_encoder=True, word_map=word_map, objective="scst",
        scst={"train_sample_n": k, "max_len": 16}, cider_document_frequencies=document_frequencies)
    module.log = lambda *args, **kwargs: None  # no Trainer here
    return module


def scst_rows(repeats: int, quick: bool) -> list[dict]:
    """The rows described in the module docstring (CPU)."""
    rng = np.random.default_rng(0)
    num_images, k = (8, 5) if quick else (32, 5)
    corpus = _captions(rng, 500 if quick else 5000)
    references = _captions(rng, num_images)
    candidates = _samples(rng, references, k)
    image_index = np.repeat(np.arange(num_images), k)
    document_frequencies = DocumentFrequencies.from_references(corpus)
    ours = CiderD(document_frequencies)
    theirs = _pycocoevalcap_reward(corpus)
    difference = float(np.abs(ours.scores(candidates, references, image_index)
                              - theirs(candidates, references, image_index)).max())
    cpu = torch.device("cpu")
    n = len(candidates)
    t_ours = measure(lambda: ours.scores(candidates, references, image_index), repeats, cpu)
    t_theirs = measure(lambda: theirs(candidates, references, image_index), repeats, cpu)
    batch_name = f"{num_images} images x {k} samples"
    rows = [rate(f"CIDEr-D reward, {batch_name}", "scst", "ours", "captions/s", n, t_ours,
                 max_abs_difference=difference),
            rate(f"CIDEr-D reward, {batch_name}", "scst", "pycocoevalcap", "captions/s", n, t_theirs,
                 max_abs_difference=difference)]

    # One SCST step of the quickstart model; the reward is timed inside it.
    word_map = {"<pad>": 0, **{f"w{i}": i for i in range(1, VOCAB)}, "<unk>": VOCAB,
                "<start>": VOCAB + 1, "<end>": VOCAB + 2}
    module = _scst_module(word_map, document_frequencies, k)
    optimizer = torch.optim.Adam(module.parameters(), lr=5e-5)
    batch = {"images": torch.randint(0, 256, (num_images, 3, 64, 64), dtype=torch.uint8),
             "references": [[[f"w{t}" for t in ref if t] for ref in refs] for refs in references],
             "image_ids": torch.arange(num_images)}
    reward_seconds: list[float] = []
    step_reward_args: list[tuple] = []
    scores = module._cider.scores

    def timed_scores(*args):
        start = time.perf_counter()
        out = scores(*args)
        reward_seconds.append(time.perf_counter() - start)
        step_reward_args[:] = [args]
        return out
    module._cider.scores = timed_scores

    def step():
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    t_step = measure(step, repeats, cpu)
    reward = float(np.median(reward_seconds[-repeats:]))
    step_s = float(np.median(t_step))
    # pycocoevalcap's reward of the same samples the step rewarded.
    pycoco_reward = float(np.median(measure(lambda: theirs(*step_reward_args[0]), repeats, cpu)))
    rows.append(rate(f"SCST step, quickstart model, {batch_name}", "scst", "ours", "images/s", num_images,
                     t_step, reward_share=reward / step_s,
                     reward_share_with_pycocoevalcap=pycoco_reward / (step_s - reward + pycoco_reward)))
    return rows
