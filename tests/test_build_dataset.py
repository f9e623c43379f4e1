"""Tests of dataset_scripts/build_retrieval_dataset.py on the real caption files and on small generated ones."""

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from dataset_scripts.build_retrieval_dataset import build_dataset, main
from helpers import KARPATHY_DATA as SHARED_DATA
from helpers import requires_karpathy_data


def jpeg_bytes(size: tuple[int, int] = (8, 8), colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def write_caption_files(data_dir: Path, image_dir: Path, split: str, images: dict[int, list[str]]) -> None:
    """`{split}_caps.txt`, `{split}_ids.txt` (one id per caption), id_mapping.json (extended) and an 8x8 JPEG per image."""
    data_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / f"{split}_caps.txt").write_text(
        "".join(c + "\n" for cs in images.values() for c in cs), encoding="utf-8"
    )
    (data_dir / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i, cs in images.items() for _ in cs))
    mapping_path = data_dir / "id_mapping.json"
    mapping = json.loads(mapping_path.read_text()) if mapping_path.exists() else {}  # one mapping for all splits
    mapping_path.write_text(json.dumps({**mapping, **{str(i): f"img_{i}.jpg" for i in images}}))
    for image_id in images:
        (image_dir / f"img_{image_id}.jpg").write_bytes(jpeg_bytes())


def five_captions(image_id: int) -> list[str]:
    return [f"image {image_id} caption {index} ." for index in range(5)]


@pytest.fixture
def small_files(tmp_path):
    """Caption files of 4 images (ids 10-13) in the Flickr30K layout, as split 'dev'."""
    data_dir, image_dir = tmp_path / "captions", tmp_path / "images"
    write_caption_files(data_dir, image_dir, "dev", {image_id: five_captions(image_id) for image_id in range(10, 14)})
    return data_dir, image_dir


def build_small(small_files, **kwargs) -> datasets.DatasetDict:
    data_dir, image_dir = small_files
    return build_dataset("caption-files", data_dir, image_dir, dataset="f30k", **kwargs)


# ---------------------------------------------------------------------------
# The real Flickr30K / COCO caption files, with placeholder images
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flickr30k_image_dir(tmp_path_factory):
    """An 8x8 JPEG under the mapped file name of every Flickr30K test and dev image."""
    image_dir = tmp_path_factory.mktemp("flickr30k-images")
    mapping = json.loads((SHARED_DATA / "f30k" / "id_mapping.json").read_text())
    placeholder = jpeg_bytes()
    for split in ("test", "dev"):
        for image_id in set(read_lines(SHARED_DATA / "f30k" / f"{split}_ids.txt")):
            (image_dir / mapping[image_id]).write_bytes(placeholder)
    return image_dir


@requires_karpathy_data("f30k/test_caps.txt", "f30k/dev_caps.txt", "f30k/id_mapping.json")
def test_flickr30k_test_and_dev_from_the_real_caption_files(flickr30k_image_dir, tmp_path):
    output_dir = tmp_path / "f30k"
    main(
        [
            "--format",
            "caption-files",
            "--dataset",
            "f30k",
            "--data_dir",
            str(SHARED_DATA / "f30k"),
            "--image_dir",
            str(flickr30k_image_dir),
            "--output_dir",
            str(output_dir),
            "--num_proc",
            "2",
        ]
    )
    loaded = datasets.load_from_disk(str(output_dir))
    assert set(loaded) == {"test", "dev"}  # the default: every split whose files exist (no train_caps.txt)
    mapping = json.loads((SHARED_DATA / "f30k" / "id_mapping.json").read_text())
    for split, num_images in (("test", 1000), ("dev", 1014)):
        rows = loaded[split]
        assert len(rows) == num_images
        caption_lines = read_lines(SHARED_DATA / "f30k" / f"{split}_caps.txt")
        id_lines = read_lines(SHARED_DATA / "f30k" / f"{split}_ids.txt")
        assert [caption for captions in rows["captions"] for caption in captions] == caption_lines
        assert all(len(captions) == 5 for captions in rows["captions"])
        assert rows["image_id"] == [int(image_id) for image_id in id_lines[::5]]
        assert rows["filename"] == [mapping[str(image_id)] for image_id in rows["image_id"]]
        assert all(image.size == (8, 8) for image in rows["image"])
        assert f"{num_images} images, {5 * num_images} captions" in rows.info.description


