"""The built-in synthetic retrieval set: coloured shapes on a noisy background, with wordy captions.

    python -m dataset_scripts.synthetic_shapes --output_dir data/shapes --seed 0 \
        --train_images 8000 --dev_images 500 --test_images 1000

Same schema as `build_retrieval_dataset.py` (splits `train`, `dev`, `test`; one
row per image: `image` PNG bytes, `image_id`, `filename`, `captions`), so the
Trainer script reads either. Deterministic for a seed: the same seed gives the
same PNG bytes, and each split depends only on (seed, split), not on the
sizes of the other splits or on `num_proc`.

What is in it, and why:
- Each image (default 64×64) has 1-3 objects, each a shape (6 kinds), colour
  (7), size (small/large) and position (a cell of a 3×3 grid, one object per
  cell). Objects are large, saturated and centred in their cells, and the
  background noise is moderate, so a tiny ViT learns them in minutes.
- Each image has 5 different captions, from varied templates, that state every
  object's colour, size, shape and position, in varied order, padded with
  filler and modifiers ("a photo that clearly shows", "a rather nice", ...):
  the redundant words SCTA's word aggregation is meant to merge away.
  `--caption_redundancy` sets how much of it there is: `none` (the bare
  attribute phrases: "a small red circle at the top and ..."), `default` (the
  above), `heavy` (a filler prefix, a modifier on every object, filler phrases
  between objects and a filler suffix in every caption). Only the captions
  change: the images and scenes of a seed are the same at every level.
- Hard negatives: no two images of a split have the same set of objects, and
  about a third of the images are made from the previous one by rotating one
  attribute among its objects ("red circle + blue square" then "blue circle +
  red square"), so retrieval needs the binding of attributes, not just their
  presence. Captions never say left/right of each other, only absolute
  positions; train without horizontal flips (they would contradict "left").
- Default sizes: train 8,000 images (40,000 pairs: about 10 s of generation
  on 2 cores, enough variety that the 1,000 test images are mostly
  combinations not seen in training), dev 500, test 1,000 (5,000 captions,
  the size of the Flickr30K test).
"""

import argparse
import dataclasses
import io
import json
import logging
import multiprocessing
import os
from multiprocessing.pool import Pool
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from dataset_scripts import FEATURES


logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
# Object radius as a fraction of the image side. Cells are 1/3 of the side apart, so
# two large objects in neighbouring cells never touch, even with the position jitter.
RADIUS = {"small": 0.09, "large": 0.145}
POSITION_JITTER = 0.02
# Grid cell (row, column) -> name, reading order.
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
OBJECT_COUNT_PROBABILITIES = {1: 0.2, 2: 0.4, 3: 0.4}
HARD_NEGATIVE_RATE = 0.35
CAPTIONS_PER_IMAGE = 5
SPLITS = ("train", "dev", "test")
# image_id = split offset + index, unique across the splits.
SPLIT_ID_OFFSET = 1_000_000

POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the upper left"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right corner", "at the upper right"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the lower left"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
OBJECT_TEMPLATES = (
    "{size} {colour} {shape} {position}",
    "{colour} {shape} that is {size} {position}",
    "{size} {shape} coloured {colour} {position}",
    "{modifier} {size} {colour} {shape} {position}",
    "{size} {colour} {shape} sitting {position}",
)
POSITION_FIRST_TEMPLATE = "{position} there is {article_size} {colour} {shape}"
MODIFIERS = ("rather nice", "very clear", "nicely drawn", "pretty", "simple", "plain", "neat")
PREFIXES = (
    "",
    "a photo that clearly shows",
    "in this picture we can see",
    "an image of",
    "this is a picture with",
    "here we have",
    "a simple drawing showing",
    "we can clearly see",
)
JOINERS = (" and ", ", ", " as well as ", " together with ", " plus ")
SUFFIXES = ("", " on a noisy background", ", which looks quite nice", " in a simple picture", " on a grey background")
# How much filler and modification the captions carry (`describe_scene`); "default" is the set as published.
CAPTION_REDUNDANCY = ("none", "default", "heavy")
# "none": the attribute words and the position, nothing else.
BARE_TEMPLATES = ("{size} {colour} {shape} {position}", "{position} {article_size} {colour} {shape}")
BARE_JOINERS = (" and ", ", ")
# "heavy": filler between objects, on top of the default's prefixes, modifiers and suffixes.
FILLERS = ("if you look closely", "as you can clearly see", "quite honestly", "in a rather simple way", "it seems")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, column) in the 3×3 grid


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


