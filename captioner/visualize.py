"""Attention figures (the tutorial's ``visualize_att``) and caption tables for TensorBoard.

Legend: H, W image size, L attention rows (one per generated word), P regions = g * g.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never ``pyplot``,
so nothing is registered in pyplot's global figure list and no GUI backend is touched:
safe in DataLoader workers, DDP ranks and headless servers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from captioner.files import atomic_write

START_WORD = "<start>"
END_WORD = "<end>"


def _as_numpy(alphas) -> np.ndarray:
    if hasattr(alphas, "detach"):  # torch.Tensor, without importing torch here
        alphas = alphas.detach().cpu().float().numpy()
    return np.asarray(alphas, dtype=np.float64)


def _check_inputs(image: np.ndarray, words: Sequence[str], alphas: np.ndarray) -> tuple[list[str], int]:
    """Validate; return the panel titles (one per alpha row) and the grid side g."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}; "
                         f"for a (3, H, W) tensor pass tensor.permute(1, 2, 0).numpy()")
    if alphas.ndim != 2:
        raise ValueError(f"alphas must be (L, P), got shape {alphas.shape}")
    num_rows, num_regions = alphas.shape
    grid = math.isqrt(num_regions)
    if grid * grid != num_regions:
        raise ValueError(f"alphas has P={num_regions} regions per row, which is not a perfect "
                         f"square g*g; alphas shape {alphas.shape} must be (L, enc_size**2)")
    words = [str(w) for w in words]
    if len(words) == num_rows:
        titles = words
    elif len(words) == num_rows - 1:  # the last row is the step that emitted <end>
        titles = words + [END_WORD]
    else:
        raise ValueError(f"got {len(words)} words but {num_rows} attention rows (alphas shape "
                         f"{alphas.shape}); pass one word per row, or every word but a final "
                         f"'{END_WORD}' whose row is the last one")
    return titles, grid