@requires_karpathy_data("coco/dev_caps.txt", "coco/dev_ids.txt")
def test_coco_dev_from_the_real_caption_files(tmp_path):
    image_ids = sorted({int(line) for line in read_lines(SHARED_DATA / "coco" / "dev_ids.txt")})
    image_dir = tmp_path / "coco"
    (image_dir / "val2014").mkdir(parents=True)
    placeholder = jpeg_bytes()
    for image_id in image_ids:
        (image_dir / "val2014" / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(placeholder)
    built = build_dataset("caption-files", SHARED_DATA / "coco", image_dir, dataset="coco", splits=["dev"])
    assert len(built["dev"]) == 1000
    assert built["dev"][0]["filename"] == f"val2014/COCO_val2014_{built['dev'][0]['image_id']:012d}.jpg"
    flat = [caption for captions in built["dev"]["captions"] for caption in captions]
    assert flat == read_lines(SHARED_DATA / "coco" / "dev_caps.txt")


@requires_karpathy_data("coco/testall_caps.txt", "coco/testall_ids.txt")
def test_coco_test_split_reads_testall(tmp_path):
    # No images: the error shows that the 5,000 images of testall_*.txt were looked for, in val2014.
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"5000 of 5000 test images are missing.*val2014/COCO_val2014_000000391895\.jpg"
    ):
        build_dataset("caption-files", SHARED_DATA / "coco", tmp_path / "empty", dataset="coco", splits=["test"])


# ---------------------------------------------------------------------------
# Export and loading back
# ---------------------------------------------------------------------------


def test_parquet_export_loads_back_equal(small_files, tmp_path):
    output_dir = tmp_path / "out"
    main(build_command(small_files, output_dir, "--parquet"))
    saved = datasets.load_from_disk(str(output_dir))["dev"]
    exported = datasets.load_dataset(
        "parquet", data_files={"dev": str(output_dir / "parquet" / "dev.parquet")}, cache_dir=str(tmp_path / "cache")
    )["dev"]
    assert exported.features == saved.features
    raw = datasets.Image(decode=False)
    saved, exported = saved.cast_column("image", raw), exported.cast_column("image", raw)
    assert exported.to_list() == saved.to_list()
    assert [row["image"]["bytes"] for row in saved] == [jpeg_bytes()] * 4  # the files' own bytes, stored once


def test_per_image_id_files_and_image_modes_are_stored_as_they_are(tmp_path):
    """An ids file with one id per image; grayscale, RGBA, palette, CMYK and 16-bit images are valid input."""
    data_dir, image_dir = tmp_path / "captions", tmp_path / "images"
    image_dir.mkdir()
    images = {
        "gray.png": PIL.Image.new("L", (5, 4), 80),
        "rgba.png": PIL.Image.new("RGBA", (5, 4), (10, 20, 30, 40)),
        "palette.png": PIL.Image.new("P", (5, 4), 3),
        "cmyk.jpg": PIL.Image.new("CMYK", (5, 4), (0, 255, 255, 0)),
        "sixteen_bit.png": PIL.Image.fromarray(np.full((4, 5), 40000, dtype=np.uint16)),
    }
    for name, image in images.items():
        image.save(image_dir / name)
    data_dir.mkdir()
    (data_dir / "test_caps.txt").write_text("".join(f"{name} caption {i}\n" for name in images for i in range(2)))
    (data_dir / "test_ids.txt").write_text("".join(f"{image_id}\n" for image_id in range(len(images))))
    (data_dir / "id_mapping.json").write_text(json.dumps({str(i): name for i, name in enumerate(images)}))
    built = build_dataset("caption-files", data_dir, image_dir, dataset="f30k", captions_per_image=2)["test"]
    output_dir = tmp_path / "out"
    built.save_to_disk(str(output_dir))
    saved = datasets.load_from_disk(str(output_dir)).cast_column("image", datasets.Image(decode=False))
    assert saved["captions"] == [[f"{name} caption 0", f"{name} caption 1"] for name in images]
    assert [row["image"]["bytes"] for row in saved] == [(image_dir / name).read_bytes() for name in images]


