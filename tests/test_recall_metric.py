"""The `evaluate` recall metric (scta_train/retrieval_recall.py): loaded offline from its file, right on hand-built
ranks and matrices, equal to a plain numpy oracle on random ones, and what `compute_metrics` reports."""

import evaluate
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from scta_train.metrics import RECALL_METRIC_PATH, compute_retrieval_metrics, retrieval_metrics


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(RECALL_METRIC_PATH)


def oracle(scores: np.ndarray, caption_to_image: np.ndarray) -> dict:
    """Recall by a literal loop over queries (ties against the model)."""
    num_images, num_captions = scores.shape
    i2t = []
    for image in range(num_images):
        best = max(scores[image, c] for c in range(num_captions) if caption_to_image[c] == image)
        i2t.append(sum(scores[image, c] >= best for c in range(num_captions) if caption_to_image[c] != image))
    t2i = []
    for caption in range(num_captions):
        positive = scores[caption_to_image[caption], caption]
        t2i.append(sum(scores[i, caption] >= positive for i in range(num_images) if i != caption_to_image[caption]))
    metrics = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            metrics[f"r{k}_{name}"] = 100.0 * np.mean(ranks < k)
        metrics[f"medr_{name}"] = np.floor(np.median(ranks)) + 1
        metrics[f"meanr_{name}"] = np.mean(ranks) + 1
    metrics["rsum"] = sum(metrics[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics


def test_hand_built_ranks(metric):
    got = metric.compute(predictions=[0, 3, 0, 12, 1, 0], references=[0, 0, 1, 1, 1, 1])
    assert got["r1_i2t"] == 50.0 and got["r5_i2t"] == 100.0 and got["medr_i2t"] == 2.0 and got["meanr_i2t"] == 2.5
    assert got["r1_t2i"] == 50.0 and got["r5_t2i"] == 75.0 and got["r10_t2i"] == 75.0 and got["meanr_t2i"] == 4.25
    assert got["rsum"] == pytest.approx(50 + 100 + 100 + 50 + 75 + 75)
    one_way = metric.compute(predictions=[2, 0], references=[1, 1])
    assert "rsum" not in one_way and one_way["r1_t2i"] == 50.0 and "r1_i2t" not in one_way
    with pytest.raises(ValueError, match="0-based ranks"):
        metric.compute(predictions=[-1], references=[0])
    with pytest.raises(ValueError, match=r"references are directions.*\[2\]"):
        metric.compute(predictions=[0], references=[2])


def test_a_hand_built_matrix():
    # 3 images, 2 captions each; image 0's best caption ranks 2nd, caption 5 ties with a negative (tie counts against)
    scores = np.array(
        [
            [0.9, 0.1, 0.95, 0.0, 0.2, 0.1],
            [0.1, 0.2, 0.8, 0.9, 0.0, 0.5],
            [0.0, 0.0, 0.1, 0.2, 0.7, 0.5],
        ],
        dtype=np.float32,
    )
    caption_to_image = np.array([0, 0, 1, 1, 2, 2])
    got = retrieval_metrics(scores, caption_to_image)
    assert got["r1_i2t"] == pytest.approx(100 * 2 / 3)  # image 0: caption 2 (another image's) scores higher
    assert got["r1_t2i"] == pytest.approx(100 * 3 / 6)  # captions 0, 3, 4 rank their image first
    assert got == pytest.approx(oracle(scores, caption_to_image))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matrices_and_compute_metrics_equal_the_oracle(seed):
    generator = np.random.default_rng(seed)
    scores = generator.normal(size=(12, 60)).astype(np.float32).round(1)  # rounding makes ties
    caption_to_image = np.repeat(np.arange(12), 5)
    expected = oracle(scores, caption_to_image)
    assert retrieval_metrics(torch.tensor(scores), torch.tensor(caption_to_image)) == pytest.approx(expected)
    hook = compute_retrieval_metrics(EvalPrediction(predictions=torch.tensor(scores), label_ids=caption_to_image))
    assert set(hook) == set(expected) and hook == pytest.approx(expected)
