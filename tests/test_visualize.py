"""Attention figures and caption tables."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from captioner.visualize import (attention_figure, caption_text_table, save_attention_figure,
                                 upsample_attention)

matplotlib.use("Agg")


@pytest.fixture
def example():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    words = ["a", "red", "bus", "<end>"]
    alphas = rng.random((4, 9))
    alphas /= alphas.sum(axis=1, keepdims=True)
    return image, words, alphas


def test_figure_has_one_panel_per_word_plus_start(example):
    image, words, alphas = example
    figure = attention_figure(image, words, alphas, words_per_row=3)
    assert [ax.get_title() for ax in figure.axes] == ["<start>", "a", "red", "bus", "<end>"]
    assert len(figure.axes) == 1 + alphas.shape[0]
    assert len(figure.axes[0].images) == 1  # plain image on the <start> panel
    assert all(len(ax.images) == 2 for ax in figure.axes[1:])  # image + heat map
    heat = figure.axes[2].images[1].get_array()
    assert heat.shape == image.shape[:2]
    assert figure.axes[2].images[1].get_alpha() == pytest.approx(0.6)
    rows = {ax.get_subplotspec().rowspan.start for ax in figure.axes}
    assert rows == {0, 1}  # 5 panels at 3 per row


def test_words_without_end_label_last_row_end(example):
    image, words, alphas = example
    figure = attention_figure(image, words[:-1], alphas)
    assert figure.axes[-1].get_title() == "<end>"
    assert len(figure.axes) == 5


def test_tensor_and_numpy_alphas_give_the_same_maps(example):
    image, words, alphas = example
    from_numpy = attention_figure(image, words, alphas, smooth=False)
    from_tensor = attention_figure(image, words, torch.tensor(alphas, dtype=torch.float32), smooth=False)
    for a, b in zip(from_numpy.axes[1:], from_tensor.axes[1:]):
        np.testing.assert_allclose(a.images[1].get_array(), b.images[1].get_array(), rtol=1e-6)


def test_upscale_resizes_image(example):
    image, words, alphas = example
    figure = attention_figure(image, words, alphas, upscale_to=48)
    assert figure.axes[0].images[0].get_array().shape == (48, 48, 3)
    assert figure.axes[1].images[1].get_array().shape == (48, 48)


def test_upsample_nearest_is_blocks_and_smooth_keeps_the_peak():
    alpha = np.array([0.1, 0.2, 0.3, 0.4])
    blocks = upsample_attention(alpha, (4, 6), smooth=False)
    np.testing.assert_array_equal(blocks, np.kron(alpha.reshape(2, 2), np.ones((2, 3))))
    uniform = upsample_attention(np.full(9, 1 / 9), (30, 30), smooth=True)
    np.testing.assert_allclose(uniform, 1 / 9, rtol=1e-12)
    peak = np.zeros(9)
    peak[5] = 1.0  # row 1, column 2 of a 3x3 grid
    smooth = upsample_attention(peak, (30, 30), smooth=True)
    r, c = np.unravel_index(smooth.argmax(), smooth.shape)
    assert r // 10 == 1 and c // 10 == 2
    assert smooth.shape == (30, 30)


def test_mismatched_lengths_rejected(example):
    image, words, alphas = example
    with pytest.raises(ValueError, match=r"got 2 words but 4 attention rows"):
        attention_figure(image, words[:2], alphas)
    with pytest.raises(ValueError, match=r"got 5 words but 4 attention rows"):
        attention_figure(image, words + ["extra"], alphas)


def test_non_square_regions_rejected(example):
    image, words, _ = example
    with pytest.raises(ValueError, match=r"P=10 .*not a perfect square"):
        attention_figure(image, words, np.ones((4, 10)) / 10)


def test_bad_image_rejected(example):
    image, words, alphas = example
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\).*permute"):
        attention_figure(image.transpose(2, 0, 1), words, alphas)


def test_save_writes_png_atomically_without_pyplot_state(example, tmp_path):
    import matplotlib.pyplot as plt

    image, words, alphas = example
    before = plt.get_fignums()
    path = save_attention_figure(image, words, alphas, tmp_path / "figs" / "att.png", dpi=50,
                                 words_per_row=5)
    assert path == tmp_path / "figs" / "att.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        assert png.size == (5 * 2.4 * 50, 1 * 2.6 * 50)  # figsize * dpi: 5 panels in one row
    assert [p.name for p in path.parent.iterdir()] == ["att.png"]  # no temp file left behind
    assert plt.get_fignums() == before


def test_caption_text_table():
    table = caption_text_table([("17", "a dog | runs", ["a dog runs", "the dog is running"]),
                                ("3", "", ["a cat"])])
    lines = table.strip().split("\n")
    assert lines[0] == "| image | generated | references |"
    assert len(lines) == 4
    assert lines[2] == r"| 17 | a dog \| runs | a dog runs<br>the dog is running |"
    assert lines[3] == "| 3 |  | a cat |"
    with pytest.raises(ValueError, match="image_id, caption"):
        caption_text_table([("1", "a dog", "not a list")])