# ---------------------------------------------------------------------------
# Bad images
# ---------------------------------------------------------------------------


def make_missing(path: Path) -> None:
    path.unlink()


def make_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def make_truncated_jpeg(path: Path) -> None:
    data = jpeg_bytes(size=(64, 64), colour=(1, 2, 3))
    path.write_bytes(data[: len(data) // 2])


def make_not_an_image(path: Path) -> None:
    path.write_text("<html>404 not found</html>")


def make_decompression_bomb(path: Path) -> None:
    # 100 megapixels, over Pillow's 89.5M limit; 1-bit black compresses to 12 KB.
    PIL.Image.new("1", (10_000, 10_000)).save(path, format="PNG")


BAD_IMAGES = {
    "missing": (make_missing, "missing"),
    "zero-byte": (make_zero_bytes, "zero-byte file"),
    "truncated": (make_truncated_jpeg, "cannot be decoded"),
    "not-an-image": (make_not_an_image, "not an image file Pillow can read"),
    "decompression-bomb": (make_decompression_bomb, "over Pillow's decompression-bomb limit"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_is_an_error_naming_it(small_files, kind):
    make_bad, problem = BAD_IMAGES[kind]
    bad_path = small_files[1] / "img_12.jpg"
    make_bad(bad_path)
    with pytest.raises(ValueError, match="1 of 4 dev images are missing or unreadable") as error:
        build_small(small_files)
    assert f"{bad_path}: {problem}" in str(error.value) and "--skip_missing" in str(error.value)


def test_skip_missing_leaves_bad_images_out_and_counts_them(tmp_path, caplog):
    data_dir, image_dir = tmp_path / "captions", tmp_path / "images"
    write_caption_files(data_dir, image_dir, "dev", {image_id: five_captions(image_id) for image_id in range(10, 17)})
    for image_id, (make_bad, _) in zip(range(11, 16), BAD_IMAGES.values()):
        make_bad(image_dir / f"img_{image_id}.jpg")
    with pytest.raises(ValueError, match=r"5 of 7 dev images are missing or unreadable"):
        build_dataset("caption-files", data_dir, image_dir, dataset="f30k", num_proc=2)

    with caplog.at_level(logging.WARNING):
        built = build_dataset(
            "caption-files",
            data_dir,
            image_dir,
            dataset="f30k",
            skip_missing=True,
            num_proc=2,
            max_skipped_fraction=1.0,
        )
    assert built["dev"]["image_id"] == [10, 16]
    assert built["dev"]["captions"] == [five_captions(10), five_captions(16)]
    assert "5 images skipped as missing or unreadable (--skip_missing)" in caplog.text
    output_dir = tmp_path / "out"
    built.save_to_disk(str(output_dir))
    description = datasets.load_from_disk(str(output_dir))["dev"].info.description
    assert "2 images, 10 captions" in description and "5 images skipped" in description
    for image_id, (_, problem) in zip(range(11, 16), BAD_IMAGES.values()):
        assert f"img_{image_id}.jpg: {problem}" in description


# ---------------------------------------------------------------------------
# Bad caption files
# ---------------------------------------------------------------------------


def test_caption_and_id_counts_must_agree(small_files):
    data_dir, _ = small_files
    ids_path = data_dir / "dev_ids.txt"
    ids_path.write_text("".join(line + "\n" for line in read_lines(ids_path)[:-1]))
    with pytest.raises(ValueError, match=r"dev_caps\.txt has 20 lines and .*dev_ids\.txt has 19"):
        build_small(small_files)


@pytest.mark.parametrize("num_captions", [4, 6])
def test_an_image_with_another_caption_count_is_an_error(tmp_path, num_captions):
    data_dir, image_dir = tmp_path / "captions", tmp_path / "images"
    images = {image_id: five_captions(image_id) for image_id in range(10, 14)}
    images[12] = [f"odd caption {index}" for index in range(num_captions)]
    write_caption_files(data_dir, image_dir, "dev", images)
    expected = r"Every image must have 5 captions, but 1 of the 4 images of .*dev_caps\.txt / .*dev_ids\.txt do not: "
    expected += rf"image 12 \(first line 11\) has {num_captions}"
    with pytest.raises(ValueError, match=expected):
        build_dataset("caption-files", data_dir, image_dir, dataset="f30k")


def test_ids_missing_from_the_id_mapping_are_an_error(small_files):
    data_dir, _ = small_files
    (data_dir / "id_mapping.json").write_text(json.dumps({"10": "img_10.jpg", "13": "img_13.jpg"}))
    with pytest.raises(
        ValueError, match=r"2 image ids of .*dev_ids\.txt are missing from .*id_mapping\.json, e\.g\. \[11, 12\]"
    ):
        build_small(small_files)


def test_an_empty_caption_line_is_an_error(small_files):
    data_dir, _ = small_files
    lines = read_lines(data_dir / "dev_caps.txt")
    lines[6] = "   "
    (data_dir / "dev_caps.txt").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"dev_caps\.txt line 7 is an empty caption"):
        build_small(small_files)


def test_a_split_without_files_is_an_error(small_files):
    with pytest.raises(ValueError, match=r"Split 'test' needs .*test_caps\.txt, which does not exist"):
        build_small(small_files, splits=["test"])


def test_unknown_dataset_is_rejected(small_files, tmp_path, capsys):
    data_dir, image_dir = small_files
    with pytest.raises(SystemExit):
        main(
            [
                "--format",
                "caption-files",
                "--dataset",
                "flickr8k",
                "--data_dir",
                str(data_dir),
                "--image_dir",
                str(image_dir),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert "invalid choice: 'flickr8k'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_dataset("caption-files", data_dir, image_dir, dataset="flickr8k")


# ---------------------------------------------------------------------------
# Karpathy JSON
# ---------------------------------------------------------------------------


def test_karpathy_json(tmp_path):
    image_dir = tmp_path / "images"
    entries = [
        ("train2014", "train", 1, 5),
        ("val2014", "restval", 2, 5),
        ("val2014", "val", 3, 5),
        ("val2014", "test", 4, 6),  # more than 5 captions: the first 5 are kept, and counted
        ("val2014", "test", 5, 5),
    ]
    images = []
    for image_index, (folder, split, coco_id, num_sentences) in enumerate(entries):
        filename = f"COCO_{folder}_{coco_id:012d}.jpg"
        (image_dir / folder).mkdir(parents=True, exist_ok=True)
        (image_dir / folder / filename).write_bytes(jpeg_bytes())
        sentences = [{"raw": f"image {coco_id} sentence {index}.", "tokens": []} for index in range(num_sentences)]
        images.append(
            {
                "filepath": folder,
                "filename": filename,
                "split": split,
                "cocoid": coco_id,
                "imgid": image_index,
                "sentences": sentences,
            }
        )
    data_dir = tmp_path / "json"
    data_dir.mkdir()
    (data_dir / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))

    built = build_dataset("karpathy-json", data_dir, image_dir, dataset="coco")
    assert {split: rows["image_id"] for split, rows in built.items()} == {"train": [1, 2], "dev": [3], "test": [4, 5]}
    assert built["train"]["filename"] == [
        "train2014/COCO_train2014_000000000001.jpg",
        "val2014/COCO_val2014_000000000002.jpg",
    ]
    assert built["test"][0]["captions"] == [f"image 4 sentence {index}." for index in range(5)]
    assert "1 images had more than 5 captions; the first 5 were kept" in built["test"].info.description
    assert built["dev"][0]["image"].size == (8, 8)

    (data_dir / "dataset_flickr30k.json").write_text(json.dumps({"images": images[:3], "dataset": "flickr30k"}))
    flickr = build_dataset("karpathy-json", data_dir, image_dir, dataset="f30k", splits=["train"])
    assert list(flickr) == ["train"] and flickr["train"]["image_id"] == [0, 1]  # Flickr30K ids are Karpathy's imgid


# ---------------------------------------------------------------------------
# No silent data loss (reliability, round 2)
# ---------------------------------------------------------------------------


def build_command(small_files, output_dir, *extra) -> list[str]:
    data_dir, image_dir = small_files
    return [
        "--format",
        "caption-files",
        "--dataset",
        "f30k",
        "--data_dir",
        str(data_dir),
        "--image_dir",
        str(image_dir),
        "--output_dir",
        str(output_dir),
        "--num_proc",
        "1",
        *extra,
    ]


def test_a_non_empty_output_dir_is_refused_and_overwrite_replaces_it_whole(small_files, tmp_path):
    data_dir, image_dir = small_files
    write_caption_files(data_dir, image_dir, "test", {image_id: five_captions(image_id) for image_id in range(20, 23)})
    output_dir = tmp_path / "out"
    main(build_command(small_files, output_dir, "--parquet"))
    assert set(datasets.load_from_disk(str(output_dir))) == {"dev", "test"}
    with pytest.raises(ValueError, match=r"--output_dir .*out is not empty. Pass --overwrite"):
        main(build_command(small_files, output_dir, "--splits", "test"))
    assert set(datasets.load_from_disk(str(output_dir))) == {"dev", "test"}  # untouched
    main(build_command(small_files, output_dir, "--splits", "test", "--overwrite"))
    assert set(datasets.load_from_disk(str(output_dir))) == {"test"}
    assert not (output_dir / "parquet").exists()  # nothing of the previous build is left beside it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")] == []


def test_a_build_killed_while_saving_leaves_the_previous_dataset_intact(small_files, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    main(build_command(small_files, output_dir))
    before = datasets.load_from_disk(str(output_dir))["dev"]["image_id"]

    def killed(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "dataset_dict.json").write_text("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", killed)
    with pytest.raises(KeyboardInterrupt):
        main(build_command(small_files, output_dir, "--overwrite"))
    monkeypatch.undo()
    assert datasets.load_from_disk(str(output_dir))["dev"]["image_id"] == before


def test_an_unusable_output_dir_is_found_before_any_image_is_decoded(small_files, tmp_path, monkeypatch):
    import dataset_scripts.build_retrieval_dataset as builder

    decoded = []
    monkeypatch.setattr(builder, "find_image_problem", lambda path: decoded.append(path))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot be created: .*a_file is a file"):
        main(build_command(small_files, tmp_path / "a_file" / "out"))
    with pytest.raises(ValueError, match=r"exists and is not a folder"):
        main(build_command(small_files, tmp_path / "a_file"))
    assert decoded == []


def test_a_per_image_ids_file_cut_short_is_an_error_not_a_merge(small_files):
    data_dir, _ = small_files
    ids = read_lines(data_dir / "dev_ids.txt")[::5]  # one id per image: 4 ids for 20 captions
    (data_dir / "dev_ids.txt").write_text("".join(f"{i}\n" for i in ids[:2]))  # cut short: 2 ids
    with pytest.raises(ValueError, match=r"has 2 ids for the 20 captions .*would give 10 captions per image"):
        build_small(small_files)
    # any caption count, when asked for, but the same in every split
    (data_dir / "dev_ids.txt").write_text("".join(f"{i}\n" for i in ids[:2]))
    assert build_small(small_files, captions_per_image=None)["dev"].num_rows == 2


def test_caption_counts_must_agree_between_splits(small_files):
    data_dir, image_dir = small_files
    write_caption_files(data_dir, image_dir, "test", {20: ["a", "b", "c"], 21: ["d", "e", "f"]})
    with pytest.raises(ValueError, match=r"different numbers of captions per image: dev 5, test 3"):
        build_small(small_files, captions_per_image=None)
    with pytest.raises(ValueError, match="Every image must have 5 captions"):
        build_small(small_files)


def test_skip_missing_refuses_an_empty_split_or_too_many_skipped_images(small_files, tmp_path):
    data_dir, image_dir = small_files
    with pytest.raises(ValueError, match=r"leave out 4 of the 4 dev images \(100\.0%.*the split would be empty"):
        build_dataset("caption-files", data_dir, tmp_path, dataset="f30k", skip_missing=True)  # wrong --image_dir
    (image_dir / "img_11.jpg").unlink()
    with pytest.raises(
        ValueError,
        match=r"leave out 1 of the 4 dev images \(25\.0%, more than --max_skipped_fraction 0\.01.*raise --max_skipped_fraction",
    ):
        build_small(small_files, skip_missing=True)
    assert build_small(small_files, skip_missing=True, max_skipped_fraction=0.25)["dev"]["image_id"] == [10, 12, 13]


def test_the_same_image_in_two_splits_or_twice_in_one_is_an_error(small_files, tmp_path):
    data_dir, image_dir = small_files
    write_caption_files(data_dir, image_dir, "test", {13: five_captions(13), 30: five_captions(30)})
    mapping = {str(i): f"img_{i}.jpg" for i in (10, 11, 12, 13, 30)}
    (data_dir / "id_mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=r"1 image ids are in more than one split, e\.g\. 13 \(dev and test\)"):
        build_small(small_files)
    images = [{"imgid": 1, "split": "test", "filename": "a.jpg", "sentences": [{"raw": f"c {k}"} for k in range(5)]}]
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    (json_dir / "dataset_flickr30k.json").write_text(json.dumps({"images": images * 2}))
    with pytest.raises(ValueError, match=r"1 image ids appear more than once in the test split, e\.g\. \[1\]"):
        build_dataset("karpathy-json", json_dir, image_dir, dataset="f30k")


GOOD_IMAGE = {"imgid": 7, "split": "test", "filename": "a.jpg", "sentences": [{"raw": f"c {k}"} for k in range(5)]}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"dataset_flickr30k\.json is not valid JSON: .* at line 1, column 2"),
        ("[]", r"must be a JSON object with an \"images\" list"),
        (
            json.dumps({"images": [{k: v for k, v in GOOD_IMAGE.items() if k != "split"}]}),
            r"image 0 \(a\.jpg\): the key 'split' is missing",
        ),
        (
            json.dumps({"images": [GOOD_IMAGE, {**GOOD_IMAGE, "imgid": "8"}]}),
            r"image 1 \(a\.jpg\): 'imgid' must be a int, got '8'",
        ),
        (
            json.dumps({"images": [{**GOOD_IMAGE, "sentences": [{"tokens": []}] * 5}]}),
            r"image 0 \(a\.jpg\): sentence 0 must be an object with a \"raw\" string",
        ),
        (json.dumps({"images": ["a.jpg"]}), r"image 0: expected an object, got str"),
    ],
    ids=["syntax", "not-an-object", "missing-key", "wrong-type", "bad-sentence", "not-a-record"],
)
def test_a_malformed_karpathy_json_names_the_file_image_and_key(tmp_path, content, message):
    (tmp_path / "dataset_flickr30k.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        build_dataset("karpathy-json", tmp_path, tmp_path, dataset="f30k")


def test_a_malformed_id_mapping_and_a_bom_in_the_ids_file(small_files):
    data_dir, _ = small_files
    (data_dir / "dev_ids.txt").write_text("\ufeff" + (data_dir / "dev_ids.txt").read_text(), encoding="utf-8")
    assert build_small(small_files)["dev"]["image_id"] == [10, 11, 12, 13]  # the BOM is not part of the first id
    (data_dir / "id_mapping.json").write_text('{"10": "img_10.jpg",')
    with pytest.raises(ValueError, match=r"id_mapping\.json is not valid JSON"):
        build_small(small_files)
    (data_dir / "id_mapping.json").write_text('["img_10.jpg"]')
    with pytest.raises(ValueError, match=r"id_mapping\.json must be a JSON object mapping image ids to file names"):
        build_small(small_files)
