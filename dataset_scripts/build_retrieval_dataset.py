"""Build a Flickr30K / MSCOCO retrieval dataset (Karpathy splits) as a `datasets.DatasetDict`.

    python -m dataset_scripts.build_retrieval_dataset --format caption-files --dataset f30k \
        --data_dir data/karpathy/f30k --image_dir /data/flickr30k-images --output_dir data/f30k

Inputs (`--format`):
- `caption-files`: the layout the LAPS and SCTA research code distribute (docs/METHOD.md "Data") — `{split}_caps.txt` (one
  caption a line) and `{split}_ids.txt` (one image id a line, either one per
  caption or one per image with its captions consecutive). Flickr30K maps
  ids to file names with `id_mapping.json` in `--data_dir`; COCO file names
  are `COCO_{val,train}2014_{id:012d}.jpg`, looked up under `--image_dir`,
  in `val2014/` and `train2014/` subfolders or directly. COCO's test split is
  the `testall` file (5,000 images).
- `karpathy-json`: Karpathy's `dataset_flickr30k.json` / `dataset_coco.json` in
  `--data_dir`; image paths are `--image_dir/{filepath}/{filename}`, the image
  id is `imgid` (Flickr30K, the id used by the caption files) or `cocoid`;
  `restval` goes to train and `val` to dev. A few COCO images there have more
  than 5 captions: the first 5 are kept, as in the caption files, and the
  number of such images is logged and recorded in the split's info.

Output (`--output_dir`, written with `save_to_disk`): splits `train`, `dev`,
`test`, one row per image: `image` (`datasets.Image`, the file's original bytes,
stored once), `image_id` (int), `filename` (path relative to `--image_dir`),
`captions` (list of strings, in file order). Load it with
`datasets.load_from_disk(output_dir)`. With `--parquet`, each split is also
written to `output_dir/parquet/{split}.parquet`; load those with
`datasets.load_dataset("parquet", data_files={"test": ".../parquet/test.parquet", ...})`
(naming the splits, as `data_dir=` inference would rename `dev` to `validation`).

Checks (a ValueError naming file, line and counts): caption and id files of
different lengths, an image whose caption count differs from the others, an
empty caption, ids missing from `id_mapping.json`. Every image is decoded fully
(in `--num_proc` processes); a missing, zero-byte, truncated or non-image file,
or one over Pillow's decompression-bomb limit, is an error listing how many
and the first few, unless `--skip_missing`: then those images (and their
captions) are left out, and the count and every skipped file are logged and
written to the split's `info.description` (`load_from_disk(dir)[split].info.description`).
Grayscale, RGBA, palette, CMYK and 16-bit images are valid: they are stored as
they are and converted to RGB by `processing_scta.convert_to_rgb`.
"""

import argparse
import collections
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from dataset_scripts import FEATURES
from processing_scta import decode_image


logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
# Caption-file stem of each output split.
CAPTION_FILE_STEMS = {
    "f30k": {"train": "train", "dev": "dev", "test": "test"},
    "coco": {"train": "train", "dev": "dev", "test": "testall"},
}
KARPATHY_JSON_NAMES = {"f30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
KARPATHY_JSON_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
KARPATHY_JSON_CAPTIONS_PER_IMAGE = 5
# Flickr30K and MSCOCO have 5 captions per image (Karpathy splits); --captions_per_image changes it.
CAPTIONS_PER_IMAGE = 5
# Share of a split's images --skip_missing may leave out before the build stops (--max_skipped_fraction).
MAX_SKIPPED_FRACTION = 0.01
DATASET_NAMES = {"f30k": "Flickr30K", "coco": "MSCOCO"}
# How many offending items an error message or log line lists.
MAX_LISTED = 5


@dataclass
class ImageRecord:
    """One row of the dataset before its image is read."""

    image_id: int
    filename: str  # relative to the image folder
    captions: list[str]


# ---------------------------------------------------------------------------
# Caption files
# ---------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without line ends (a final newline adds no empty line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not content
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); re-encode it as UTF-8.") from error
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _group_captions_by_image(
    captions: list[str],
    image_ids: list[int],
    captions_path: Path,
    ids_path: Path,
    captions_per_image: int | None = CAPTIONS_PER_IMAGE,
) -> list[tuple[int, int, list[str]]]:
    """
    (image id, first caption line, captions) per image, in order of first appearance. Every image must have
    `captions_per_image` captions (None: any number, the same for every image).
    """
    if len(image_ids) == len(captions):
        ids_per_caption = image_ids
    elif image_ids and len(captions) % len(image_ids) == 0:
        captions_per_image_here = len(captions) // len(image_ids)
        if captions_per_image is not None and captions_per_image_here != captions_per_image:
            raise ValueError(
                f"{ids_path} has {len(image_ids)} ids for the {len(captions)} captions of {captions_path}: neither one "
                f"id per caption nor one per image with {captions_per_image} captions each (it would give "
                f"{captions_per_image_here} captions per image). Is one of the files cut short or from another split? "
                "For a dataset with another caption count per image, pass --captions_per_image."
            )
        captions_per_image = captions_per_image_here
        repeated = [image_id for image_id, count in collections.Counter(image_ids).items() if count > 1]
        if repeated:
            raise ValueError(
                f"{ids_path} has one id per image ({len(image_ids)} ids for {len(captions)} captions in "
                f"{captions_path}), but {len(repeated)} ids appear more than once, e.g. {repeated[:MAX_LISTED]}."
            )
        ids_per_caption = [image_id for image_id in image_ids for _ in range(captions_per_image_here)]
    else:
        raise ValueError(
            f"Caption and id files do not match: {captions_path} has {len(captions)} lines and {ids_path} has "
            f"{len(image_ids)}. The ids file needs one line per caption ({len(captions)}) or one per image "
            "(a whole fraction of the captions); check both files are complete and from the same split."
        )
    first_line: dict[int, int] = {}
    captions_of: dict[int, list[str]] = {}
    for line_number, (image_id, caption) in enumerate(zip(ids_per_caption, captions), start=1):
        first_line.setdefault(image_id, line_number)
        captions_of.setdefault(image_id, []).append(caption)
    images = [(image_id, first_line[image_id], image_captions) for image_id, image_captions in captions_of.items()]

    count_frequencies = collections.Counter(len(image_captions) for _, _, image_captions in images)
    expected = captions_per_image or count_frequencies.most_common(1)[0][0]
    odd = [
        (image_id, line, len(image_captions))
        for image_id, line, image_captions in images
        if len(image_captions) != expected
    ]
    if odd:
        examples = ", ".join(
            f"image {image_id} (first line {line}) has {count}" for image_id, line, count in odd[:MAX_LISTED]
        )
        raise ValueError(
            f"Every image must have {expected} captions, but {len(odd)} of the {len(images)} images of "
            f"{captions_path} / {ids_path} do not: {examples}. Fix the files so that each image has {expected} "
            "captions (an image id repeated elsewhere in the file also merges two images' captions)."
        )
    return images


def read_caption_files(
    data_dir: Path, dataset: str, split: str, image_dir: Path, captions_per_image: int | None = CAPTIONS_PER_IMAGE
) -> list[ImageRecord]:
    """The images and captions of one split in the caption-file layout (images are not opened)."""
    stem = CAPTION_FILE_STEMS[dataset][split]
    captions_path, ids_path = data_dir / f"{stem}_caps.txt", data_dir / f"{stem}_ids.txt"
    for path in (captions_path, ids_path):
        if not path.is_file():
            raise ValueError(f"Split '{split}' needs {path}, which does not exist; check --data_dir and --splits.")
    captions = _read_lines(captions_path)
    if not captions:
        raise ValueError(f"{captions_path} has no captions; check that it is the right file.")
    for line_number, caption in enumerate(captions, start=1):
        if not caption.strip():
            raise ValueError(
                f"{captions_path} line {line_number} is an empty caption; every caption needs at least one word."
            )
    image_ids = []
    for line_number, text in enumerate(_read_lines(ids_path), start=1):
        try:
            image_ids.append(int(text.strip()))
        except ValueError:
            raise ValueError(f"{ids_path} line {line_number} is not an integer image id: {text!r}.") from None

    images = _group_captions_by_image(captions, image_ids, captions_path, ids_path, captions_per_image)
    if dataset == "f30k":
        filenames = _flickr30k_filenames(
            [image_id for image_id, _, _ in images], data_dir / "id_mapping.json", ids_path
        )
    else:
        filenames = [_coco_filename(image_id, split, image_dir) for image_id, _, _ in images]
    return [
        ImageRecord(image_id, filename, image_captions)
        for (image_id, _, image_captions), filename in zip(images, filenames)
    ]


