"""
Loading retrieval datasets into the schema every view reads (`dataset_scripts.FEATURES`: one row per image, columns
`image`, `image_id`, `filename`, `captions`): a folder built by `dataset_scripts/`, the built-in synthetic set, any
`datasets.load_dataset` source (Hub id, local script or folder) or image folders with a `metadata.jsonl` /
`metadata.csv`, as run_clip.py takes them (`--dataset_name`, `--dataset_config_name`, `--image_column`,
`--caption_column`, `--train_file` ...). A caption column holds a list of captions per row, or one caption per row
(the rows of one image are then grouped); any number of captions per image.
"""

import contextlib
import csv
import hashlib
import logging
import os
import shutil

import datasets
from transformers import TrainingArguments

from scta_train.arguments import SYNTHETIC_DATASET_NAME, DataArguments


logger = logging.getLogger(__name__)


def load_retrieval_dataset(
    data_args: DataArguments, training_args: TrainingArguments | None = None
) -> datasets.DatasetDict:
    """The run's splits in the retrieval schema; the synthetic set is generated once into the cache, atomically (by
    the main process first when `training_args` is given; `None`: a single process, as in benchmarks and studies)."""
    if data_args.dataset_name is not None and data_args.dataset_name != SYNTHETIC_DATASET_NAME:
        dataset = _limit(to_retrieval_schema(load_source(data_args), data_args), data_args)
    elif data_args.train_file or data_args.validation_file or data_args.test_file:
        dataset = _limit(to_retrieval_schema(load_metadata_files(data_args), data_args), data_args)
    elif data_args.dataset_dir is not None:
        if not os.path.isdir(data_args.dataset_dir):
            raise ValueError(
                f"--dataset_dir {data_args.dataset_dir} does not exist; build it with "
                "dataset_scripts/build_retrieval_dataset.py."
            )
        dataset = datasets.load_from_disk(data_args.dataset_dir)
    else:
        from dataset_scripts.synthetic_shapes import generate_synthetic_dataset

        name = (
            f"{SYNTHETIC_DATASET_NAME}-seed{data_args.synthetic_seed}-{data_args.synthetic_train_images}-"
            f"{data_args.synthetic_dev_images}-{data_args.synthetic_test_images}-{data_args.synthetic_image_size}px"
        )
        if data_args.synthetic_caption_redundancy != "default":
            name += f"-{data_args.synthetic_caption_redundancy}-redundancy"
        if data_args.synthetic_object_scale != 1:
            name += f"-objects{data_args.synthetic_object_scale:g}x"
        path = os.path.join(data_args.cache_dir, name)
        first = (
            contextlib.nullcontext()
            if training_args is None
            else training_args.main_process_first(desc="generating the synthetic set")
        )
        with first:
            if not os.path.isdir(path):
                logger.info("Generating the synthetic set into %s (once; later runs reuse it)", path)
                temporary = f"{path}.partial-{os.getpid()}"
                generate_synthetic_dataset(
                    output_dir=temporary,
                    seed=data_args.synthetic_seed,
                    train_images=data_args.synthetic_train_images,
                    dev_images=data_args.synthetic_dev_images,
                    test_images=data_args.synthetic_test_images,
                    image_size=data_args.synthetic_image_size,
                    caption_redundancy=data_args.synthetic_caption_redundancy,
                    object_scale=data_args.synthetic_object_scale,
                )
                try:
                    os.replace(temporary, path)  # a killed generation never leaves a half-written set behind
                except OSError:
                    if not os.path.isdir(path):
                        raise
                    shutil.rmtree(temporary)  # another run generated the same set meanwhile: use that one
            dataset = datasets.load_from_disk(path)
    if not isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{data_args.dataset_dir} holds a single Dataset; expected a DatasetDict with splits.")
    return _limit(dataset, data_args)


