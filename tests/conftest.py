"""Shared fixtures (the helpers are in helpers.py): a small synthetic retrieval set; no network."""

import os
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """96 train, 16 dev and 16 test images of the synthetic set at 32 px, saved with `save_to_disk`."""
    from dataset_scripts.synthetic_shapes import generate_synthetic_dataset

    path = tmp_path_factory.mktemp("synthetic") / "shapes"
    generate_synthetic_dataset(path, seed=0, train_images=96, dev_images=16, test_images=16, image_size=32, num_proc=1)
    return str(path)