def _flickr30k_filenames(image_ids: list[int], mapping_path: Path, ids_path: Path) -> list[str]:
    """File names of Flickr30K image ids, from `id_mapping.json` (id -> file name)."""
    if not mapping_path.is_file():
        raise ValueError(f"Flickr30K needs {mapping_path} (image id -> file name); put it in --data_dir.")
    mapping = _read_json(mapping_path)
    if not isinstance(mapping, dict) or not all(isinstance(name, str) for name in mapping.values()):
        raise ValueError(
            f'{mapping_path} must be a JSON object mapping image ids to file names, like {{"1000092795": '
            f'"1000092795.jpg"}}; it holds a {type(mapping).__name__}'
            + (" with values that are not file names." if isinstance(mapping, dict) else ".")
        )
    unknown = [image_id for image_id in image_ids if str(image_id) not in mapping]
    if unknown:
        raise ValueError(
            f"{len(unknown)} image ids of {ids_path} are missing from {mapping_path}, e.g. {unknown[:MAX_LISTED]}. "
            "Use the id_mapping.json that belongs to these caption files."
        )
    return [mapping[str(image_id)] for image_id in image_ids]


def _read_json(path: Path):
    """A JSON file's content; a ValueError naming the file and the position of a syntax error."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}).") from None


def _coco_filename(image_id: int, split: str, image_dir: Path) -> str:
    """The COCO file of `image_id` under `image_dir` (val2014 or train2014, in a subfolder or not).

    Karpathy's train split includes val2014 images ("restval"), so both are
    tried. A file found nowhere gets its expected name and is reported missing.
    """
    candidates = []
    for folder in ("val2014", "train2014") if split != "train" else ("train2014", "val2014"):
        name = f"COCO_{folder}_{image_id:012d}.jpg"
        candidates += [f"{folder}/{name}", name]
    for candidate in candidates:
        if (image_dir / candidate).is_file():
            return candidate
    return candidates[0]


# ---------------------------------------------------------------------------
# Karpathy JSON
# ---------------------------------------------------------------------------


def read_karpathy_json(json_path: Path, dataset: str) -> tuple[dict[str, list[ImageRecord]], dict[str, int]]:
    """Images and captions of every split of a Karpathy `dataset_*.json`.

    Returns:
        The records per output split, and per split how many images had more
        than 5 captions (only the first 5 are kept).
    """
    if not json_path.is_file():
        raise ValueError(f"--format karpathy-json needs {json_path}; check --data_dir and --dataset.")
    content = _read_json(json_path)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f'{json_path} must be a JSON object with an "images" list (Karpathy\'s format).')
    id_key = "cocoid" if dataset == "coco" else "imgid"
    records: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    num_trimmed = dict.fromkeys(SPLITS, 0)
    for position, image in enumerate(content["images"]):

        def bad(problem: str) -> ValueError:
            name = image.get("filename") if isinstance(image, dict) else None
            return ValueError(f"{json_path} image {position}{f' ({name})' if name else ''}: {problem}.")

        if not isinstance(image, dict):
            raise bad(f"expected an object, got {type(image).__name__}")
        for key, kind in (("split", str), ("filename", str), ("sentences", list), (id_key, int)):
            if key not in image:
                raise bad(f"the key {key!r} is missing")
            if not isinstance(image[key], kind) or isinstance(image[key], bool):
                raise bad(f"{key!r} must be a {kind.__name__}, got {image[key]!r}")
        if image["split"] not in KARPATHY_JSON_SPLITS:
            raise bad(f"split {image['split']!r}; expected one of {sorted(KARPATHY_JSON_SPLITS)}")
        split = KARPATHY_JSON_SPLITS[image["split"]]
        captions = []
        for number, sentence in enumerate(image["sentences"]):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise bad(f'sentence {number} must be an object with a "raw" string, got {sentence!r}')
            captions.append(sentence["raw"].strip())
        if len(captions) < KARPATHY_JSON_CAPTIONS_PER_IMAGE or not all(captions[:KARPATHY_JSON_CAPTIONS_PER_IMAGE]):
            raise bad(
                f"{len(captions)} captions ({sum(not caption for caption in captions)} empty); every image needs "
                f"{KARPATHY_JSON_CAPTIONS_PER_IMAGE} non-empty captions"
            )
        if len(captions) > KARPATHY_JSON_CAPTIONS_PER_IMAGE:
            num_trimmed[split] += 1
        filepath = image.get("filepath")
        filename = f"{filepath}/{image['filename']}" if filepath else image["filename"]
        records[split].append(ImageRecord(image[id_key], filename, captions[:KARPATHY_JSON_CAPTIONS_PER_IMAGE]))
    return records, num_trimmed


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def find_image_problem(path: str) -> str | None:
    """Why the image file at `path` is unusable, or None if it decodes fully."""
    if not os.path.isfile(path):
        return "missing"
    if os.path.getsize(path) == 0:
        return "zero-byte file"
    try:
        with open(path, "rb") as file:
            decode_image(file.read())
    except OSError as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    except ValueError as error:
        return str(error)
    return None


def check_images(
    records: list[ImageRecord],
    image_dir: Path,
    split: str,
    num_proc: int,
    skip_missing: bool,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """Decode every image; returns the usable records and the (filename, problem) of the others.

    Raises:
        ValueError: some images are unusable and `skip_missing` is False; or with `skip_missing`, more than
            `max_skipped_fraction` of them (a wrong `--image_dir` looks like that), or all of them.
    """
    paths = [str(image_dir / record.filename) for record in records]
    progress = dict(total=len(paths), desc=f"Checking {split} images", unit=" images")
    if num_proc > 1:
        with multiprocessing.Pool(num_proc) as pool:
            problems = list(tqdm(pool.imap(find_image_problem, paths, chunksize=64), **progress))
    else:
        problems = [find_image_problem(path) for path in tqdm(paths, **progress)]
    bad = [(record.filename, problem) for record, problem in zip(records, problems) if problem is not None]
    if bad and not skip_missing:
        examples = "; ".join(f"{image_dir / filename}: {problem}" for filename, problem in bad[:MAX_LISTED])
        raise ValueError(
            f"{len(bad)} of {len(records)} {split} images are missing or unreadable, e.g. {examples}. "
            "Fix or restore them (check --image_dir), or pass --skip_missing to leave them out."
        )
    kept = [record for record, problem in zip(records, problems) if problem is None]
    if bad and (not kept or len(bad) > max_skipped_fraction * len(records)):
        examples = "; ".join(f"{image_dir / filename}: {problem}" for filename, problem in bad[:MAX_LISTED])
        raise ValueError(
            f"--skip_missing would leave out {len(bad)} of the {len(records)} {split} images "
            f"({100 * len(bad) / len(records):.1f}%, more than --max_skipped_fraction {max_skipped_fraction:g}"
            f"{'; the split would be empty' if not kept else ''}), e.g. {examples}. Check --image_dir; to build "
            "with that many images left out, raise --max_skipped_fraction."
        )
    return kept, bad


def _check_image_ids(records: dict[str, list[ImageRecord]]) -> None:
    """The same image id twice in a split, or in two splits (a train/test leak), is an error listing them."""
    owners: dict[int, list[str]] = collections.defaultdict(list)
    for split, split_records in records.items():
        counts = collections.Counter(record.image_id for record in split_records)
        repeated = [image_id for image_id, count in counts.items() if count > 1]
        if repeated:
            raise ValueError(
                f"{len(repeated)} image ids appear more than once in the {split} split, e.g. {repeated[:MAX_LISTED]}; "
                "each image must be one row. Check the caption/id files or the JSON for duplicated entries."
            )
        for image_id in counts:
            owners[image_id].append(split)
    shared = {image_id: splits for image_id, splits in owners.items() if len(splits) > 1}
    if shared:
        examples = ", ".join(
            f"{image_id} ({' and '.join(splits)})" for image_id, splits in list(shared.items())[:MAX_LISTED]
        )
        raise ValueError(
            f"{len(shared)} image ids are in more than one split, e.g. {examples}: a train/test leak would make "
            "the test recall meaningless. Use the files of one Karpathy split set."
        )


def _check_caption_counts(records: dict[str, list[ImageRecord]], source: str) -> None:
    """Every split must have the same number of captions per image."""
    counts = {split: len(split_records[0].captions) for split, split_records in records.items() if split_records}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"The splits of {source} have different numbers of captions per image: "
            + ", ".join(f"{split} {count}" for split, count in counts.items())
            + ". Check that the files belong to one dataset."
        )


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """
    Before any work: `output_dir` must be new or empty (or `overwrite`), and its parent a writable folder.
    Returns it as a `Path`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"--output_dir {output_dir} exists and is not a folder.")
        if any(output_dir.iterdir()) and not overwrite:
            raise ValueError(
                f"--output_dir {output_dir} is not empty. Pass --overwrite to replace it whole (the new dataset is "
                "written beside it and swapped in when complete), or choose another folder."
            )
    parent = output_dir.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output_dir {output_dir} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {output_dir} cannot be written: {existing} is not writable.")
    return output_dir


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


