"""Tests of the built-in synthetic shapes retrieval set."""

import collections
import hashlib
import inspect

import datasets
import numpy as np
import pytest

from dataset_scripts.synthetic_shapes import (
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZE_WORDS,
    ShapeObject,
    describe_scene,
    generate_synthetic_dataset,
    main,
    render_scene,
    sample_scenes,
)

SMALL = dict(train_images=30, dev_images=6, test_images=20)


def fingerprint(dataset_dict: datasets.DatasetDict) -> str:
    """A hash of every split's PNG bytes, ids, file names and captions."""
    digest = hashlib.sha256()
    for split, rows in sorted(dataset_dict.items()):
        raw = rows.cast_column("image", datasets.Image(decode=False))
        for row in raw:
            digest.update(split.encode())
            digest.update(row["image"]["bytes"])
            digest.update(repr((row["image_id"], row["filename"], row["captions"])).encode())
    return digest.hexdigest()


def test_same_seed_same_bytes_different_seed_different_bytes():
    first = generate_synthetic_dataset(seed=3, num_proc=1, **SMALL)
    assert fingerprint(generate_synthetic_dataset(seed=3, num_proc=2, **SMALL)) == fingerprint(first)
    assert fingerprint(generate_synthetic_dataset(seed=4, num_proc=1, **SMALL)) != fingerprint(first)


def test_a_split_does_not_depend_on_the_other_split_sizes():
    small = generate_synthetic_dataset(seed=0, train_images=5, dev_images=0, test_images=20, num_proc=1)
    large = generate_synthetic_dataset(seed=0, train_images=40, dev_images=3, test_images=20, num_proc=1)
    assert set(small) == {"train", "test"}
    assert fingerprint(datasets.DatasetDict(test=small["test"])) == fingerprint(
        datasets.DatasetDict(test=large["test"])
    )


def test_counts_schema_and_ids(tmp_path):
    main(["--output_dir", str(tmp_path / "shapes"), "--seed", "1", "--train_images", "30", "--dev_images", "6",
          "--test_images", "20", "--image_size", "48", "--num_proc", "1"])  # fmt: skip
    loaded = datasets.load_from_disk(str(tmp_path / "shapes"))
    assert {split: len(rows) for split, rows in loaded.items()} == {"train": 30, "dev": 6, "test": 20}
    all_ids = []
    for split, rows in loaded.items():
        assert list(rows.features) == ["image", "image_id", "filename", "captions"]
        assert isinstance(rows.features["image"], datasets.Image)
        for row in rows:
            assert row["image"].size == (48, 48) and row["image"].mode == "RGB"
            assert len(row["captions"]) == len(set(row["captions"])) == 5
            assert row["filename"] == f"{split}/{row['image_id']:07d}.png"
        all_ids += rows["image_id"]
    assert len(set(all_ids)) == len(all_ids) == 56


def test_every_caption_states_every_objects_attributes():
    rng = np.random.default_rng(0)
    for scene in sample_scenes(200, rng):
        assert 1 <= len(scene) <= 3
        assert len({shape_object.cell for shape_object in scene}) == len(scene)  # one object per cell
        for caption in describe_scene(scene, rng):
            for shape_object in scene:
                assert shape_object.colour in caption and shape_object.shape in caption
                assert any(word in caption.split() for word in SIZE_WORDS[shape_object.size])
                assert any(phrase in caption for phrase in POSITION_PHRASES[POSITIONS[shape_object.cell]])


def test_scenes_are_distinct_and_include_rebound_hard_negatives():
    scenes = sample_scenes(1000, np.random.default_rng(0))
    assert len({frozenset(scene) for scene in scenes}) == 1000
    assert {len(scene) for scene in scenes} == {1, 2, 3}
    # Images with the same objects' attributes as a multiset but bound differently.
    attribute_counts = collections.Counter(
        tuple(sorted(attribute for o in scene for attribute in (o.shape, o.colour, o.size, str(o.cell))))
        for scene in scenes
    )
    in_groups = sum(count for count in attribute_counts.values() if count > 1)
    assert in_groups >= 300
    assert {o.shape for scene in scenes for o in scene} == set(SHAPES)
    assert {o.colour for scene in scenes for o in scene} == set(COLOURS)


def test_objects_are_drawn_where_and_as_the_captions_say():
    scene = (
        ShapeObject(shape="square", colour="red", size="large", cell=(0, 0)),
        ShapeObject(shape="square", colour="blue", size="small", cell=(2, 2)),
    )
    pixels = render_scene(scene, 64, np.random.default_rng(0)).astype(int)  # (64, 64, 3)
    assert pixels.shape == (64, 64, 3)
    top_left, bottom_right, centre = pixels[8:14, 8:14], pixels[50:56, 50:56], pixels[29:35, 29:35]
    assert np.abs(top_left.mean((0, 1)) - COLOURS["red"]).max() < 25
    assert np.abs(bottom_right.mean((0, 1)) - COLOURS["blue"]).max() < 25
    assert np.ptp(centre.mean((0, 1))) < 10  # background: grey
    # A small square covers well under half the area of a large one (radius 0.09 against 0.145).
    red_area = (np.abs(pixels - COLOURS["red"]).max(-1) < 40).sum()
    blue_area = (np.abs(pixels - COLOURS["blue"]).max(-1) < 40).sum()
    assert red_area > 2 * blue_area > 0


def test_default_sizes_are_the_flickr30k_shape():
    # Generation time of the default set is measured, not asserted: see the README (timing is not a unit test).
    defaults = {name: p.default for name, p in inspect.signature(generate_synthetic_dataset).parameters.items()}
    assert defaults["train_images"] >= 5000
    assert (defaults["dev_images"], defaults["test_images"], defaults["image_size"]) == (500, 1000, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(test_images=-1), "test_images must be in"), (dict(image_size=8), "image_size must be at least 16")],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(**{**SMALL, **kwargs})