def _random_scene(rng: np.random.Generator) -> tuple[ShapeObject, ...]:
    counts = list(OBJECT_COUNT_PROBABILITIES)
    num_objects = counts[rng.choice(len(counts), p=list(OBJECT_COUNT_PROBABILITIES.values()))]
    cells = list(POSITIONS)
    chosen_cells = rng.choice(len(cells), size=num_objects, replace=False)
    colour_names = list(COLOURS)
    return tuple(
        ShapeObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=colour_names[rng.integers(len(colour_names))],
            size=SIZES[rng.integers(len(SIZES))],
            cell=cells[cell_index],
        )
        for cell_index in chosen_cells
    )


def _rebind(scene: tuple[ShapeObject, ...], rng: np.random.Generator) -> tuple[ShapeObject, ...]:
    """The same attribute values bound differently: one attribute rotated among the objects."""
    attributes = [name for name in ("shape", "colour", "size", "cell") if len({getattr(o, name) for o in scene}) > 1]
    attribute = attributes[rng.integers(len(attributes))]
    values = [getattr(o, attribute) for o in scene]
    rotated = values[1:] + values[:1]
    return tuple(dataclasses.replace(o, **{attribute: value}) for o, value in zip(scene, rotated))


def sample_scenes(num_images: int, rng: np.random.Generator) -> list[tuple[ShapeObject, ...]]:
    """`num_images` scenes, no two with the same set of objects; about `HARD_NEGATIVE_RATE` are rebindings."""
    scenes: list[tuple[ShapeObject, ...]] = []
    seen: set[frozenset[ShapeObject]] = set()
    attempts = 0
    while len(scenes) < num_images:
        attempts += 1
        if attempts > 100 * num_images + 1000:
            raise ValueError(f"Could not draw {num_images} distinct scenes; ask for fewer images.")
        if scenes and len(scenes[-1]) > 1 and rng.random() < HARD_NEGATIVE_RATE:
            candidate = _rebind(scenes[-1], rng)
        else:
            candidate = _random_scene(rng)
        key = frozenset(candidate)
        if key not in seen:
            seen.add(key)
            scenes.append(candidate)
    return scenes


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe_object(shape_object: ShapeObject, rng: np.random.Generator, first: bool) -> str:
    """One phrase stating the object's size, colour, shape and position.

    A phrase starting with the position ("at the top there is ...") is used
    only after the first object, where it reads as a sentence of its own.
    """

    def pick(options):
        return options[rng.integers(len(options))]

    words = {
        "size": pick(SIZE_WORDS[shape_object.size]),
        "colour": shape_object.colour,
        "shape": shape_object.shape,
        "position": pick(POSITION_PHRASES[POSITIONS[shape_object.cell]]),
        "modifier": pick(MODIFIERS),
    }
    if not first and rng.random() < 0.3:
        return POSITION_FIRST_TEMPLATE.format(article_size=_with_article(words["size"]), **words)
    return _with_article(pick(OBJECT_TEMPLATES).format(**words))


def _describe_object_bare(shape_object: ShapeObject, rng: np.random.Generator, first: bool) -> str:
    """The object's size, colour, shape and position, with no other word ("none" redundancy)."""
    size = SIZE_WORDS[shape_object.size][rng.integers(2)]
    position = POSITION_PHRASES[POSITIONS[shape_object.cell]][rng.integers(2)]
    template = BARE_TEMPLATES[rng.integers(len(BARE_TEMPLATES))]
    phrase = template.format(
        size=size,
        colour=shape_object.colour,
        shape=shape_object.shape,
        position=position,
        article_size=_with_article(size),
    )
    return _with_article(phrase) if template.startswith("{size}") else phrase


