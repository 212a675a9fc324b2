"""Caption metrics: corpus BLEU-1..4 (nltk, DDP-exact), the COCO scorers, top-k accuracy.

Two BLEU protocols live here and they give different numbers, so keep them apart:

* :func:`corpus_bleu_scores` / :class:`CaptionAccumulator` - the tutorial's protocol: nltk
  ``corpus_bleu`` on the Karpathy tokens (the word-map tokens the model emits), all
  references of each image, no smoothing. This is what ``val/bleu4`` reports. The accumulator
  also gives CIDEr-D on the same tokens (``val/cider``; :mod:`captioner.cider`, document
  frequencies from the evaluated references as in the COCO evaluation).
* :func:`coco_scores` - the COCO caption evaluation (pycocoevalcap): raw strings, PTB
  tokenisation, BLEU/METEOR/ROUGE-L/CIDEr-D/SPICE as published in papers.

Legend: N captions, L token positions, V vocabulary.

No Lightning or Hydra here: plain torch / torch.distributed, nltk and pycocoevalcap.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from captioner.cider import cider_d_corpus

BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu1": (1.0,),
    "bleu2": (1 / 2, 1 / 2),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (1 / 4, 1 / 4, 1 / 4, 1 / 4),
}

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, repeated so the pure-Python tokenizer
# does not need the package; a test checks that the two lists are equal.
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])


# ---------------------------------------------------------------------------- BLEU (nltk)
def corpus_bleu_scores(references: Sequence[Sequence[Sequence[str]]],
                       hypotheses: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 with nltk, exactly as the tutorial computes them.

    Uses ``nltk.translate.bleu_score.corpus_bleu`` with the weights in ``BLEU_WEIGHTS``
    and no smoothing, so the numbers equal nltk's on the same tokens. nltk's warning
    about zero n-gram overlaps is silenced: BLEU-n is then nltk's stand-in for zero, a
    positive number below 1e-70 (it uses ``sys.float_info.min`` for the empty precision).

    Args:
        references: N lists of reference captions, each a list of tokens (no special
            tokens). Every image needs at least one reference.
        hypotheses: N token lists, one generated caption per image; an empty list is
            allowed (it scores zero matches and shortens the corpus length).

    Returns:
        ``{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}`` as Python floats in [0, 1].
    """
    from nltk.translate.bleu_score import corpus_bleu

    if len(hypotheses) == 0:
        raise ValueError("corpus_bleu_scores got no hypotheses; BLEU of an empty corpus is "
                         "undefined (did the validation loop run any batch?)")
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_bleu_scores: {len(references)} reference lists but "
                         f"{len(hypotheses)} hypotheses; pass one reference list per hypothesis")
    for i, (refs, hyp) in enumerate(zip(references, hypotheses)):
        if len(refs) == 0:
            raise ValueError(f"corpus_bleu_scores: hypothesis {i} has no references")
        if isinstance(hyp, str) or any(isinstance(r, str) for r in refs):
            raise ValueError(f"corpus_bleu_scores: item {i} holds a string where a token list "
                             f"is expected; split captions into tokens first")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts")
        return {name: float(corpus_bleu(references, hypotheses, weights=w))
                for name, w in BLEU_WEIGHTS.items()}


def _caption_scores(references: Sequence[Sequence[Sequence[str]]],
                    hypotheses: Sequence[Sequence[str]]) -> dict[str, float]:
    scores = corpus_bleu_scores(references, hypotheses)
    scores["cider"] = cider_d_corpus(references, hypotheses)
    return scores