def upsample_attention(alpha: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """One attention row as an image-sized map.

    Args:
        alpha: (P,) or (g, g) weights.
        size: (H, W) of the output.
        smooth: bilinear interpolation then a Gaussian blur with sigma = one third of a
            grid cell (the tutorial's ``pyramid_expand(upscale=24, sigma=8)``); otherwise
            nearest neighbour, showing the g x g cells as blocks.

    Returns:
        (H, W) float64 map.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    grid = math.isqrt(alpha.size)
    if grid * grid != alpha.size:
        raise ValueError(f"attention row has {alpha.size} values, not a perfect square g*g")
    cells = alpha.reshape(grid, grid)
    height, width = size
    if not smooth:
        rows = np.arange(height) * grid // height
        cols = np.arange(width) * grid // width
        return cells[rows[:, None], cols[None, :]]  # (H, W)
    zoomed = ndimage.zoom(cells, (height / grid, width / grid), order=1, mode="nearest",
                          grid_mode=True)
    zoomed = zoomed[:height, :width]
    if zoomed.shape != (height, width):  # rounding in zoom: pad by edge values
        zoomed = np.pad(zoomed, ((0, height - zoomed.shape[0]), (0, width - zoomed.shape[1])),
                        mode="edge")
    sigma = (height / grid / 3.0, width / grid / 3.0)
    return ndimage.gaussian_filter(zoomed, sigma=sigma, mode="nearest")


def attention_figure(image: np.ndarray, words: Sequence[str], alphas, smooth: bool = True,
                     words_per_row: int = 5, upscale_to: int | None = None,
                     cmap: str = "Greys_r", overlay_alpha: float = 0.6) -> Figure:
    """Per-word attention heat maps over the image.

    The first panel shows the image titled ``<start>``; panel ``t + 1`` shows the image
    with attention row ``t`` upsampled to the image size and overlaid (opacity
    ``overlay_alpha``, colour scale per panel), titled with word ``t``.

    Accepted lengths: ``len(words) == L`` (one word per row; a finished caption from
    :class:`captioner.search.Hypothesis` is its words plus ``"<end>"``), or
    ``len(words) == L - 1``, in which case the last row is labelled ``"<end>"``.

    Args:
        image: uint8 (H, W, 3).
        words: the generated words, without ``<start>``.
        alphas: (L, P) numpy array or tensor, P = g * g.
        smooth: bilinear + Gaussian blur (True) or nearest-neighbour blocks (False).
        words_per_row: panels per row of the figure.
        upscale_to: resize the image to (upscale_to, upscale_to) first (the tutorial uses
            14 * 24 = 336); None keeps its size.
        cmap: matplotlib colormap of the overlay (``"Greys_r"`` as in the tutorial, or ``"jet"``).
        overlay_alpha: opacity of the heat map.

    Returns:
        A ``matplotlib.figure.Figure`` with an Agg canvas and ``1 + L`` axes.
    """
    image = np.asarray(image)
    alphas = _as_numpy(alphas)
    titles, grid = _check_inputs(image, words, alphas)
    if words_per_row < 1:
        raise ValueError(f"words_per_row must be >= 1, got {words_per_row}")
    if upscale_to is not None:
        if upscale_to < 1:
            raise ValueError(f"upscale_to must be a positive size in pixels, got {upscale_to}")
        image = np.asarray(Image.fromarray(image).resize((upscale_to, upscale_to), Image.LANCZOS))
    height, width = image.shape[:2]

    num_panels = 1 + len(titles)
    num_cols = min(words_per_row, num_panels)
    num_rows = math.ceil(num_panels / num_cols)
    figure = Figure(figsize=(2.4 * num_cols, 2.6 * num_rows))
    FigureCanvasAgg(figure)
    for index, title in enumerate([START_WORD] + titles):
        ax = figure.add_subplot(num_rows, num_cols, index + 1)
        ax.imshow(image)
        if index > 0:
            heat = upsample_attention(alphas[index - 1], (height, width), smooth=smooth)
            ax.imshow(heat, alpha=overlay_alpha, cmap=cmap)
        ax.set_title(title, fontsize=12)
        ax.set_axis_off()
    figure.tight_layout()
    return figure


def save_attention_figure(image: np.ndarray, words: Sequence[str], alphas, path: str | os.PathLike,
                          dpi: int = 100, **kwargs) -> Path:
    """Build :func:`attention_figure` and write it as a PNG atomically (temp file, then rename).

    Args:
        image, words, alphas: as for :func:`attention_figure`.
        path: where the PNG goes; parent folders are created.
        dpi: resolution of the PNG.
        **kwargs: passed to :func:`attention_figure`.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    figure = attention_figure(image, words, alphas, **kwargs)
    try:
        with atomic_write(path, "wb") as f:
            figure.savefig(f, format="png", dpi=dpi)
    finally:
        figure.clear()  # a pyplot-free figure has nothing else to close
    return path


def _markdown_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def caption_text_table(rows: Sequence[tuple[str, str, Sequence[str]]]) -> str:
    """A markdown table for TensorBoard's text tab: image id, generated caption, references.

    Args:
        rows: ``(image_id, generated caption, [reference captions])`` per image.

    Returns:
        Markdown with a header row and one row per image; references are separated by
        ``<br>`` (TensorBoard renders it as a line break) and ``|`` is escaped.
    """
    lines = ["| image | generated | references |", "|---|---|---|"]
    for row in rows:
        if len(row) != 3 or isinstance(row[2], str):
            raise ValueError(f"caption_text_table rows are (image_id, caption, [references]), "
                             f"got {row!r}")
        image_id, caption, references = row
        refs = "<br>".join(_markdown_cell(r) for r in references)
        lines.append(f"| {_markdown_cell(image_id)} | {_markdown_cell(caption)} | {refs} |")
    return "\n".join(lines) + "\n"
