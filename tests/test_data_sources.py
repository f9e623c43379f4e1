"""run_clip.py-style data arguments: image folders with metadata files, local `datasets` folders and scripts, a
local copy of the schema of a common Hub Flickr30K dataset, string or list caption columns, any captions per image."""

import json

import datasets
import PIL.Image
import pytest

from helpers import TINY_TOWERS, run_main, write_config
from scta_train.arguments import DataArguments, SCTATrainingArguments
from scta_train.data import load_retrieval_dataset


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def write_images(folder, count: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(start, start + count):
        name = f"img{index:03d}.png"
        PIL.Image.new("RGB", (36, 36), COLOURS[index % len(COLOURS)]).save(folder / name)
        names.append(name)
    return names


def load(tmp_path, **data_arguments):
    args = DataArguments(**data_arguments)
    return load_retrieval_dataset(args, SCTATrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True))


def test_image_folders_with_metadata_jsonl_and_csv_one_caption_per_row(tmp_path):
    splits = {}
    for split, start in (("train", 0), ("val", 8), ("test", 12)):
        names = write_images(tmp_path / split, 4 if split != "train" else 8, start)
        rows = [
            {"file_name": name, "text": f"a {COLOURS[(start + i) % 8]} square, caption {j}"}
            for i, name in enumerate(names)
            for j in range(1 + i % 3)
        ]  # 1, 2 or 3 captions per image
        if split == "test":
            path = tmp_path / split / "metadata.csv"
            path.write_text("file_name,text\n" + "".join(f'{r["file_name"]},"{r["text"]}"\n' for r in rows))
        else:
            path = tmp_path / split / "metadata.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        splits[split] = (path, rows)
    dataset = load(
        tmp_path,
        train_file=str(splits["train"][0]),
        validation_file=str(splits["val"][0]),
        test_file=str(splits["test"][0]),
        caption_column="text",
    )
    assert {name: len(split) for name, split in dataset.items()} == {"train": 8, "dev": 4, "test": 4}
    train = dataset["train"]
    assert train.features["image"] == datasets.Image() and train[0]["image"].size == (36, 36)
    assert [len(c) for c in train["captions"]] == [1, 2, 3, 1, 2, 3, 1, 2]  # grouped by file, in file order
    assert train[1]["captions"] == ["a green square, caption 0", "a green square, caption 1"]
    assert train["filename"][:2] == ["img000.png", "img001.png"]
    assert len(set(dataset["test"]["image_id"])) == 4


def test_metadata_errors_name_the_file_and_the_fix(tmp_path):
    write_images(tmp_path / "train", 2)
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match="1 image file.* do not exist, e.g. 'nope.png'"):
        load(tmp_path, train_file=str(tmp_path / "train" / "metadata.jsonl"), caption_column="text")
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "img000.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match="no column 'captions' \\(--caption_column\\)"):
        load(tmp_path, train_file=str(tmp_path / "train" / "metadata.jsonl"))
    with pytest.raises(ValueError, match="exactly one data source"):
        DataArguments(dataset_dir=str(tmp_path), train_file=str(tmp_path / "train" / "metadata.jsonl"))


def flickr_like(tmp_path) -> str:
    """The schema of a common Hub Flickr30K dataset: ONE split, one row per image, a list of 5 captions, a `split`
    column (train/val/test), string image ids."""
    images = [PIL.Image.new("RGB", (40, 30), COLOURS[i % 8]) for i in range(24)]
    for index, image in enumerate(images):  # every image its own (identical bytes in two splits are a leak)
        image.putpixel((index, 0), (index, index, index))
    split_of = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    table = datasets.Dataset.from_dict(
        {
            "image": images,
            "caption": [[f"a {COLOURS[i % 8]} picture number {i} , take {j}" for j in range(5)] for i in range(24)],
            "sentids": [[str(5 * i + j) for j in range(5)] for i in range(24)],
            "split": split_of,
            "img_id": [str(1000 + i) for i in range(24)],
            "filename": [f"{1000 + i}.jpg" for i in range(24)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.List(datasets.Value("string")),
                "sentids": datasets.List(datasets.Value("string")),
                "split": datasets.Value("string"),
                "img_id": datasets.Value("string"),
                "filename": datasets.Value("string"),
            }
        ),
    )
    path = tmp_path / "flickr30k_hub_schema"
    datasets.DatasetDict({"test": table}).save_to_disk(str(path))
    return str(path)


