"""Shared fixtures: a small synthetic retrieval set and tiny training configurations (CPU, no downloads)."""

import json
import os
import sys

import pytest

from scta_train.testing import TINY_TEXT, TINY_VISION


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# run_retrieval.py's tower configs, from the tiny towers of tiny_models (longer captions than its BERT takes)
TINY_TOWERS = {
    "vision_config": {"model_type": "vit", **TINY_VISION},
    "text_config": {"model_type": "bert", **TINY_TEXT, "max_position_embeddings": 128},
}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """96 train, 16 dev and 16 test images of the synthetic set at 32 px, saved with `save_to_disk`."""
    from dataset_scripts.synthetic_shapes import generate_synthetic_dataset

    path = tmp_path_factory.mktemp("synthetic") / "shapes"
    generate_synthetic_dataset(path, seed=0, train_images=96, dev_images=16, test_images=16, image_size=32, num_proc=1)
    return str(path)


def tiny_run_config(dataset_dir: str, output_dir: str, **overrides) -> dict:
    """Arguments of a seconds-long `run_retrieval.py` run: tiny towers from scratch on the synthetic set."""
    config = {
        "dataset_dir": dataset_dir,
        **TINY_TOWERS,
        "embed_size": 32,
        "vocab_size": 400,
        "output_dir": output_dir,
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "lr_decay_epochs": [1],
        "logging_steps": 5,
        "use_cpu": True,
        "report_to": "none",
        "horizontal_flip": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 7,
    }
    config.update(overrides)
    return config


def write_config(path, config: dict) -> str:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    return str(path)


def run_main(argv: list[str]) -> dict:
    """What `python run_retrieval.py ARGV` does, in this process: parse the arguments, then `scta_train.pipeline.run`."""
    from scta_train.arguments import parse_arguments
    from scta_train.pipeline import run

    return run(*parse_arguments(argv))