def _limit(dataset: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    for name, limit in ((data_args.train_split, data_args.max_train_images),):
        if limit is not None and name in dataset:
            dataset[name] = dataset[name].select(range(min(limit, len(dataset[name]))))
    if data_args.max_eval_images is not None:
        for name in (data_args.eval_split, data_args.test_split):
            if name in dataset:
                dataset[name] = dataset[name].select(range(min(data_args.max_eval_images, len(dataset[name]))))
    return dataset


def caption_rows(captions_per_row) -> list[int]:
    """The row of each caption of a split, captions flattened in row order."""
    return [row for row, captions in enumerate(captions_per_row) for _ in captions]


# Split names of Hub datasets -> the run's split arguments.
SPLIT_ALIASES = {
    "train": "train_split",
    "validation": "eval_split",
    "val": "eval_split",
    "dev": "eval_split",
    "test": "test_split",
}
IMAGE_ID_COLUMNS = ("image_id", "img_id", "imgid")


def load_source(data_args: DataArguments) -> datasets.DatasetDict:
    """`--dataset_name` other than the synthetic set: a `save_to_disk` folder, or anything `load_dataset` reads."""
    name = data_args.dataset_name
    if os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_dict.json"))
        or os.path.isfile(os.path.join(name, "dataset_info.json"))
    ):
        loaded = datasets.load_from_disk(name)
    else:
        try:
            loaded = datasets.load_dataset(name, data_args.dataset_config_name)
        except (ConnectionError, FileNotFoundError, ValueError) as error:
            raise ValueError(
                f"--dataset_name {name!r} is not the built-in {SYNTHETIC_DATASET_NAME!r} set nor a local folder, and "
                f"datasets.load_dataset could not load it ({type(error).__name__}: {error}). For Flickr30K or MSCOCO "
                "from the Karpathy files, build a folder with dataset_scripts/build_retrieval_dataset.py and pass "
                "--dataset_dir."
            ) from error
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def load_metadata_files(data_args: DataArguments) -> datasets.DatasetDict:
    """Image folders described by metadata files (imagefolder's `metadata.jsonl` / `metadata.csv`): each row's
    `file_name` is an image path relative to its metadata file."""
    splits = {}
    for split, path in (
        (data_args.train_split, data_args.train_file),
        (data_args.eval_split, data_args.validation_file),
        (data_args.test_split, data_args.test_file),
    ):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ValueError(f"The metadata file {path} does not exist.")
        if path.endswith(".csv"):
            # every cell as written: "NA", "null", "None" or "nan" are captions like any other (no pandas NA parsing)
            with open(path, encoding="utf-8", newline="") as file:
                header = next(csv.reader(file), [])
            text = datasets.Features({column: datasets.Value("string") for column in header})  # "123" stays a name
            rows = datasets.load_dataset(
                "csv", data_files=path, split="train", keep_default_na=False, na_filter=False, features=text
            )
        else:
            rows = datasets.load_dataset("json", data_files=path, split="train")
        if "file_name" not in rows.column_names:
            separator = next(
                (sep for sep in (";", "\t", "|") if len(rows.column_names) == 1 and sep in rows.column_names[0]), None
            )
            hint = f" It looks {separator!r}-separated: metadata.csv is comma-separated." if separator else ""
            raise ValueError(
                f"{path} has no file_name column (it has {rows.column_names}); imagefolder metadata names "
                f"each image's file, relative to the metadata file, in file_name.{hint}"
            )
        folder = os.path.dirname(os.path.abspath(path))
        for index, name in enumerate(rows["file_name"]):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{path}, row {index}: file_name must be a file name (text), got {name!r}.")
            inside = os.path.normpath(os.path.join(folder, name))
            if os.path.isabs(name) or not inside.startswith(folder + os.sep):
                raise ValueError(
                    f"{path}, row {index}: file_name {name!r} must be a path relative to {folder} and inside "
                    "it (no absolute paths, no '..')."
                )
        missing = [name for name in rows["file_name"] if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise ValueError(
                f"{len(missing)} image file(s) named in {path} do not exist, e.g. {missing[0]!r} "
                f"(file_name is relative to {folder})."
            )
        rows = rows.map(lambda row: {"_path": os.path.join(folder, row["file_name"])})
        splits[split] = rows.cast_column("_path", datasets.Image())
    return datasets.DatasetDict(splits)


def to_retrieval_schema(dataset: datasets.DatasetDict, data_args: DataArguments) -> datasets.DatasetDict:
    """Rename, split and group a loaded dataset into `dataset_scripts.FEATURES`, naming what is missing."""
    from dataset_scripts import FEATURES

    split_column = data_args.split_column
    if split_column is None and len(dataset) == 1 and "split" in next(iter(dataset.values())).column_names:
        split_column = "split"
    if split_column is not None:
        (only,) = dataset.values() if len(dataset) == 1 else (datasets.concatenate_datasets(list(dataset.values())),)
        if split_column not in only.column_names:
            raise ValueError(f"--split_column {split_column!r} is not a column; the columns are {only.column_names}.")
        values = only.unique(split_column)
        unnamed = [
            index for index, value in enumerate(only[split_column]) if not isinstance(value, str) or not value.strip()
        ]
        if unnamed:
            raise ValueError(
                f"{len(unnamed)} row(s) have no {split_column!r} value (null or empty), e.g. row {unnamed[0]}: "
                "every row must name its split (train, dev/val/validation, test)."
            )
        dataset = datasets.DatasetDict(
            {value: only.filter(lambda v: v == value, input_columns=split_column) for value in values}
        )
    renamed, sources = {}, {}
    for name, split in dataset.items():
        target = getattr(data_args, SPLIT_ALIASES[name]) if name in SPLIT_ALIASES else name
        if target in renamed:
            raise ValueError(
                f"The splits {sources[target]!r} and {name!r} both map to {target!r}: keep one of them (or "
                "name the other differently), so that neither silently replaces the other."
            )
        renamed[target], sources[target] = _retrieval_split(split, name, data_args, FEATURES), name
    check_no_leak(renamed)
    return datasets.DatasetDict(renamed)


def check_no_leak(splits: dict) -> None:
    """Refuse an image that is in the training split and in an evaluation split: recall would be inflated."""

    def identities(split) -> set[str]:
        """Each image's absolute path, or the hash of its bytes; read 1,000 rows at a time, never all at once."""
        images = split.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
        return {
            (image["path"] and os.path.abspath(image["path"])) or hashlib.sha1(image["bytes"]).hexdigest()
            for batch in images.iter(batch_size=1000)
            for image in batch["image"]
        }

    if "train" not in splits:
        return
    seen = identities(splits["train"])
    for name, split in splits.items():
        shared = sorted(identities(split) & seen) if name != "train" else []
        if shared:
            raise ValueError(
                f"{len(shared)} image(s) are in both the train and the {name!r} split, e.g. {shared[0]}: a "
                "train/test leak would inflate recall. Remove them from one of the splits."
            )


def _retrieval_split(split: datasets.Dataset, name: str, data_args: DataArguments, features) -> datasets.Dataset:
    image_column = "_path" if "_path" in split.column_names else data_args.image_column
    caption_column = data_args.caption_column
    for column, option in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in split.column_names:
            raise ValueError(
                f"The {name!r} split has no column {column!r} ({option}); its columns are {split.column_names}."
            )
    split = split.cast_column(image_column, datasets.Image(decode=False))
    id_column = data_args.image_id_column or next((c for c in IMAGE_ID_COLUMNS if c in split.column_names), None)
    if data_args.image_id_column is not None and id_column not in split.column_names:
        raise ValueError(
            f"--image_id_column {id_column!r} is not a column of the {name!r} split ({split.column_names})."
        )
    if id_column is not None:
        keys = split[id_column]
    else:  # the image's file, or its bytes
        keys = [image["path"] or hashlib.sha1(image["bytes"]).hexdigest() for image in split[image_column]]
    numeric = all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys)
    first_row: dict = {}  # image key -> its first row
    for index, key in enumerate(keys):
        first_row.setdefault(key, index)
    owners = [first_row[key] for key in keys]  # the first row of each row's image

    def captions_of(value, index) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value or [])
        if not all(isinstance(text, str) for text in texts):
            raise ValueError(
                f"Row {index} of the {name!r} split: --caption_column {caption_column!r} must hold strings "
                f"or lists of strings, got {value!r}."
            )
        if not all(text.strip() for text in texts):
            raise ValueError(
                f"Row {index} of the {name!r} split: an empty caption in --caption_column {caption_column!r} "
                "(an empty CSV cell or JSON string); every caption must have text."
            )
        return texts

    grouped: dict[int, list[str]] = {}
    for index, value in enumerate(split[caption_column]):
        grouped.setdefault(owners[index], []).extend(captions_of(value, index))
    empty = [row for row, texts in grouped.items() if not texts]
    if empty:
        raise ValueError(f"{len(empty)} image(s) of the {name!r} split have no caption, e.g. row {empty[0]}.")
    image_rows = sorted(grouped)  # one row per image, in first-seen order
    numbers = {row: number for number, row in enumerate(image_rows)}

    def convert(row, index):
        image = row[image_column]
        key = keys[index]
        return {
            "image": image,
            "image_id": int(key) if numeric else numbers[index],
            "filename": os.path.basename(image["path"]) if image.get("path") else f"{name}/{index:07d}",
            "captions": grouped[index],
        }

    result = split.select(image_rows) if len(image_rows) < len(split) else split
    result = result.map(
        lambda row, position: convert(row, image_rows[position]),
        with_indices=True,
        remove_columns=result.column_names,
        features=features,
        desc=f"Preparing the {name} split",
    )
    logger.info("Split %r: %d images, %d captions", name, len(result), sum(len(t) for t in grouped.values()))
    return result