def _dist_world_size(group=None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


class CaptionAccumulator:
    """Collects (image id, hypothesis, references) per rank; BLEU and CIDEr-D over the full set.

    ``DistributedSampler`` pads the dataset so every rank gets the same number of items,
    which repeats a few images. :meth:`gather` collects every rank's items with
    ``all_gather_object``, drops repeated image ids (the first seen, in rank order, is
    kept) and sorts by image id, so every rank holds the identical, complete list and the
    corpus BLEU equals the single-process value to the last digit.

    :meth:`compute` scores on rank 0 only and sends the result to the other ranks with
    ``broadcast_object_list``: all ranks return the same dict, computed once.

    With torch.distributed not initialised (or world size 1) everything is local.
    Every rank must call :meth:`gather` / :meth:`compute` (they are collectives).

    Args:
        group: process group for the collectives; None is the default group.
    """

    def __init__(self, group=None):
        self.group = group
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated on this rank."""
        self._items: list[tuple[int, list[str], list[list[str]]]] = []

    def __len__(self) -> int:
        return len(self._items)

    def update(self, image_ids: Sequence[int] | Tensor, hypotheses: Sequence[Sequence[str]],
               references: Sequence[Sequence[Sequence[str]]]) -> None:
        """Add one batch.

        Args:
            image_ids: (B,) int image ids (a list or an int tensor on any device).
            hypotheses: B generated token lists.
            references: B lists of reference token lists (all references of the image).
        """
        if isinstance(image_ids, Tensor):
            if image_ids.dim() != 1:
                raise ValueError(f"image_ids must be 1-D (B,), got shape {tuple(image_ids.shape)}")
            image_ids = image_ids.tolist()
        ids = [int(i) for i in image_ids]
        if not (len(ids) == len(hypotheses) == len(references)):
            raise ValueError(f"CaptionAccumulator.update: {len(ids)} image_ids, "
                             f"{len(hypotheses)} hypotheses and {len(references)} reference "
                             f"lists; all three must have length B")
        for i, hyp, refs in zip(ids, hypotheses, references):
            if isinstance(hyp, str):
                raise ValueError(f"hypothesis for image {i} is a string; pass a token list")
            self._items.append((i, [str(t) for t in hyp], [[str(t) for t in r] for r in refs]))

    def gather(self) -> tuple[list[int], list[list[str]], list[list[list[str]]]]:
        """All ranks' items, de-duplicated by image id (first kept) and sorted by id.

        Returns:
            (image_ids, hypotheses, references), the same on every rank.
        """
        world = _dist_world_size(self.group)
        if world > 1:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, self._items, group=self.group)
            items = [item for part in parts for item in part]
        else:
            items = list(self._items)
        unique: dict[int, tuple[int, list[str], list[list[str]]]] = {}
        for item in items:
            unique.setdefault(item[0], item)
        ordered = [unique[i] for i in sorted(unique)]
        return ([i for i, _, _ in ordered], [h for _, h, _ in ordered],
                [r for _, _, r in ordered])

    def compute(self) -> dict[str, float]:
        """BLEU-1..4 (:func:`corpus_bleu_scores`) and ``cider`` (CIDEr-D, document frequencies
        from these references: :func:`~captioner.cider.cider_d_corpus`) of the gathered set,
        equal on all ranks."""
        _, hypotheses, references = self.gather()
        world = _dist_world_size(self.group)
        if world == 1:
            return _caption_scores(references, hypotheses)
        # Rank 0 computes (or fails) once; the others receive the outcome.
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        box: list[Any] = [None]
        if dist.get_rank() == src:
            try:
                box[0] = _caption_scores(references, hypotheses)
            except ValueError as e:
                box[0] = e
        dist.broadcast_object_list(box, src=src, group=self.group)
        if isinstance(box[0], Exception):
            raise ValueError(str(box[0]))
        return box[0]


# ---------------------------------------------------------------------------- top-k accuracy
def topk_accuracy(logits: Tensor, targets: Tensor, mask: Tensor, k: int = 5) -> Tensor:
    """Percentage of real tokens whose target is among the top-k logits (the tutorial's metric).

    Args:
        logits: (N, L, V) float.
        targets: (N, L) int64 target ids.
        mask: (N, L) bool, True on real (non-padding) positions.
        k: how many of the highest logits count as a hit; 1 <= k <= V.

    Returns:
        0-dim float tensor in [0, 100] on ``logits.device``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (N, L, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must "
                         f"both be (N, L) = {tuple(logits.shape[:2])}")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {logits.shape[-1]}")
    mask = mask.bool()
    num_real = mask.sum()
    # Checked only where it is free: reading a CUDA value would make a training step wait for
    # the GPU. On the GPU an all-padding mask gives 0 (no hits over at least one token).
    if not num_real.is_cuda and num_real == 0:
        raise ValueError("topk_accuracy: mask has no real tokens")
    top = logits.topk(k, dim=-1).indices  # (N, L, k)
    hit = (top == targets.unsqueeze(-1)).any(dim=-1) & mask  # (N, L)
    return hit.sum().float() * 100.0 / num_real.clamp(min=1).float()


# ---------------------------------------------------------------------------- PTB tokenisation
_ABBREVIATIONS = ("mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|co|ltd|mt|ft|lt|gen|col|prof|rev|capt|sgt|"
                  "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|ave|blvd|rd|corp|dept")
_CHAR_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                           "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... "})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTION = r"(?:s|re|ve|ll|d|m)"
_WORD_CHARS = r"(?:(?!n't\b)\w)+"  # stops before "n't" so "isn't" -> "is" "n't"
_WORD_SEP = rf"(?:[-./+@]|(?<=\d)[,:](?=\d)|'(?!{_CONTRACTION}\b|t\b|n')(?=\w))"
# PTBLexer's SGML token: a tag such as <unk>, </a>, <a b='c'/> or <!-- x --> is one token, so
# the word map's own <unk> (and <start>, <end>) stays whole; names are ASCII, values quoted.
_SGML_NAME = r"[a-z][a-z0-9_:.-]*"
_SGML_ATTR = rf"""[ ]+{_SGML_NAME}(?:[ ]*=[ ]*(?:'[^'\r\n]*'|"[^"\r\n]*"))?"""
_SGML = rf"<(?:[!?][a-z-][^>\r\n]*|{_SGML_NAME}(?:{_SGML_ATTR})*[ ]*/?[ ]*|/{_SGML_NAME}[ ]*)>"
_PTB_TOKEN = re.compile(rf"""
      https?://\S+ | www\.\S+                          # URLs stay whole
    | {_SGML} | << | >>                                 # tags <unk> </a>; fake duck feet <<
    | [:;]-?[()]                                        # emoticons, brackets escaped later
    | (?<![\w.])(?:[a-z]\.){{2,}}                      # u.s.a.  e.g.  a.m.
    | (?<![\w.'])(?:{_ABBREVIATIONS})\.(?!\w)          # mr.  st.  etc.
    | (?<![\w.'])no\.(?=\s*\d)                          # no. 5
    | (?<![\w.'])[a-z]\.(?=\s|$)                        # initials: "plan a."
    | (?<!\w)can(?=not\b) | (?<!\w)(?:gon|wan)(?=na\b) | (?<!\w)got(?=ta\b)
    | (?<!\w)(?:lem|gim)(?=me\b)                        # cannot gonna gotta lemme gimme
    | n't\b                                             # is|n't  ca|n't  wo|n't
    | '{_CONTRACTION}\b | 't(?=(?:is|was)\b) | 'n' | '\d+s?\b
    | @?{_WORD_CHARS}(?:{_WORD_SEP}{_WORD_CHARS})*      # words, numbers, t-shirt, 3.5, 1,000
    | \.{{3,}}                                          # ellipsis
    | -{{2,}}                                           # dashes
    | [?!]+                                             # ?!  ??  !!
    | ``|''                                             # latex quotes
    | \S                                                # any other single symbol
""", re.VERBOSE)