def _describe_object_heavy(shape_object: ShapeObject, rng: np.random.Generator, first: bool) -> str:
    """The default phrase, always with a modifier ("heavy" redundancy)."""
    phrase = _describe_object(shape_object, rng, first)
    if any(modifier in phrase for modifier in MODIFIERS):
        return phrase
    modifier = MODIFIERS[rng.integers(len(MODIFIERS))]
    return f"{phrase}, {_with_article(modifier)} one"


def describe_scene(scene: tuple[ShapeObject, ...], rng: np.random.Generator, redundancy: str = "default") -> list[str]:
    """`CAPTIONS_PER_IMAGE` different captions, each stating every object's attributes, with `redundancy`
    (one of `CAPTION_REDUNDANCY`) filler and modification around them."""
    if redundancy == "none":
        return _describe_scene_bare(scene, rng)
    if redundancy == "heavy":
        return _describe_scene_heavy(scene, rng)
    if redundancy != "default":
        raise ValueError(f"caption redundancy {redundancy!r} is not one of {', '.join(CAPTION_REDUNDANCY)}.")

    def one_caption() -> str:
        order = rng.permutation(len(scene))
        phrases = [_describe_object(scene[index], rng, first=rank == 0) for rank, index in enumerate(order)]
        joiner = JOINERS[rng.integers(len(JOINERS))]
        body = phrases[0] if len(phrases) == 1 else joiner.join(phrases[:-1]) + " and " + phrases[-1]
        prefix = PREFIXES[rng.integers(len(PREFIXES))]
        caption = (f"{prefix} {body}" if prefix else body) + SUFFIXES[rng.integers(len(SUFFIXES))]
        return caption + " ." if rng.random() < 0.5 else caption

    return _distinct(one_caption)


def _distinct(one_caption) -> list[str]:
    """`CAPTIONS_PER_IMAGE` different captions from repeated calls of `one_caption`."""
    captions: list[str] = []
    while len(captions) < CAPTIONS_PER_IMAGE:
        caption = one_caption()
        if caption not in captions:
            captions.append(caption)
    return captions


def _describe_scene_bare(scene: tuple[ShapeObject, ...], rng: np.random.Generator) -> list[str]:
    def one_caption() -> str:
        order = rng.permutation(len(scene))
        phrases = [_describe_object_bare(scene[index], rng, first=rank == 0) for rank, index in enumerate(order)]
        joiner = BARE_JOINERS[rng.integers(len(BARE_JOINERS))]
        return phrases[0] if len(phrases) == 1 else joiner.join(phrases[:-1]) + " and " + phrases[-1]

    return _distinct(one_caption)


