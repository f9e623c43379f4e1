"""Retrieval metrics: ranks, Recall@K, median and mean rank, rsum, the 5-fold 1K protocol, the evaluation loss."""

import functools
import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import EvalPrediction

from modeling_scta import hinge_loss_one_direction, infonce_loss_one_direction


logger = logging.getLogger(__name__)

# Recall@K as an `evaluate` module (scta_train/retrieval_recall.py), loaded from its file: offline, and reusable by any
# retrieval project with `evaluate.load(path)`.
RECALL_METRIC_PATH = str(Path(__file__).with_name("retrieval_recall.py"))


@functools.lru_cache(maxsize=1)
def recall_metric():
    import evaluate

    return evaluate.load(RECALL_METRIC_PATH)


def retrieval_ranks(
    scores: torch.Tensor, caption_to_image: torch.Tensor, text_to_image_scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    0-based ranks of the positives in an image x caption score matrix.

    Ties count against the model: a negative scoring exactly as high as the positive is ranked before it (a
    model giving every pair the same score gets the worst ranks, not the best).

    Args:
        scores: `(n_img, n_cap)`.
        caption_to_image: `(n_cap,)` row of each caption's image.
        text_to_image_scores: `(n_img, n_cap)` scores to rank images by for each caption, when they differ from
            `scores` (two-stage retrieval re-ranks other candidates in each direction); default `scores`.
    Returns:
        image-to-text ranks `(n_img,)`: negatives scoring >= the image's best caption;
        text-to-image ranks `(n_cap,)`: other images scoring >= the caption's image.
    """
    num_images, num_captions = scores.shape
    if caption_to_image.shape != (num_captions,):
        raise ValueError(f"caption_to_image must have shape ({num_captions},), got {tuple(caption_to_image.shape)}.")
    if bool((caption_to_image < 0).any() or (caption_to_image >= num_images).any()):
        raise ValueError(f"caption_to_image has rows outside [0, {num_images}).")
    if text_to_image_scores is not None and text_to_image_scores.shape != scores.shape:
        raise ValueError(
            f"text_to_image_scores has shape {tuple(text_to_image_scores.shape)}, scores {tuple(scores.shape)}."
        )
    scores = scores.float()
    columns = torch.arange(num_captions)
    t2i_scores = scores if text_to_image_scores is None else text_to_image_scores.float()
    text_to_image = (t2i_scores >= t2i_scores[caption_to_image, columns]).sum(0) - 1
    positive_scores = scores[caption_to_image, columns]  # (n_cap,)

    best_positive = torch.full((num_images,), -math.inf).scatter_reduce(0, caption_to_image, positive_scores, "amax")
    image_to_text = torch.empty(num_images, dtype=torch.long)
    for rows in torch.arange(num_images).split(1024):  # bounds the (rows, n_cap) comparison
        positive = caption_to_image[None, :] == rows[:, None]
        image_to_text[rows] = ((scores[rows] >= best_positive[rows, None]) & ~positive).sum(1)
    return image_to_text, text_to_image


def recall_summary(image_to_text: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 (%), medr = floor(median rank) + 1, meanr = mean rank + 1, rsum = sum of the six recalls, by the
    `evaluate` metric `retrieval_recall` (one example per query: its positive's rank and its direction)."""
    ranks = torch.cat([image_to_text.long(), text_to_image.long()]).numpy()
    directions = np.concatenate([np.zeros(len(image_to_text), np.int8), np.ones(len(text_to_image), np.int8)])
    return recall_metric().compute(predictions=ranks, references=directions)


def retrieval_metrics(
    scores, caption_to_image, five_fold: bool | None = None, fold_size: int = 1000, text_to_image_scores=None
) -> dict:
    """
    Recall metrics of a score matrix (or of one matrix per direction, `text_to_image_scores`). With `five_fold`
    (default: when there are exactly 5 x `fold_size` images, the MSCOCO 5K test), also the mean over the five
    1K folds as `1k_*` (docs/METHOD.md "Evaluation").
    """
    scores, caption_to_image = torch.as_tensor(scores), torch.as_tensor(caption_to_image).long()
    if text_to_image_scores is not None:
        text_to_image_scores = torch.as_tensor(text_to_image_scores)
    metrics = recall_summary(*retrieval_ranks(scores, caption_to_image, text_to_image_scores))
    if five_fold is None:
        five_fold = scores.shape[0] == 5 * fold_size
    if five_fold:
        if scores.shape[0] != 5 * fold_size:
            raise ValueError(f"5-fold evaluation needs 5 x {fold_size} images, got {scores.shape[0]}.")
        folds = []
        for fold in range(5):
            captions = ((caption_to_image >= fold * fold_size) & (caption_to_image < (fold + 1) * fold_size)).nonzero()[
                :, 0
            ]
            rows = slice(fold * fold_size, (fold + 1) * fold_size)
            fold_t2i = None if text_to_image_scores is None else text_to_image_scores[rows][:, captions]
            fold_ranks = retrieval_ranks(
                scores[rows][:, captions], caption_to_image[captions] - fold * fold_size, fold_t2i
            )
            folds.append(recall_summary(*fold_ranks))
        metrics.update({f"1k_{name}": float(np.mean([fold[name] for fold in folds])) for name in folds[0]})
    return metrics


def compute_retrieval_metrics(prediction: EvalPrediction, five_fold: bool | None = None) -> dict[str, float]:
    """
    `compute_metrics` hook: `predictions` is the `(n_img, n_cap)` score matrix, or a pair of them (image->text,
    text->image) after two-stage retrieval; `label_ids` caption -> image row.
    """
    predictions = prediction.predictions
    image_to_text, text_to_image = predictions if isinstance(predictions, tuple) else (predictions, None)
    return retrieval_metrics(
        image_to_text, prediction.label_ids, five_fold=five_fold, text_to_image_scores=text_to_image
    )


def retrieval_eval_loss(
    scores: torch.Tensor,
    caption_to_image: torch.Tensor,
    margin: float,
    text_to_image_scores: torch.Tensor | None = None,
    logit_scale: torch.Tensor | float | None = None,
) -> float:
    """
    The training objective over a whole evaluation set, per (image, caption) pair, with the loss's own per-direction
    functions: the hinge (hardest negative, `modeling_scta.hinge_loss_one_direction`) against the hardest caption
    of another image and the hardest other image (from `text_to_image_scores` when given), or, with the model's
    `logit_scale` (`training_loss="infonce"`), InfoNCE against every other image's captions and every other image
    (mean of both directions). Computed 1,024 captions at a time.
    """
    if logit_scale is not None:
        logit_scale = torch.as_tensor(float(logit_scale))

    def one_direction(queries, positives, positive_mask) -> float:
        if logit_scale is None:
            return float(hinge_loss_one_direction(queries, positives, positive_mask, margin))
        return float(infonce_loss_one_direction(queries, positives, positive_mask, logit_scale)) / 2

    scores = scores.float()
    t2i_scores = scores if text_to_image_scores is None else text_to_image_scores.float()
    num_images, num_captions = scores.shape
    caption_to_image = torch.as_tensor(caption_to_image).long()
    image_rows = torch.arange(num_images)
    total = 0.0
    for captions in torch.arange(num_captions).split(1024):
        images = caption_to_image[captions]  # (b,)
        # image -> text: each caption's image queries every caption; its own image's captions are positives
        image_queries = scores[images]  # (b, n_cap)
        same_image = caption_to_image[None, :] == images[:, None]
        total += one_direction(image_queries, scores[images, captions], same_image)
        # text -> image: each caption queries every image; its image is the positive
        caption_queries = t2i_scores[:, captions].t()  # (b, n_img)
        own_image = image_rows[None, :] == images[:, None]
        total += one_direction(caption_queries, t2i_scores[images, captions], own_image)
    return total / num_captions