def build_dataset(
    input_format: str,
    data_dir: str | os.PathLike,
    image_dir: str | os.PathLike,
    dataset: str = "f30k",
    splits: list[str] | None = None,
    skip_missing: bool = False,
    num_proc: int = 1,
    captions_per_image: int | None = CAPTIONS_PER_IMAGE,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> datasets.DatasetDict:
    """Read captions and check images; the returned splits point at the image files.

    `save_to_disk` (see `main`) then stores every image's bytes in the dataset.
    Arguments are those of the command line (see the module docstring).
    `splits` defaults to every split whose caption files exist (caption-files)
    or that has images (karpathy-json).
    """
    if dataset not in CAPTION_FILE_STEMS:
        raise ValueError(f"dataset must be one of {sorted(CAPTION_FILE_STEMS)}, got {dataset!r}.")
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}.")
    data_dir, image_dir = Path(data_dir), Path(image_dir)
    if not image_dir.is_dir():
        raise ValueError(f"--image_dir {image_dir} is not a folder.")
    for split in splits or ():
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; splits are {SPLITS}.")

    trimmed = dict.fromkeys(SPLITS, 0)
    if input_format == "caption-files":
        if splits is None:
            stems = CAPTION_FILE_STEMS[dataset]
            splits = [split for split in SPLITS if (data_dir / f"{stems[split]}_caps.txt").is_file()]
        records = {
            split: read_caption_files(data_dir, dataset, split, image_dir, captions_per_image) for split in splits
        }
    elif input_format == "karpathy-json":
        all_records, trimmed = read_karpathy_json(data_dir / KARPATHY_JSON_NAMES[dataset], dataset)
        splits = splits or [split for split in SPLITS if all_records[split]]
        for split in splits:
            if not all_records[split]:
                raise ValueError(f"{data_dir / KARPATHY_JSON_NAMES[dataset]} has no {split} images; check --splits.")
        records = {split: all_records[split] for split in splits}
    else:
        raise ValueError(f"input_format must be 'caption-files' or 'karpathy-json', got {input_format!r}.")
    if not splits:
        raise ValueError(f"No split found in {data_dir} for --format {input_format} --dataset {dataset}.")
    _check_image_ids(records)
    _check_caption_counts(records, str(data_dir))
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}.")

    dataset_dict = datasets.DatasetDict()
    for split in splits:
        kept, skipped = check_images(records[split], image_dir, split, num_proc, skip_missing, max_skipped_fraction)
        description = _describe_split(dataset, input_format, split, data_dir, kept, skipped, trimmed[split])
        logger.log(logging.WARNING if skipped else logging.INFO, description)
        dataset_dict[split] = datasets.Dataset.from_dict(
            {
                "image": [{"path": str(image_dir / record.filename), "bytes": None} for record in kept],
                "image_id": [record.image_id for record in kept],
                "filename": [record.filename for record in kept],
                "captions": [record.captions for record in kept],
            },
            info=datasets.DatasetInfo(description=description, features=FEATURES),
            split=split,
        )
    return dataset_dict