def _describe_scene_heavy(scene: tuple[ShapeObject, ...], rng: np.random.Generator) -> list[str]:
    def one_caption() -> str:
        order = rng.permutation(len(scene))
        phrases = [_describe_object_heavy(scene[index], rng, first=rank == 0) for rank, index in enumerate(order)]
        body = phrases[0]
        for phrase in phrases[1:]:
            connective = JOINERS[rng.integers(len(JOINERS))].strip(" ,")  # "and", "", "as well as", ...
            body += f"{' ' + connective if connective else ''}, {FILLERS[rng.integers(len(FILLERS))]}, {phrase}"
        prefix = PREFIXES[1 + rng.integers(len(PREFIXES) - 1)]  # never the empty prefix
        caption = f"{prefix} {body}{SUFFIXES[1 + rng.integers(len(SUFFIXES) - 1)]}"
        return caption + " ." if rng.random() < 0.5 else caption

    return _distinct(one_caption)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape of radius 1, on offsets (u, v) from its centre (v points down)."""
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (np.abs(u) <= 0.95 * (v + 0.95) / 1.75)
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1))
    if shape == "ring":
        return (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.5**2)
    raise ValueError(f"Unknown shape {shape!r}; shapes are {SHAPES}.")


def render_scene(
    scene: tuple[ShapeObject, ...], image_size: int, rng: np.random.Generator, object_scale: float = 1.0
) -> np.ndarray:
    """uint8 (image_size, image_size, 3): noisy grey background, then the objects, `object_scale` x their usual
    size (`RADIUS`; positions do not change)."""
    # Background: a grey level, a smooth 4×4 variation upsampled, and per-pixel noise.
    base = rng.uniform(40, 110)
    coarse = rng.uniform(-20, 20, size=(4, 4)).astype(np.float32)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((image_size, image_size), PIL.Image.BILINEAR))
    image = np.repeat((base + smooth)[:, :, None], 3, axis=2)  # (S, S, 3)

    # Shapes drawn at 2× resolution and averaged down, for smooth edges.
    supersample = 2
    coordinates = (np.arange(image_size * supersample) + 0.5) / supersample  # pixel centres
    cell_size = image_size / 3
    for shape_object in scene:
        row, column = shape_object.cell
        centre_x = (column + 0.5) * cell_size + rng.uniform(-1, 1) * POSITION_JITTER * image_size
        centre_y = (row + 0.5) * cell_size + rng.uniform(-1, 1) * POSITION_JITTER * image_size
        radius = RADIUS[shape_object.size] * object_scale * image_size
        u = (coordinates[None, :] - centre_x) / radius
        v = (coordinates[:, None] - centre_y) / radius
        mask = _shape_mask(shape_object.shape, u, v).astype(np.float32)  # (2S, 2S)
        coverage = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))  # (S, S)
        colour = np.array(COLOURS[shape_object.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        image = image * (1 - coverage[:, :, None]) + colour * coverage[:, :, None]

    # Grey (not per-channel) noise in 2×2 grains: as visible as per-pixel colour noise, but
    # the PNGs are half the size (3.3 KB against 8.9 KB per 64×64 image, measured).
    grains = rng.normal(0, 8, size=((image_size + 1) // 2, (image_size + 1) // 2, 1))
    image += np.repeat(np.repeat(grains, 2, axis=0), 2, axis=1)[:image_size, :image_size]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _render_png(job: tuple[tuple[ShapeObject, ...], int, tuple[int, ...], float]) -> bytes:
    scene, image_size, seed_words, object_scale = job
    pixels = render_scene(scene, image_size, np.random.default_rng(list(seed_words)), object_scale)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


def _generate_split(
    split: str,
    num_images: int,
    seed: int,
    image_size: int,
    pool: Pool | None,
    redundancy: str = "default",
    object_scale: float = 1.0,
) -> datasets.Dataset:
    split_index = SPLITS.index(split)
    rng = np.random.default_rng([seed, split_index])
    scenes = sample_scenes(num_images, rng)
    captions = [describe_scene(scene, rng, redundancy) for scene in scenes]
    jobs = [(scene, image_size, (seed, split_index, index), object_scale) for index, scene in enumerate(scenes)]
    png_images = pool.map(_render_png, jobs, chunksize=64) if pool else [_render_png(job) for job in jobs]
    image_ids = [split_index * SPLIT_ID_OFFSET + index for index in range(num_images)]
    description = (
        f"Synthetic shapes retrieval set, {split} split (seed {seed}, {image_size}x{image_size} images): "
        f"{num_images} images, {CAPTIONS_PER_IMAGE} captions each, {redundancy} caption redundancy, objects at "
        f"{object_scale:g}x their usual size. Made by "
        "dataset_scripts/synthetic_shapes.py."
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png, "path": None} for png in png_images],
            "image_id": image_ids,
            "filename": [f"{split}/{image_id:07d}.png" for image_id in image_ids],
            "captions": captions,
        },
        info=datasets.DatasetInfo(description=description, features=FEATURES),
        split=split,
    )


def generate_synthetic_dataset(
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    train_images: int = 8000,
    dev_images: int = 500,
    test_images: int = 1000,
    image_size: int = 64,
    num_proc: int | None = None,
    caption_redundancy: str = "default",
    object_scale: float = 1.0,
) -> datasets.DatasetDict:
    """Generate the synthetic set (and `save_to_disk` it to `output_dir` when given).

    A split with 0 images is left out. `num_proc` processes render the images
    (default: all CPU cores); it does not change the result. `caption_redundancy`
    (`CAPTION_REDUNDANCY`) sets how much filler the captions carry. `object_scale`
    multiplies the objects' size (captions and positions unchanged): with 128-px
    images, 16-px patches and 0.5, a small object (11.5 px across) fits inside one
    patch, so that a patch selection has something to select.
    """
    if caption_redundancy not in CAPTION_REDUNDANCY:
        raise ValueError(f"caption_redundancy={caption_redundancy!r} is not one of {', '.join(CAPTION_REDUNDANCY)}.")
    sizes = {"train": train_images, "dev": dev_images, "test": test_images}
    for split, num_images in sizes.items():
        if not 0 <= num_images < SPLIT_ID_OFFSET:
            raise ValueError(f"{split}_images must be in [0, {SPLIT_ID_OFFSET}), got {num_images}.")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels for the shapes to be recognisable, got {image_size}.")
    if not 0 < object_scale <= 2:
        raise ValueError(f"object_scale must be in (0, 2] (1: the usual size), got {object_scale}.")
    num_proc = num_proc or os.cpu_count() or 1
    pool = multiprocessing.Pool(num_proc) if num_proc > 1 else None
    try:
        dataset_dict = datasets.DatasetDict(
            {
                split: _generate_split(split, num_images, seed, image_size, pool, caption_redundancy, object_scale)
                for split, num_images in sizes.items()
                if num_images
            }
        )
    finally:
        if pool:
            pool.close()
            pool.join()
    if output_dir is not None:
        dataset_dict.save_to_disk(str(output_dir))
        logger.info("Saved the synthetic set %s to %s", {s: len(d) for s, d in dataset_dict.items()}, output_dir)
    return dataset_dict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, help="where to save_to_disk the set (a datasets folder)")
    parser.add_argument(
        "--png_dir",
        type=Path,
        help="also (or instead) write the images as files, SPLIT/NAME.png, with SPLIT/metadata.jsonl (file_name, captions)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=8000)
    parser.add_argument("--dev_images", type=int, default=500)
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_proc", type=int, default=None, help="processes rendering images (default: all cores)")
    parser.add_argument(
        "--caption_redundancy",
        choices=CAPTION_REDUNDANCY,
        default="default",
        help="how much filler and modification the captions carry (images do not change)",
    )
    parser.add_argument(
        "--object_scale", type=float, default=1.0, help="the objects' size, x the usual (captions do not change)"
    )
    args = parser.parse_args(argv)
    if args.output_dir is None and args.png_dir is None:
        parser.error("give --output_dir, --png_dir or both")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dataset = generate_synthetic_dataset(
        output_dir=args.output_dir,
        seed=args.seed,
        train_images=args.train_images,
        dev_images=args.dev_images,
        test_images=args.test_images,
        image_size=args.image_size,
        num_proc=args.num_proc,
        caption_redundancy=args.caption_redundancy,
        object_scale=args.object_scale,
    )
    if args.png_dir is not None:
        write_png_files(dataset, args.png_dir)


def write_png_files(dataset: datasets.DatasetDict, folder: Path) -> None:
    """Each split's images as `folder/SPLIT/NNNNNNN.png` files, and `folder/SPLIT/metadata.jsonl` (imagefolder
    metadata: `file_name`, `captions`), e.g. to index them with scta-search."""
    for split, rows in dataset.items():
        target = Path(folder) / split
        target.mkdir(parents=True, exist_ok=True)
        raw = rows.cast_column("image", datasets.Image(decode=False))
        with open(target / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for row in raw:
                name = Path(row["filename"]).name
                (target / name).write_bytes(row["image"]["bytes"])
                metadata.write(json.dumps({"file_name": name, "captions": row["captions"]}) + "\n")
        logger.info("Wrote %d PNG files and metadata.jsonl to %s", len(rows), target)


if __name__ == "__main__":
    main()