def test_a_hub_flickr30k_schema_is_split_by_its_split_column(tmp_path):
    dataset = load(tmp_path, dataset_name=flickr_like(tmp_path), caption_column="caption")
    assert {name: len(split) for name, split in dataset.items()} == {"train": 16, "dev": 4, "test": 4}
    test = dataset["test"]
    assert test["image_id"] == [1020, 1021, 1022, 1023]  # the dataset's own ids
    assert all(len(captions) == 5 for captions in test["captions"])
    assert test[0]["captions"][0] == "a purple picture number 20 , take 0"


def test_a_local_dataset_folder_loaded_by_load_dataset(tmp_path):
    folder = tmp_path / "my_dataset"
    for split, start, count in (("train", 0, 6), ("test", 6, 3)):
        names = write_images(folder / split, count, start)
        rows = [
            {"file_name": name, "captions": [f"a {COLOURS[(start + i) % 8]} one"] * (1 + i % 2)}
            for i, name in enumerate(names)
        ]
        (folder / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load(tmp_path, dataset_name=str(folder))  # the imagefolder builder, through datasets.load_dataset
    assert {name: len(split) for name, split in dataset.items()} == {"train": 6, "test": 3}
    assert [len(c) for c in dataset["test"]["captions"]] == [1, 2, 1]


def test_training_on_the_hub_flickr30k_schema(tmp_path):
    config = {
        "dataset_name": flickr_like(tmp_path),
        "caption_column": "caption",
        **TINY_TOWERS,
        "embed_size": 32,
        "vocab_size": 200,
        "output_dir": str(tmp_path / "out"),
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "eval_strategy": "no",
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    results = run_main([write_config(tmp_path / "run.json", config)])
    assert results["test_head_pairs"] == 4 * 20 and results["eval_head_pairs"] == 4 * 20


def metadata_csv(tmp_path, body: str, count: int = 3):
    names = write_images(tmp_path / "train", count)
    (tmp_path / "train" / "metadata.csv").write_text(body.format(*names))
    return str(tmp_path / "train" / "metadata.csv")


@pytest.mark.parametrize("text", ["NA", "null", "None", "nan", "N/A", "NULL"])
def test_csv_captions_that_pandas_would_call_missing_are_ordinary_text(tmp_path, text):
    path = metadata_csv(tmp_path, "file_name,text\n{0},a red one\n{1}," + text + "\n{2},a third\n")
    dataset = load(tmp_path, train_file=path, caption_column="text")
    assert dataset["train"]["captions"] == [["a red one"], [text], ["a third"]]


@pytest.mark.parametrize(
    "body, message",
    [
        ("file_name,text\n{0},a red one\n{1},\n", "Row 1 of the 'train' split: an empty caption"),
        ("file_name;text\n{0};a red one\n", "looks ';'-separated"),
        ("file_name,text\n/etc/passwd,a red one\n", "must be a path relative to"),
        ("file_name,text\n../outside.png,a red one\n", "no absolute paths, no '..'"),
        ("file_name,text\n,a red one\n", "file_name must be a file name"),
    ],
)
def test_metadata_rows_that_cannot_be_used_are_refused_with_the_row(tmp_path, body, message):
    path = metadata_csv(tmp_path, body)
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        load(tmp_path, train_file=path, caption_column="text")


def test_a_numeric_file_name_is_a_file_name(tmp_path):
    PIL.Image.new("RGB", (30, 30), "red").save(tmp_path / "123", format="PNG")
    (tmp_path / "metadata.csv").write_text("file_name,text\n123,a red one\n")
    assert load(tmp_path, train_file=str(tmp_path / "metadata.csv"), caption_column="text")["train"]["captions"] == [
        ["a red one"]
    ]


def test_split_mistakes_are_refused(tmp_path):
    folder = tmp_path / "data"
    names = write_images(folder, 6)
    rows = [
        {"file_name": name, "captions": [f"picture {i}"], "split": split}
        for i, (name, split) in enumerate(zip(names, ["train", "train", "val", "validation", "test", "test"]))
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="'val' and 'validation' both map to 'dev'"):
        load(tmp_path, dataset_name=str(folder))
    rows[3]["split"] = None
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="1 row\\(s\\) have no 'split' value.*row 3"):
        load(tmp_path, dataset_name=str(folder))
    rows[3]["split"] = "test"
    rows[5]["file_name"] = rows[0]["file_name"]  # the first training image again, in test
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="1 image\\(s\\) are in both the train and the 'test' split"):
        load(tmp_path, dataset_name=str(folder))