def _describe_split(
    dataset: str,
    input_format: str,
    split: str,
    data_dir: Path,
    kept: list[ImageRecord],
    skipped: list[tuple[str, str]],
    num_trimmed: int,
) -> str:
    """The split's `info.description`: where it came from, its size, and every image left out."""
    num_captions = sum(len(record.captions) for record in kept)
    lines = [
        f"{DATASET_NAMES[dataset]} Karpathy {split} split built by dataset_scripts/build_retrieval_dataset.py "
        f"(--format {input_format}) from {data_dir}: {len(kept)} images, {num_captions} captions.",
    ]
    if skipped:
        lines.append(f"{len(skipped)} images skipped as missing or unreadable (--skip_missing):")
        lines += [f"  {filename}: {problem}" for filename, problem in skipped]
    if num_trimmed:
        lines.append(
            f"{num_trimmed} images had more than {KARPATHY_JSON_CAPTIONS_PER_IMAGE} captions; "
            f"the first {KARPATHY_JSON_CAPTIONS_PER_IMAGE} were kept."
        )
    return "\n".join(lines)


def save_dataset(
    dataset_dict: datasets.DatasetDict, output_dir: str | os.PathLike, parquet: bool = False, overwrite: bool = False
) -> None:
    """
    `save_to_disk` (embedding each image's bytes) and, with `parquet`, one parquet file per split. Written into a
    temporary folder beside `output_dir` and renamed when complete, so a killed build never leaves a half-written
    dataset, nor destroys the one already there; with `overwrite` an existing `output_dir` is replaced whole.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    temporary = output_dir.with_name(f"{output_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    dataset_dict.save_to_disk(str(temporary))
    if parquet:
        # Export from the saved copy: it holds the image bytes, while the built splits point at files.
        saved = datasets.load_from_disk(str(temporary))
        parquet_dir = temporary / "parquet"
        parquet_dir.mkdir(exist_ok=True)
        for split, split_dataset in saved.items():
            split_dataset.to_parquet(str(parquet_dir / f"{split}.parquet"))
        del saved
    if output_dir.exists():
        previous = output_dir.with_name(f"{output_dir.name}.replaced-{os.getpid()}")
        os.replace(output_dir, previous)
        os.replace(temporary, output_dir)
        shutil.rmtree(previous)
    else:
        os.replace(temporary, output_dir)
    logger.info("Saved %s to %s", {split: len(rows) for split, rows in dataset_dict.items()}, output_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=["caption-files", "karpathy-json"])
    parser.add_argument("--dataset", required=True, choices=sorted(CAPTION_FILE_STEMS))
    parser.add_argument("--data_dir", required=True, help="folder of the caption files or the Karpathy JSON")
    parser.add_argument("--image_dir", required=True, help="folder of the image files")
    parser.add_argument("--output_dir", required=True, help="where the DatasetDict is saved")
    parser.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=None, help="default: every split whose files exist"
    )
    parser.add_argument(
        "--skip_missing", action="store_true", help="leave out missing/unreadable images, counted in the log and info"
    )
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="processes decoding images")
    parser.add_argument("--parquet", action="store_true", help="also write output_dir/parquet/{split}.parquet")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output_dir whole (default: refuse)"
    )
    parser.add_argument(
        "--captions_per_image",
        type=int,
        default=CAPTIONS_PER_IMAGE,
        help="captions every image must have (Flickr30K and MSCOCO: 5); 0 accepts any number, the same for all",
    )
    parser.add_argument(
        "--max_skipped_fraction",
        type=float,
        default=MAX_SKIPPED_FRACTION,
        help="with --skip_missing: the largest share of a split's images that may be left out",
    )
    args = parser.parse_args(argv)
    if args.captions_per_image < 0:
        parser.error(f"--captions_per_image must be >= 0, got {args.captions_per_image}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir(args.output_dir, args.overwrite)  # before decoding every image
    dataset_dict = build_dataset(
        args.format,
        args.data_dir,
        args.image_dir,
        dataset=args.dataset,
        splits=args.splits,
        skip_missing=args.skip_missing,
        num_proc=args.num_proc,
        captions_per_image=args.captions_per_image or None,
        max_skipped_fraction=args.max_skipped_fraction,
    )
    save_dataset(dataset_dict, args.output_dir, parquet=args.parquet, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
