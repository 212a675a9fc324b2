"""The built-in synthetic dataset: coloured shapes on a dark background, true captions.

Each image holds one shape (40%) or two non-overlapping shapes (circle, square or
triangle; red, green, blue, yellow, purple or white with a small jitter; small or large).
Each image gets five different captions, all true, from 17 templates with synonyms:
colour, size, kind and, for two shapes, their spatial relation ("a small red circle to
the left of a big blue square"). A relation is used only when the two bounding boxes are
separated along that axis (so it is unambiguous); images are sampled so at least one axis
is. The whole dataset is a function of the settings and the seed.

Output under ``root``: ``images/{imgid:06d}.png`` and ``dataset_shapes.json`` in Karpathy's
format (``filepath``, ``filename``, ``imgid``, ``split``, ``sentences``) with two extra keys
per image: ``shapes`` (the drawn ground truth: ``kind``, ``colour``, ``size``, ``bbox``
``[x0, y0, x1, y1]`` inclusive pixels, ``centre`` ``[x, y]``, ``rgb``) and ``relations``
(the true relation words of ``shapes[0]`` to ``shapes[1]``), and a top-level
``fingerprint`` of the settings. The JSON is written last: it marks the data as complete.

Run alone with ``python -m captioner.data.shapes ROOT``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

from captioner.data.preprocess import exclusive_lock
from captioner.files import write_json_atomic

GENERATOR_VERSION = 1
JSON_NAME = "dataset_shapes.json"
KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 50, 50), "green": (60, 190, 60), "blue": (60, 100, 240),
           "yellow": (235, 220, 50), "purple": (160, 70, 210), "white": (230, 230, 230)}
COLOUR_JITTER = 12
# Half-extent of a shape's box as a fraction of the image side.
SIZES = {"small": (0.09, 0.12), "large": (0.17, 0.21)}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
                  "above": ("above", "over"), "below": ("below", "under", "beneath")}
_GAP = 2  # pixels between the boxes of two shapes, along the axis that separates them
_PNG_NAME = re.compile(r"\d{6}\.png")

_ONE_SHAPE_TEMPLATES = (
    "{a}", "there is {a}", "{a} on a dark background", "a picture of {a}", "an image of {a}",
    "{a_plain}", "the {kind_a} is {colour_a}", "a single {a_words}", "{a} in the picture",
)
_TWO_SHAPE_TEMPLATES = (
    "{a} {rel} {b}", "there is {a} {rel} {b}", "{a} is {rel} {b}", "{a} and {b}",
    "a picture of {a} and {b}", "the {colour_a} {kind_a} is {rel} the {colour_b} {kind_b}",
    "an image of {a} and {b}", "{a_plain} {rel} {b_plain}",
)


def generate_shapes(root: str | os.PathLike, num_train: int = 4000, num_val: int = 500,
                    num_test: int = 500, image_size: int = 64, seed: int = 0,
                    overwrite: bool = False) -> Path:
    """Draw the shapes dataset under ``root`` unless it is already there with these settings.

    Args:
        root: output folder (created); images go to ``root/images``.
        num_train, num_val, num_test: images per split (imgids 0.. in that order).
        image_size: side S of the square PNGs (>= 32).
        seed: the dataset is a function of the settings and this seed.
        overwrite: regenerate even when the existing data has the same settings.

    Returns:
        Path of ``root/dataset_shapes.json`` (Karpathy format plus ground truth).
    """
    for arg, value, low in (("num_train", num_train, 1), ("num_val", num_val, 0),
                            ("num_test", num_test, 0), ("image_size", image_size, 32)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
    root = Path(root)
    json_path = root / JSON_NAME
    settings = {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
                "num_test": num_test, "image_size": image_size, "seed": seed}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    with exclusive_lock(root / ".shapes.lock"):
        if not overwrite and _stored_fingerprint(json_path) == fingerprint:
            return json_path
        json_path.unlink(missing_ok=True)  # incomplete from here until the final rename
        image_dir = root / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        for old in image_dir.iterdir():
            if _PNG_NAME.fullmatch(old.name):
                old.unlink()
        splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
        entries = []
        for imgid, split in enumerate(splits):
            rng = random.Random(f"shapes:{seed}:{imgid}")
            image, shapes, relations = draw_scene(rng, image_size)
            filename = f"{imgid:06d}.png"
            image.save(image_dir / filename, format="PNG", compress_level=1)
            entries.append({
                "filepath": "images", "filename": filename, "imgid": imgid, "split": split,
                "sentences": [{"tokens": c.split(), "raw": c} for c in captions(rng, shapes, relations)],
                "shapes": shapes, "relations": relations})
        write_json_atomic(json_path, {"dataset": "shapes", "fingerprint": fingerprint,
                                      "settings": settings, "images": entries})
    return json_path


def _stored_fingerprint(json_path: Path) -> str | None:
    try:
        with open(json_path) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def draw_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, list[dict], list[str]]:
    """Draw one image.

    Returns:
        (RGB image S x S, ground-truth shapes, true relations of shape 0 to shape 1 as
        keys of ``RELATION_WORDS``; empty for one shape).
    """
    s = image_size
    background = rng.randint(15, 40)
    num_shapes = 1 if rng.random() < 0.4 else 2
    shapes: list[dict] = []
    failures = 0
    while len(shapes) < num_shapes:
        if failures >= 20:
            # The first shape leaves no clear room for a second one (small canvases with a
            # large, central first shape): start the scene over instead of looping forever.
            shapes.clear()
            failures = 0
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        if shapes and (kind, colour) == (shapes[0]["kind"], shapes[0]["colour"]):
            continue  # two identical shapes would make "the red circle" ambiguous
        size = rng.choice(list(SIZES))
        low, high = SIZES[size]
        r = round(rng.uniform(low, high) * s)
        for _ in range(100):
            cx, cy = rng.randint(r + 1, s - r - 2), rng.randint(r + 1, s - r - 2)
            shape = {"kind": kind, "colour": colour, "size": size,
                     "bbox": [cx - r, cy - r, cx + r, cy + r], "centre": [cx, cy]}
            if not shapes or spatial_relations(shapes[0], shape):
                break
        else:
            failures += 1
            continue  # no clear placement for this size: draw another shape
        base = COLOURS[colour]
        shape["rgb"] = [min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in base]
        shapes.append(shape)
    image = Image.new("RGB", (s, s), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        x0, y0, x1, y1 = shape["bbox"]
        fill = tuple(shape["rgb"])
        if shape["kind"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape["kind"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    relations = spatial_relations(shapes[0], shapes[1]) if num_shapes == 2 else []
    return image, shapes, relations


def spatial_relations(a: dict, b: dict) -> list[str]:
    """Relations of shape ``a`` to shape ``b`` that hold with boxes apart by > _GAP pixels.

    Returns:
        A subset of ``["left", "right", "above", "below"]`` (image y grows downwards).
    """
    ax0, ay0, ax1, ay1 = a["bbox"]
    bx0, by0, bx1, by1 = b["bbox"]
    relations = []
    if ax1 + _GAP < bx0:
        relations.append("left")
    if bx1 + _GAP < ax0:
        relations.append("right")
    if ay1 + _GAP < by0:
        relations.append("above")
    if by1 + _GAP < ay0:
        relations.append("below")
    return relations


_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def captions(rng: random.Random, shapes: list[dict], relations: list[str], count: int = 5) -> list[str]:
    """``count`` different true captions of a scene drawn by :func:`draw_scene`."""
    found: list[str] = []
    for _ in range(1000):
        if len(shapes) == 1:
            words = _phrase_words(rng, shapes[0], "a")
            caption = rng.choice(_ONE_SHAPE_TEMPLATES).format(**words)
        else:
            first, second = (0, 1) if rng.random() < 0.5 else (1, 0)
            relation = rng.choice(relations)
            if first == 1:
                relation = _INVERSE[relation]
            words = {**_phrase_words(rng, shapes[first], "a"), **_phrase_words(rng, shapes[second], "b"),
                     "rel": rng.choice(RELATION_WORDS[relation])}
            caption = rng.choice(_TWO_SHAPE_TEMPLATES).format(**words)
        if caption not in found:
            found.append(caption)
            if len(found) == count:
                return found
    raise RuntimeError(f"could not find {count} different captions for {shapes}")


def _phrase_words(rng: random.Random, shape: dict, key: str) -> dict[str, str]:
    size = rng.choice(SIZE_WORDS[shape["size"]])
    return {key: f"a {size} {shape['colour']} {shape['kind']}",
            f"{key}_plain": f"a {shape['colour']} {shape['kind']}",
            f"{key}_words": f"{size} {shape['colour']} {shape['kind']}",
            f"colour_{key}": shape["colour"], f"kind_{key}": shape["kind"]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m captioner.data.shapes",
                                     description="Draw the built-in shapes dataset.")
    parser.add_argument("root")
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_val", type=int, default=500)
    parser.add_argument("--num_test", type=int, default=500)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    path = generate_shapes(**vars(parser.parse_args(argv)))
    print(path)
    return path


if __name__ == "__main__":
    main()