def ptb_tokenize_python(caption: str) -> str:
    """A pure-Python stand-in for pycocoevalcap's ``PTBTokenizer`` on one caption.

    Mirrors Stanford PTBTokenizer 3.4.1 with ``-lowerCase -preserveLines`` followed by
    pycocoevalcap's punctuation removal: lowercase; split off punctuation, brackets
    (written ``-lrb-`` etc. and, as in pycocoevalcap, *not* removed after lowercasing),
    quotes and clitics (``is n't``, ``man 's``, ``can not``, ``gon na``); keep decimals,
    ``1,000``, ``10:30``, ``3/4``, hyphenated words, ``u.s.a.``, ``e.g.`` and common
    abbreviations (``mr.``, ``st.``) and SGML-like tags such as the word map's ``<unk>``
    (``a<unk>.`` -> ``a <unk>``; spaces inside a tag become U+00A0, as in Java). It equals
    the Java tokenizer on ordinary caption text; rare constructs (``5p.m.``, exotic
    abbreviations) can differ.

    Returns:
        The space-joined tokens, punctuation removed (``""`` if nothing is left).
    """
    text = caption.translate(_CHAR_MAP).lower()
    tokens = []
    for tok in _PTB_TOKEN.findall(text):
        if tok in _BRACKETS:
            tok = _BRACKETS[tok]
        elif tok[0] in ":;" and len(tok) > 1:  # emoticon
            tok = tok[:-1] + _BRACKETS[tok[-1]]
        elif tok == '"':
            tok = "''"
        elif tok[0] == "<" and len(tok) > 2:  # an SGML tag: Java's normalizeSpace
            tok = tok.replace(" ", "\u00a0")
        if tok not in PTB_PUNCTUATIONS:
            tokens.append(tok)
    return " ".join(tokens)


