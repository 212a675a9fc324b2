"""Does the tutorial reference compute what ours computes? A tiny CPU check run before the timings."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from benchmarks import tutorial_reference as tut
from benchmarks.models import build_ours, build_tutorial
from benchmarks.sizes import QUICK
from benchmarks.synthetic import special_ids, synthetic_captions
from captioner.losses import caption_loss


def check_equivalence(seed: int = 0) -> dict:
    """Tiny CPU check that the tutorial reference and ours compute the same things.

    With shared weights, dropout off and eval-mode BatchNorm: the training loss and the
    decoder gradients agree (ours runs the encoder once per image, the tutorial once per
    caption row), and beam-3 search at batch size 1 (tutorial loop, ``<pad>``/``<start>``
    banned as ours does) picks the same tokens with the same score as our batched search.
    """
    cpu = torch.device("cpu")
    sizes = dataclasses.replace(QUICK, vocab_size=30, embed_dim=16, decoder_dim=16,
                                attention_dim=16, max_len=12)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = special_ids(sizes)
    module, _ = build_ours(sizes, cpu, fine_tune=False, dropout=0.0)
    ours = module.captioner.eval()
    with torch.no_grad():
        ours.decoder.fc.weight.mul_(20.0)  # peaky distributions, so beams do finish
    encoder, decoder, trainer = build_tutorial(sizes, cpu, fine_tune=False, dropout=0.0)
    encoder.resnet.load_state_dict(ours.encoder.resnet.state_dict())
    decoder.load_state_dict(ours.decoder.state_dict())
    encoder.eval()
    decoder.eval()

    b, k, s = 2, 3, sizes.image_size
    images = rng.integers(0, 256, (b, 3, s, s), dtype=np.uint8)
    captions, lengths = synthetic_captions(rng, b * k, sizes, ids["pad_id"], ids["start_id"],
                                           ids["end_id"])
    out = ours(torch.from_numpy(images), torch.from_numpy(captions).view(b, k, -1),
               torch.from_numpy(lengths).view(b, k))
    loss_ours = caption_loss(out.logits, out.targets, out.mask, out.alphas).loss
    dataset = tut.TutorialCaptionDataset(images, captions, lengths, captions_per_image=k)
    imgs, caps, caplens = torch.utils.data.default_collate([dataset[i] for i in range(b * k)])
    loss_tut, _ = trainer.loss(imgs, caps, caplens)
    loss_ours.backward()
    loss_tut.backward()
    grad_diff = max(float((p.grad - q.grad).abs().max()) for p, q in
                    zip(ours.decoder.parameters(), decoder.parameters()))

    hyps = ours.generate(torch.from_numpy(images), beam_size=3, max_len=sizes.max_len)
    same_tokens, score_diff, finished = True, 0.0, 0
    for i in range(b):
        tokens, score = tut.beam_search_one(encoder, decoder, imgs[i * k:i * k + 1], 3,
                                            ids["start_id"], ids["end_id"], sizes.max_len,
                                            banned_ids=(ids["pad_id"], ids["start_id"]))
        best = hyps[i][0]
        mine = best.tokens + ([ids["end_id"]] if best.finished else [])
        same_tokens &= mine == tokens
        score_diff = max(score_diff, abs(best.score - score))
        finished += int(best.finished)
    result = {"loss_abs_diff": abs(float(loss_ours.detach() - loss_tut.detach())), "decoder_grad_max_abs_diff": grad_diff,
              "beam_same_tokens": bool(same_tokens), "beam_score_max_abs_diff": score_diff,
              "beam_images_finished": f"{finished}/{b}"}
    result["ok"] = (result["loss_abs_diff"] < 1e-4 and grad_diff < 1e-4 and same_tokens
                    and score_diff < 1e-3)
    return result