def _ptb_tokenize_java(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP via Java) on ``{key: [caption]}``."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer keeps one caption per line: a line break inside a caption would shift
    # every later caption onto the wrong image.
    flat = {k: [{"caption": re.sub(r"[\r\n\u0085\u2028\u2029]", " ", c)} for c in v]
            for k, v in captions.items()}
    out = PTBTokenizer().tokenize(flat)
    for k, v in captions.items():
        if len(out.get(k, ())) != len(v):
            raise RuntimeError(f"PTBTokenizer returned {len(out.get(k, ()))} captions for key "
                               f"{k!r}, expected {len(v)}; the line alignment broke")
    return out


def _tokenize_all(captions: dict[Any, list[str]], use_java: bool) -> dict[Any, list[str]]:
    if use_java:
        return _ptb_tokenize_java(captions)
    return {k: [ptb_tokenize_python(c) for c in v] for k, v in captions.items()}


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (PTBTokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


# ---------------------------------------------------------------------------- COCO scorers
def _meteor_score(gts: dict, res: dict, timeout_s: float) -> float:
    """METEOR 1.5 via pycocoevalcap, with the subprocess always closed.

    A watchdog kills the Java process after ``timeout_s``: the wrapper reads its answers
    line by line and would otherwise block forever if the jar stalls. Empty hypotheses
    are passed through: meteor-1.5 under Java 17 scores them 0 and counts their
    references in the corpus score. ``|||`` is METEOR's field separator, so it is removed
    from references too (the wrapper already removes it from hypotheses).
    """
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    meteor = Meteor()
    proc = meteor.meteor_p
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:  # killed or crashed: readline returned b"" / broken pipe
        detail = proc.stderr.read().decode(errors="replace")[-500:] if proc.poll() is not None else ""
        raise RuntimeError(f"METEOR subprocess failed or exceeded {timeout_s}s ({e}); {detail}") from e
    finally:
        timer.cancel()
        if meteor.lock.locked():  # compute_score raised while holding its lock
            meteor.lock.release()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        proc.kill()
        proc.wait()
    return float(score)


def _spice_score(gts: dict, res: dict) -> float:
    """SPICE 1.0 via pycocoevalcap, refusing to trigger its ~400 MB CoreNLP download."""
    from pycocoevalcap.spice import spice as spice_module

    jar = (Path(spice_module.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar")
    if not jar.exists():
        raise RuntimeError(f"SPICE needs the Stanford CoreNLP 3.6.0 jars at {jar.parent}; "
                           f"fetch them once with `python -m pycocoevalcap.spice.get_stanford_models`"
                           f" (needs internet)")
    score, _ = spice_module.Spice().compute_score(gts, res)
    return float(score)


def coco_scores(references: Mapping[Any, Sequence[str]], hypotheses: Mapping[Any, str],
                spice: bool = False, tokenizer: str = "auto",
                meteor_timeout_s: float = 600.0) -> dict[str, float | str]:
    """The COCO caption evaluation (pycocoevalcap scorers, called one by one).

    Captions are PTB-tokenised first. ``tokenizer="auto"`` uses pycocoevalcap's
    ``PTBTokenizer`` when Java is on PATH and otherwise :func:`ptb_tokenize_python` with a
    warning; ``"ptb"`` insists on Java, ``"python"`` never uses it. Without Java, METEOR
    and SPICE are skipped with a warning (their keys are absent). A METEOR or SPICE
    failure (crash, timeout, missing SPICE models) also only warns and drops the key.

    Note: CIDEr-D takes its IDF from the evaluated references, so it needs several images
    with different references to mean anything (one image always scores 0).

    Args:
        references: ``{image_id: [raw reference caption, ...]}``, at least one per image.
        hypotheses: ``{image_id: raw generated caption}`` with the same keys; a caption
            may be empty.
        spice: also compute SPICE (slow; Java 8 and the CoreNLP models are needed).
        tokenizer: ``"auto"``, ``"ptb"`` or ``"python"``.
        meteor_timeout_s: kill METEOR's Java process after this many seconds.

    Returns:
        ``bleu1..bleu4``, ``meteor``, ``rougeL``, ``cider`` (CIDEr-D), ``spice`` as floats
        (METEOR/SPICE only when computed), and ``tokenizer`` = ``"ptb"`` or ``"python"``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer={tokenizer!r}; choose 'auto', 'ptb' or 'python'")
    if not hypotheses:
        raise ValueError("coco_scores got no hypotheses")
    ref_keys, hyp_keys = set(references), set(hypotheses)
    if ref_keys != hyp_keys:
        raise ValueError(f"coco_scores: image ids differ between references and hypotheses "
                         f"(only in references: {sorted(map(str, ref_keys - hyp_keys))[:5]}, "
                         f"only in hypotheses: {sorted(map(str, hyp_keys - ref_keys))[:5]})")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"coco_scores: references[{k!r}] must be a non-empty list of "
                             f"caption strings, got {refs!r}")
    for k, hyp in hypotheses.items():
        if not isinstance(hyp, str):
            raise ValueError(f"coco_scores: hypotheses[{k!r}] must be one caption string, "
                             f"got {type(hyp).__name__}; join tokens with spaces")

    has_java = java_available()
    if tokenizer == "ptb" and not has_java:
        raise RuntimeError("tokenizer='ptb' needs Java on PATH (apt install default-jre-headless); "
                           "use tokenizer='python' or 'auto' without Java")
    use_java = tokenizer == "ptb" or (tokenizer == "auto" and has_java)
    if tokenizer == "auto" and not has_java:
        warnings.warn("Java not found: captions are tokenised with the pure-Python PTB "
                      "tokenizer and METEOR/SPICE are skipped", RuntimeWarning, stacklevel=2)

    keys = list(references)
    both: dict[Any, list[str]] = {("ref", k): list(references[k]) for k in keys}
    both.update({("hyp", k): [hypotheses[k]] for k in keys})
    tokenized = _tokenize_all(both, use_java)
    gts = {k: tokenized[("ref", k)] for k in keys}
    res = {k: tokenized[("hyp", k)] for k in keys}

    result: dict[str, float | str] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    if has_java:
        try:
            result["meteor"] = _meteor_score(gts, res, meteor_timeout_s)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            warnings.warn(f"METEOR skipped: {e}", RuntimeWarning, stacklevel=2)
    else:
        warnings.warn("METEOR skipped: it needs Java on PATH", RuntimeWarning, stacklevel=2)
    result["rougeL"] = float(Rouge().compute_score(gts, res)[0])
    result["cider"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        if not has_java:
            warnings.warn("SPICE skipped: it needs Java on PATH", RuntimeWarning, stacklevel=2)
        else:
            try:
                result["spice"] = _spice_score(gts, res)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                warnings.warn(f"SPICE skipped: {e}", RuntimeWarning, stacklevel=2)
    result["tokenizer"] = "ptb" if use_java else "python"
    return result
