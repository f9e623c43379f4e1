#!/usr/bin/env python
"""
Train and evaluate SCTA for image-text retrieval with the HF Trainer.

    python run_retrieval.py configs/demo_synthetic.json                  # the built-in demo, CPU
    accelerate launch run_retrieval.py configs/f30k_vit.json             # the paper's Flickr30K recipe

Arguments come from the command line or from one JSON file (see `configs/`). Data is a folder written by
`dataset_scripts/build_retrieval_dataset.py` (`--dataset_dir`) or the built-in synthetic set
(`--dataset_name synthetic_shapes`). Models come from a saved SCTA folder or Hub id (`--model_name_or_path`),
from pretrained towers (`--vision_model_name_or_path`, `--text_model_name_or_path`), or from tower configs
(`--vision_config`, `--text_config`) for training from scratch.

Sections: 1. arguments, 2. retrieval metrics, 3. the trainer, 4. data, processor and model, 5. main.
"""

import bisect
import dataclasses
import difflib
import enum
import functools
import json
import logging
import math
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
import transformers
from accelerate import PartialState
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, EvalPrediction, HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SchedulerType, speed_metrics
from transformers.training_args import OptimizerNames

from configuration_scta import SCTAConfig
from modeling_scta import (
    CaptionKeyTokens,
    SCTAModel,
    cosine_similarity_matrix,
    hinge_loss_one_direction,
    scta_with_global_loss,
)
from processing_scta import (
    EVAL_MAX_CAPTION_TOKENS,
    CaptionAugmenter,
    ImageTrainTransform,
    RetrievalCollator,
    RetrievalEvalCaptions,
    RetrievalEvalImages,
    RetrievalTrainDataset,
    SCTAProcessor,
    train_wordpiece_tokenizer,
)


logger = logging.getLogger(__name__)

SYNTHETIC_DATASET_NAME = "synthetic_shapes"
# Training stops when this many steps in a row from the start had no negative pair (see _count_steps_without_negatives).
NO_NEGATIVE_STEPS_TO_STOP = 10
# Head settings that change the shape of a weight: a trained model's cannot be overridden.
SHAPE_SETTINGS = ("embed_size", "patch_keep_ratio", "patch_aggr_ratio", "max_word_slots", "aggregator_hidden_ratio",
                  "word_aggregation")
HEAD_SETTINGS = (
    "embed_size",
    "patch_keep_ratio",
    "patch_aggr_ratio",
    "word_keep_ratio",
    "min_word_slots",
    "max_word_slots",
    "aggregator_hidden_ratio",
    "word_aggregation",
    "alignment_negative_slope",
    "margin",
    "global_pooling",
    "global_loss_weight",
)


# ================================================================================================================
# 1. Arguments


@dataclass
class ModelArguments:
    """Which model to train or evaluate. Give exactly one of: `model_name_or_path`; both tower names; tower configs."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved SCTA folder or Hub id (config.json with model_type 'scta')."}
    )
    vision_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained image tower, e.g. google/vit-base-patch16-224-in21k."}
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained text tower, e.g. bert-base-uncased (its tokenizer is used)."}
    )
    vision_config: str | None = field(
        default=None,
        metadata={"help": "From scratch: image tower config as a dict (in a JSON file) or a JSON string, with model_type."},
    )
    text_config: str | None = field(
        default=None,
        metadata={"help": "From scratch: text tower config as a dict or JSON string; vocab_size comes from the tokenizer."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use instead of the text tower's or the model folder's."}
    )
    vocab_size: int = field(
        default=8192, metadata={"help": "From scratch without a tokenizer: WordPiece vocabulary size to build."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to pin."})
    # Head settings; None keeps the config's value.
    embed_size: int | None = None
    patch_keep_ratio: float | None = None
    patch_aggr_ratio: float | None = None
    word_keep_ratio: float | None = None
    min_word_slots: int | None = None
    max_word_slots: int | None = None
    aggregator_hidden_ratio: float | None = None
    word_aggregation: bool | None = None
    alignment_negative_slope: float | None = None
    margin: float | None = None
    global_pooling: str | None = field(
        default=None, metadata={"help": "Global embeddings of the first retrieval stage: 'mean' or 'cls' pooling."}
    )
    global_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the auxiliary hinge loss on the global embeddings' cosine (0: the paper)."},
    )

    def __post_init__(self):
        sources = [
            self.model_name_or_path is not None,
            self.vision_model_name_or_path is not None or self.text_model_name_or_path is not None,
            self.vision_config is not None or self.text_config is not None,
        ]
        if sum(sources) != 1:
            raise ValueError(
                "Give exactly one model source: --model_name_or_path (an SCTA model), or "
                "--vision_model_name_or_path and --text_model_name_or_path (pretrained towers), or "
                "--vision_config and --text_config (towers from scratch)."
            )
        if sources[1] and (self.vision_model_name_or_path is None or self.text_model_name_or_path is None):
            raise ValueError("Pretrained towers need both --vision_model_name_or_path and --text_model_name_or_path.")
        if sources[2] and (self.vision_config is None or self.text_config is None):
            raise ValueError("Training from scratch needs both --vision_config and --text_config.")
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(f"--{name} must be a JSON object, got {value!r}: {error}") from error
            if value is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"--{name} must be a JSON object with a model_type, got {value!r}.")

    def head_settings(self) -> dict:
        return {name: getattr(self, name) for name in HEAD_SETTINGS if getattr(self, name) is not None}


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset_dir: str | None = field(
        default=None, metadata={"help": "A folder written by dataset_scripts/build_retrieval_dataset.py."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": f"'{SYNTHETIC_DATASET_NAME}': the built-in synthetic set, generated if needed."}
    )
    synthetic_train_images: int = 8000
    synthetic_dev_images: int = 500
    synthetic_test_images: int = 1000
    synthetic_image_size: int = 64
    synthetic_seed: int = 0
    cache_dir: str = field(
        default=os.path.join(os.path.expanduser("~"), ".cache", "scta"),
        metadata={"help": "Where the synthetic set is generated once and reused."},
    )
    train_split: str = "train"
    eval_split: str = field(default="dev", metadata={"help": "Split for per-epoch evaluation and model selection."})
    test_split: str = field(default="test", metadata={"help": "Split evaluated once at the end (--do_predict)."})
    select_on_test: bool = field(
        default=False,
        metadata={
            "help": "Reproduce the published code: evaluate and select the best checkpoint on the TEST split. "
            "Test numbers are then optimistic; off by default (selection on dev)."
        },
    )
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Use only the first N dev/test images."})
    horizontal_flip: bool = field(
        default=True, metadata={"help": "Random horizontal flips; turn off when captions say left/right."}
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.6, 1.0],
        metadata={"help": "Area range of the random resized crop (paper: 0.6 1.0); narrow it when captions say where."},
    )
    caption_word_prob: float = field(default=0.2, metadata={"help": "Share of caption words altered in training."})
    caption_mask_prob: float = field(default=0.5, metadata={"help": "Of altered words: share made [MASK]."})
    caption_random_prob: float = field(default=0.1, metadata={"help": "Of altered words: share made random tokens."})
    max_eval_caption_tokens: int = field(default=EVAL_MAX_CAPTION_TOKENS, metadata={"help": "Paper: 90."})
    on_bad_image: str = field(
        default="error",
        metadata={"help": "A training image that cannot be decoded: 'error' stops, 'skip' skips it with a counted warning."},
    )
    five_fold_test: bool | None = field(
        default=None,
        metadata={"help": "Also report the 5-fold 1K mean (COCO protocol); default: when a split has 5,000 images."},
    )

    def __post_init__(self):
        if (self.dataset_dir is None) == (self.dataset_name is None):
            raise ValueError("Give exactly one of --dataset_dir (a built dataset folder) and --dataset_name.")
        if self.dataset_name is not None and self.dataset_name != SYNTHETIC_DATASET_NAME:
            raise ValueError(
                f"--dataset_name {self.dataset_name!r} is unknown; the built-in set is {SYNTHETIC_DATASET_NAME!r}. "
                "Build Flickr30K or MSCOCO with dataset_scripts/build_retrieval_dataset.py and pass --dataset_dir."
            )
        for name in ("max_train_images", "max_eval_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 (or left unset for all images), got {getattr(self, name)}.")
        for name in ("synthetic_train_images", "synthetic_dev_images", "synthetic_test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if len(self.crop_scale) != 2:
            raise ValueError(f"--crop_scale takes two numbers (smallest and largest area share), got {self.crop_scale}.")
        if self.on_bad_image not in ("error", "skip"):
            raise ValueError(f"--on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}.")


# The optimiser names that mean torch.optim.AdamW (the default depends on the torch version).
ADAMW_NAMES = {OptimizerNames.ADAMW_TORCH, OptimizerNames.ADAMW_TORCH_FUSED}


@dataclass
class SCTATrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults, plus SCTA's schedule settings."""

    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 2.0
    num_train_epochs: float = 30.0
    per_device_train_batch_size: int = 128
    per_device_eval_batch_size: int = 128
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    logging_steps: float = 50
    metric_for_best_model: str = "rsum"
    greater_is_better: bool = True
    load_best_model_at_end: bool = True
    remove_unused_columns: bool = False  # the collator builds the model's inputs
    ddp_find_unused_parameters: bool = False
    backbone_lr_scale: float = field(default=0.1, metadata={"help": "Learning rate of both towers' backbones, x lr."})
    lr_decay_epochs: list[float] = field(
        default_factory=lambda: [9, 15, 20, 25],
        metadata={"help": "Epochs at which every learning rate is decayed (fractions of an epoch allowed)."},
    )
    lr_decay_factor: float = field(default=0.3, metadata={"help": "Decay factor at each of lr_decay_epochs."})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "Not used: the schedule is a linear warmup over --warmup_steps, then step decay at "
            "--lr_decay_epochs. Any value but the default is an error."
        },
    )
    vse_mean_warmup_epochs: float = field(
        default=1, metadata={"help": "Epochs summing the hinge loss over all negatives before the hardest one only."}
    )
    embedding_warmup_epochs: int | None = field(
        default=0, metadata={"help": "Epoch during which the loss ramps linearly from 0 (None: no ramp)."}
    )
    max_nonfinite_steps: int = field(
        default=10, metadata={"help": "Consecutive steps with a non-finite loss (each skipped) after which training stops."}
    )
    rerank_top_k: int = field(
        default=0,
        metadata={
            "help": "Two-stage evaluation: the global embeddings' cosine proposes the top K candidates of every "
            "query and the SCTA head re-scores only those. 0: every pair through the head (exhaustive)."
        },
    )
    middle_stage_top_n: int = field(
        default=0,
        metadata={
            "help": "With --rerank_top_k: first re-rank the global top N of every query by the head with "
            "caption-independent patch selection (precomputed image key tokens, no extra training), then give the "
            "top K of that to the exact head. 0: no middle stage."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow training (or evaluating) into an output_dir that holds another run's model, checkpoints "
            "or results, overwriting them. Without it such a run stops before any work (resuming needs no flag)."
        },
    )
    eval_image_chunk_size: int | None = field(default=None, metadata={"help": "Images per block of scored pairs."})
    eval_text_chunk_size: int | None = field(default=None, metadata={"help": "Captions per block of scored pairs."})

    def __post_init__(self):
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(
                f"--max_steps must be >= 1, or -1 to train for --num_train_epochs; got {self.max_steps} (0 would still "
                "run one optimizer step and save a model)."
            )
        super().__post_init__()
        if self.backbone_lr_scale < 0:
            raise ValueError(f"backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}.")
        if not 0 < self.lr_decay_factor <= 1:
            raise ValueError(f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}.")
        if self.rerank_top_k < 0:
            raise ValueError(f"rerank_top_k must be >= 0 (0: exhaustive), got {self.rerank_top_k}.")
        if self.middle_stage_top_n < 0 or (self.middle_stage_top_n and not self.rerank_top_k):
            raise ValueError(
                f"middle_stage_top_n={self.middle_stage_top_n}: the middle stage re-ranks the first stage of two-stage "
                "evaluation; use it with --rerank_top_k K > 0 (and N >= K), or set it to 0."
            )
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}.")
        if self.lr_scheduler_type != SchedulerType.LINEAR or self.lr_scheduler_kwargs:
            raise ValueError(
                f"--lr_scheduler_type {SchedulerType(self.lr_scheduler_type).value} / --lr_scheduler_kwargs are not "
                "used by SCTA training: the learning rate warms up linearly over --warmup_steps, then is multiplied "
                "by --lr_decay_factor at each of --lr_decay_epochs. Set those instead."
            )
        if self.optim not in ADAMW_NAMES:
            raise ValueError(
                f"--optim {OptimizerNames(self.optim).value} is not used by SCTA "
                f"training, which runs torch.optim.AdamW (the paper's optimiser); leave --optim unset or use one of "
                f"{sorted(name.value for name in ADAMW_NAMES)}."
            )


# ================================================================================================================
# 2. Retrieval metrics


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
    """R@1/5/10 (%), medr = floor(median rank) + 1, meanr = mean rank + 1, rsum = sum of the six recalls."""
    metrics = {}
    for direction, ranks in (("i2t", image_to_text), ("t2i", text_to_image)):
        ranks = ranks.double()
        for k in (1, 5, 10):
            metrics[f"r{k}_{direction}"] = 100.0 * float((ranks < k).double().mean())
        metrics[f"medr_{direction}"] = float(np.floor(np.median(ranks.numpy())) + 1)
        metrics[f"meanr_{direction}"] = float(ranks.mean() + 1)
    metrics["rsum"] = sum(metrics[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics


def retrieval_metrics(
    scores, caption_to_image, five_fold: bool | None = None, fold_size: int = 1000, text_to_image_scores=None
) -> dict:
    """
    Recall metrics of a score matrix (or of one matrix per direction, `text_to_image_scores`). With `five_fold`
    (default: when there are exactly 5 x `fold_size` images, the MSCOCO 5K test), also the mean over the five
    1K folds as `1k_*` (METHOD.md "Evaluation").
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
            captions = ((caption_to_image >= fold * fold_size) & (caption_to_image < (fold + 1) * fold_size)).nonzero()[:, 0]
            rows = slice(fold * fold_size, (fold + 1) * fold_size)
            fold_t2i = None if text_to_image_scores is None else text_to_image_scores[rows][:, captions]
            fold_ranks = retrieval_ranks(scores[rows][:, captions], caption_to_image[captions] - fold * fold_size, fold_t2i)
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
    return retrieval_metrics(image_to_text, prediction.label_ids, five_fold=five_fold, text_to_image_scores=text_to_image)


def retrieval_eval_loss(
    scores: torch.Tensor, caption_to_image: torch.Tensor, margin: float, text_to_image_scores: torch.Tensor | None = None
) -> float:
    """
    The training objective (hinge, hardest negative) over a whole evaluation set, per caption: for every
    (image, caption) pair the hardest caption of another image and the hardest other image (from
    `text_to_image_scores` when given).
    """
    scores = scores.float()
    t2i_scores = scores if text_to_image_scores is None else text_to_image_scores.float()
    num_images, num_captions = scores.shape
    columns = torch.arange(num_captions)
    positive_scores = scores[caption_to_image, columns]  # (n_cap,)
    hardest_caption = torch.empty(num_images)
    for rows in torch.arange(num_images).split(1024):
        positive = caption_to_image[None, :] == rows[:, None]
        hardest_caption[rows] = scores[rows].masked_fill(positive, -math.inf).amax(1)
    hardest_image = t2i_scores.clone()
    hardest_image[caption_to_image, columns] = -math.inf
    hardest_image = hardest_image.amax(0)  # (n_cap,)
    image_to_text = (margin + hardest_caption[caption_to_image] - positive_scores).clamp_min(0)
    text_to_image = (margin + hardest_image - t2i_scores[caption_to_image, columns]).clamp_min(0)
    return float((image_to_text + text_to_image).mean())


# SCTA scores lie in [-0.2, 2] (two means of leaky-ReLU cosines); cosine - 3 lies in [-4, -2]. Non-candidates
# of a two-stage ranking get that value: below every re-ranked candidate, in first-stage order among themselves.
NON_CANDIDATE_OFFSET = 3.0


@torch.no_grad()
def encode_image_corpus(model: SCTAModel, images, batch_size: int, device, num_workers: int = 0, show: bool = False):
    """
    Image side of a corpus, once per image: `(n, T_img, C)` projected tokens and `(n, C)` global embeddings, on
    `device`. `images` is a dataset of `{"pixel_values": (3, S, S)}` items (e.g. `RetrievalEvalImages`).
    """
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=RetrievalCollator(0))
    tokens, global_embeds = [], []
    for batch in tqdm(loader, desc="Encoding images", disable=not show):
        features = model.get_image_features(batch["pixel_values"].to(device))
        tokens.append(features.last_hidden_state)
        global_embeds.append(features.pooler_output)
    width = model.config.embed_size
    if not tokens:
        return torch.zeros(0, model.config.num_patches + int(model.config.vision_has_cls_token), width), torch.zeros(0, width)
    return torch.cat(tokens), torch.cat(global_embeds)


@torch.no_grad()
def encode_caption_corpus(
    model: SCTAModel, captions, batch_size: int, device, pad_token_id: int, show: bool = False
) -> tuple[CaptionKeyTokens, torch.Tensor]:
    """
    Caption side of a corpus, once per caption: its `CaptionKeyTokens` and `(n, C)` global embeddings, in the
    captions' order. `captions` is a dataset of `{"input_ids": list[int]}` items (e.g. `RetrievalEvalCaptions`);
    they are encoded in batches of similar length, so that little of a batch is padding.
    """
    order = sorted(range(len(captions)), key=lambda index: len(captions[index]["input_ids"]))
    loader = DataLoader(Subset(captions, order), batch_size=batch_size, collate_fn=RetrievalCollator(pad_token_id))
    parts, global_embeds = [], []
    for batch in tqdm(loader, desc="Encoding captions", disable=not show):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        features = model.get_text_features(input_ids, attention_mask)
        parts.append(model.caption_key_tokens(features.last_hidden_state, attention_mask))
        global_embeds.append(features.pooler_output)
    restore = torch.tensor(order).argsort()  # sorted position of every caption
    return CaptionKeyTokens.cat(parts).subset(restore), torch.cat(global_embeds)[restore.to(device)]


def first_stage_candidates(global_scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The top-k of every query by first-stage score: `(n_img, k)` caption indices of every image and `(n_cap, k)`
    image indices of every caption (k capped at the number of candidates).
    """
    num_images, num_captions = global_scores.shape
    top_captions = global_scores.topk(min(top_k, num_captions), dim=1).indices
    top_images = global_scores.topk(min(top_k, num_images), dim=0).indices.t()
    return top_captions, top_images


def candidate_recall(
    top_captions: torch.Tensor, top_images: torch.Tensor, caption_to_image: torch.Tensor
) -> tuple[float, float]:
    """
    % of queries whose positive is among their candidates: an image with at least one of its captions, a
    caption with its image. Two-stage retrieval can only lose a hit whose positive is not a candidate.
    """
    caption_to_image = caption_to_image.to(top_captions.device)
    image_hit = (caption_to_image[top_captions] == torch.arange(len(top_captions), device=top_captions.device)[:, None])
    caption_hit = top_images == caption_to_image[:, None]
    return 100.0 * float(image_hit.any(1).float().mean()), 100.0 * float(caption_hit.any(1).float().mean())


def two_stage_pairs(top_captions: torch.Tensor, top_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The distinct (image, caption) pairs among both directions' candidates, each scored once by the head:
    `(pair_keys (P,), inverse)` with `pair_key = image * n_cap + caption` and `inverse` mapping the flattened
    image->text candidates, then the text->image ones, to their pair.
    """
    num_images, num_captions = len(top_captions), len(top_images)
    device = top_captions.device
    image_to_text_keys = torch.arange(num_images, device=device)[:, None] * num_captions + top_captions
    text_to_image_keys = top_images * num_captions + torch.arange(num_captions, device=device)[:, None]
    keys = torch.cat([image_to_text_keys.reshape(-1), text_to_image_keys.reshape(-1)])
    return torch.unique(keys, return_inverse=True)


def two_stage_score_matrices(
    global_scores: torch.Tensor,
    top_captions: torch.Tensor,
    top_images: torch.Tensor,
    pair_scores: torch.Tensor,
    inverse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One ranking matrix per direction, `(n_img, n_cap)` each: a query's candidates hold their exact head scores,
    every other entry its first-stage score minus `NON_CANDIDATE_OFFSET` (below every head score). Consumes
    `global_scores`.
    """
    split = top_captions.numel()
    image_to_text_exact = pair_scores[inverse[:split]].view(top_captions.shape).to(global_scores.dtype)
    text_to_image_exact = pair_scores[inverse[split:]].view(top_images.shape).to(global_scores.dtype)
    text_to_image = global_scores.clone().sub_(NON_CANDIDATE_OFFSET)
    text_to_image.t().scatter_(1, top_images, text_to_image_exact)
    image_to_text = global_scores.sub_(NON_CANDIDATE_OFFSET).scatter_(1, top_captions, image_to_text_exact)
    return image_to_text, text_to_image


def two_stage_rank(
    global_scores: torch.Tensor,
    caption_to_image: torch.Tensor,
    top_k: int,
    score_exact,
    middle_top_n: int = 0,
    score_middle=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    Two-stage (or three-stage) retrieval over a whole split, both directions.

    1. `global_scores` `(n_img, n_cap)` (the global embeddings' cosine) rank every query's candidates;
    2. with `middle_top_n`, the top N of every query are re-ranked by `score_middle` (the caption-independent head);
    3. the top `top_k` of every query are scored by `score_exact` (the SCTA head).
    `score_*(image_index (P,), caption_index (P,)) -> (P,)` score distinct pairs, each once for both directions.

    Returns the image->text and text->image ranking matrices (`two_stage_score_matrices`) and statistics:
    candidate recall of the final k candidates (%), head pairs, middle-stage pairs. Consumes `global_scores`.
    """
    num_captions = global_scores.shape[1]

    def scored(top_captions, top_images, score):
        pair_keys, inverse = two_stage_pairs(top_captions, top_images)
        return pair_keys, inverse, score(pair_keys // num_captions, pair_keys % num_captions)

    stats = {}
    image_to_text_stage = text_to_image_stage = global_scores
    if middle_top_n:
        top_captions, top_images = first_stage_candidates(global_scores, middle_top_n)
        pair_keys, inverse, middle_scores = scored(top_captions, top_images, score_middle)
        # middle scores lie in [-0.2, 2] like the head's; shifted, they rank above every cosine (<= 1)
        image_to_text_stage, text_to_image_stage = two_stage_score_matrices(
            global_scores.clone(), top_captions, top_images, middle_scores + NON_CANDIDATE_OFFSET, inverse
        )
        stats["middle_pairs"] = len(pair_keys)
    top_captions = first_stage_candidates(image_to_text_stage, top_k)[0]
    top_images = first_stage_candidates(text_to_image_stage, top_k)[1]
    del image_to_text_stage, text_to_image_stage
    stats["candidate_recall_i2t"], stats["candidate_recall_t2i"] = candidate_recall(top_captions, top_images, caption_to_image)
    pair_keys, inverse, exact_scores = scored(top_captions, top_images, score_exact)
    stats["head_pairs"] = len(pair_keys)
    image_to_text, text_to_image = two_stage_score_matrices(global_scores, top_captions, top_images, exact_scores, inverse)
    return image_to_text, text_to_image, stats


def format_results(metrics: dict, prefix: str) -> str:
    """A plain-text I2T / T2I table of `metrics` (keys `{prefix}_r1_i2t` ...)."""
    lines = []
    for fold in ("1k_", ""):
        if f"{prefix}_{fold}r1_i2t" not in metrics:
            continue
        title = {"1k_": "5-fold 1K mean", "": "all images"}[fold]
        lines.append(f"{prefix} ({title})")
        lines.append(f"{'':>16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}")
        for direction, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
            values = [metrics[f"{prefix}_{fold}r{k}_{direction}"] for k in (1, 5, 10)]
            medr, meanr = metrics[f"{prefix}_{fold}medr_{direction}"], metrics[f"{prefix}_{fold}meanr_{direction}"]
            lines.append(f"{name:>16}" + "".join(f"{v:8.1f}" for v in values) + f"{medr:8.1f}{meanr:9.1f}")
        lines.append(f"{'rsum':>16}{metrics[f'{prefix}_{fold}rsum']:8.1f}")
    return "\n".join(lines)


# ================================================================================================================
# 3. The trainer


def warmup_step_decay(step: int, warmup_steps: int, decay_steps: list[int], decay_factor: float) -> float:
    """Learning-rate multiplier at `step`: `step / warmup_steps` during the warmup, x `decay_factor` per decay step passed."""
    warmup = step / warmup_steps if step < warmup_steps else 1.0
    return warmup * decay_factor ** bisect.bisect_right(decay_steps, step)


# The autograd all-gather of functional collectives (its backward is a summing reduce-scatter); older torch
# releases call it all_gather_tensor_autograd.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (sizes may differ along dim 0), with gradient flowing back to its owner."""
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(sizes))
    padded = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, largest - tensor.shape[0]]).contiguous()
    gathered = _all_gather_autograd(padded, 0, dist.group.WORLD)  # (world_size * largest, ...)
    return [part[: int(n)] for part, n in zip(gathered.chunk(len(sizes)), sizes)]


class SCTATrainer(Trainer):
    """
    `Trainer` for SCTA: the paper's optimiser and step schedule, the hinge loss over the global batch, and an
    `evaluate` that scores every evaluation image against every caption.
    """

    def __init__(self, *args, eval_max_caption_tokens: int = EVAL_MAX_CAPTION_TOKENS, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_max_caption_tokens = eval_max_caption_tokens
        self.nonfinite_loss_steps = 0  # skipped steps, over the run
        self.consecutive_nonfinite_steps = 0
        self.steps_without_negatives = 0  # batches whose pairs all show one image
        self.loss_steps = 0
        self.retrieval_results: dict[str, dict] = {}  # metrics of every evaluated split, for the model card

    # -- optimisation ------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """
        AdamW (fused when `--optim adamw_torch_fused`, the default on recent torch); both towers' backbones at
        `learning_rate * backbone_lr_scale`, projections and head at `learning_rate`.
        """
        if self.optimizer is None:
            model = model if model is not None else self.model
            backbones, head = [], []
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    (backbones if name.startswith(("vision_model.", "text_model.")) else head).append(parameter)
            learning_rate = self.args.learning_rate
            # Weight decay on every parameter, as in the published recipe.
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": backbones, "lr": learning_rate * self.args.backbone_lr_scale},
                    {"params": head, "lr": learning_rate},
                ],
                lr=learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                weight_decay=self.args.weight_decay,
                fused=self.args.optim == OptimizerNames.ADAMW_TORCH_FUSED,
            )
        return self.optimizer

    def update_steps_per_epoch(self) -> int:
        batches = math.ceil(len(self.train_dataset) / (self.args.per_device_train_batch_size * self.args.world_size))
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """
        A linear warmup from 0 over `warmup_steps` (none by default), then every learning rate x `lr_decay_factor`
        at each epoch of `lr_decay_epochs`. Step-wise, so exact on resume.
        """
        if self.lr_scheduler is None:
            steps_per_epoch = self.update_steps_per_epoch()
            schedule = functools.partial(
                warmup_step_decay,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                decay_steps=sorted(round(epoch * steps_per_epoch) for epoch in self.args.lr_decay_epochs),
                decay_factor=self.args.lr_decay_factor,
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer, schedule
            )
        return self.lr_scheduler

    # -- loss --------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """
        The hinge loss on the global batch: sum over negatives during the first `vse_mean_warmup_epochs`, hardest
        negative after; ramped from 0 during epoch `embedding_warmup_epochs`. A non-finite loss skips the step.
        """
        image_ids = inputs.pop("image_ids")
        self._count_steps_without_negatives(image_ids)
        outputs = model(**inputs)  # through the DDP wrapper: the local tokens and the local block of scores
        epoch = self.state.epoch or 0.0
        hardest_negative = epoch >= self.args.vse_mean_warmup_epochs
        config = self.accelerator.unwrap_model(model).config
        if self.args.world_size == 1:
            global_logits = cosine_similarity_matrix(outputs.image_global_embeds, outputs.text_global_embeds)
            loss, _ = scta_with_global_loss(
                outputs.logits_per_image, global_logits, image_ids, config.margin, hardest_negative,
                config.global_loss_weight,
            )
        else:
            loss = self._global_batch_loss(model, outputs, inputs["attention_mask"], image_ids, hardest_negative)
        if self.args.embedding_warmup_epochs is not None and int(epoch) == self.args.embedding_warmup_epochs:
            loss = loss * (epoch - int(epoch))  # step_in_epoch / steps_per_epoch

        if not self._loss_is_finite(loss):
            self.nonfinite_loss_steps += 1
            self.consecutive_nonfinite_steps += 1
            logger.warning(
                "Non-finite loss (%s) at step %d: the step is skipped (%d skipped so far).",
                float(loss.detach()), self.state.global_step, self.nonfinite_loss_steps,
            )
            if self.consecutive_nonfinite_steps >= self.args.max_nonfinite_steps:
                raise FloatingPointError(
                    f"The loss was non-finite in {self.consecutive_nonfinite_steps} consecutive steps (step "
                    f"{self.state.global_step}); stopping rather than training on garbage. Lower the learning rate, "
                    "check the data, or resume from the last checkpoint."
                )
            # A leaf zero: its backward touches no parameter, so the optimizer step changes nothing.
            loss = torch.zeros((), device=loss.device, requires_grad=True)
        else:
            self.consecutive_nonfinite_steps = 0
        return (loss, outputs) if return_outputs else loss

    def _count_steps_without_negatives(self, image_ids: torch.Tensor) -> None:
        """
        The hinge loss needs two distinct images in the global batch: a batch whose pairs all show one image has
        no negative, loss 0 and gradient 0. Such steps are counted and logged; if every step so far had none after
        `NO_NEGATIVE_STEPS_TO_STOP` steps, the run stops instead of saving a model that learnt nothing.
        """
        all_ids = self.accelerator.gather(image_ids) if self.args.world_size > 1 else image_ids
        self.loss_steps += 1
        if bool((all_ids != all_ids[0]).any()):
            return
        self.steps_without_negatives += 1
        logger.warning(
            "Step %d: all %d pairs of the global batch show image %d, so the hinge loss has no negative and "
            "nothing is learnt from this batch (%d such steps so far).",
            self.state.global_step, len(all_ids), int(all_ids[0]), self.steps_without_negatives,
        )  # fmt: skip
        if self.steps_without_negatives == self.loss_steps >= NO_NEGATIVE_STEPS_TO_STOP:
            raise ValueError(
                f"None of the first {self.loss_steps} batches had two different images, so the loss and its gradient "
                "were 0 at every step: training would save a model that learnt nothing. Each batch needs pairs of "
                "several images: raise --per_device_train_batch_size, or use more images (--max_train_images)."
            )

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.args.world_size > 1:  # every process must skip the same steps
            finite = self.accelerator.gather(finite).min()
        return bool(finite)

    def _global_batch_loss(self, model, outputs, text_attention_mask, image_ids, hardest_negative):
        """
        Under several processes: this process's image rows and caption columns of the global score matrix.

        Tokens are gathered with gradient, so negatives come from every process. Each process scores its images
        against every caption and every image against its captions, reusing the local block its forward made.
        The sum over processes of these losses is the single-process loss of the global batch; x world_size
        undoes DDP's gradient averaging.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        rank, world_size = self.args.process_index, self.args.world_size
        length = torch.tensor([text_attention_mask.shape[1]], device=text_attention_mask.device)
        longest = int(self.accelerator.gather(length).max())
        text_embeds = F.pad(outputs.text_embeds, (0, 0, 0, longest - text_attention_mask.shape[1]))
        text_attention_mask = F.pad(text_attention_mask, (0, longest - text_attention_mask.shape[1]))

        all_images = _all_gather_with_grad(outputs.image_embeds)
        all_texts = _all_gather_with_grad(text_embeds)
        all_masks = _all_gather_with_grad(text_attention_mask)
        all_ids = torch.cat(_all_gather_with_grad(image_ids))
        local_block = outputs.logits_per_image  # (B_r, B_r)
        rows = [
            local_block if other == rank else unwrapped.similarity(outputs.image_embeds, all_texts[other], all_masks[other])
            for other in range(world_size)
        ]
        columns = [
            local_block if other == rank else unwrapped.similarity(all_images[other], text_embeds, text_attention_mask)
            for other in range(world_size)
        ]
        positive_mask = image_ids[:, None] == all_ids[None, :]  # (B_r, B_global)
        config = unwrapped.config

        def hinge(rows: torch.Tensor, columns: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
            """Both directions for this process's queries: rows `(B_r, B_global)`, columns `(B_global, B_r)`."""
            image_to_text = hinge_loss_one_direction(rows, positives, positive_mask, config.margin, hardest_negative)
            text_to_image = hinge_loss_one_direction(columns.t(), positives, positive_mask, config.margin, hardest_negative)
            return image_to_text + text_to_image

        loss = hinge(torch.cat(rows, 1), torch.cat(columns, 0), local_block.diagonal())
        if config.global_loss_weight:
            image_global, text_global = outputs.image_global_embeds, outputs.text_global_embeds
            all_image_global = torch.cat(_all_gather_with_grad(image_global))
            all_text_global = torch.cat(_all_gather_with_grad(text_global))
            loss = loss + config.global_loss_weight * hinge(
                cosine_similarity_matrix(image_global, all_text_global),
                cosine_similarity_matrix(all_image_global, text_global),
                cosine_similarity_matrix(image_global, text_global).diagonal(),
            )
        return loss * world_size

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["nonfinite_loss_steps"] = self.nonfinite_loss_steps
            logs["steps_without_negatives"] = self.steps_without_negatives
        super().log(logs, start_time)

    # -- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        Recall@K of every image against every caption of a split (a `datasets.Dataset` with `image`, `image_id`,
        `captions`). Each image and each caption is encoded once; images are split across processes, every
        process scores its images against all captions. With `--rerank_top_k K` the head scores only the top K
        candidates of every query by the global embeddings' cosine (two-stage retrieval), and the metrics add the
        first stage's candidate recall; `head_pairs` and `scoring_runtime` are reported either way.
        """
        split = eval_dataset if eval_dataset is not None else self.eval_dataset
        if split is None:
            raise ValueError("evaluate() needs an eval_dataset: the Trainer has none.")
        if isinstance(split, dict):
            metrics = {}
            for name, part in split.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        self._memory_tracker.start()
        start_time = time.time()
        result = self.retrieval_scores(split)
        image_to_text, text_to_image, caption_to_image = result.pop("scores")
        predictions = image_to_text.numpy() if text_to_image is None else (image_to_text.numpy(), text_to_image.numpy())
        compute_metrics = self.compute_metrics or compute_retrieval_metrics
        metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=caption_to_image.numpy()))
        margin = self.accelerator.unwrap_model(self.model).config.margin
        metrics["loss"] = retrieval_eval_loss(image_to_text, caption_to_image, margin, text_to_image)
        metrics.update(result)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=image_to_text.shape[0]))
        self.retrieval_results[metric_key_prefix] = metrics
        self.log(dict(metrics))  # log() adds the epoch to the dict it gets
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    @torch.no_grad()
    def retrieval_scores(self, split) -> dict:
        """
        Scores of a split, on every process: `{"scores": (image_to_text, text_to_image or None, caption_to_image),
        "head_pairs": ..., "scoring_runtime": ..., and after two-stage "candidate_recall_i2t"/"_t2i"}`, with
        `(n_img, n_cap)` score matrices (one for both directions when exhaustive) and `(n_cap,)` caption -> image row.
        """
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        device = self.args.device
        processor = self.processing_class
        show = self.is_local_process_zero() and not self.args.disable_tqdm
        chunks = (self.args.eval_image_chunk_size, self.args.eval_text_chunk_size)

        images = RetrievalEvalImages(split, processor.image_processor)
        captions = RetrievalEvalCaptions(split, processor.tokenizer, max_length=self.eval_max_caption_tokens)
        rank, world_size = self.args.process_index, self.args.world_size
        shards = [range(len(images) * r // world_size, len(images) * (r + 1) // world_size) for r in range(world_size)]
        batch_size = self.args.per_device_eval_batch_size
        image_tokens, image_global = encode_image_corpus(
            model, Subset(images, shards[rank]), batch_size, device, self.args.dataloader_num_workers, show
        )  # this process's images: (n_local, T_img, C), (n_local, C)
        caption_keys, caption_global = encode_caption_corpus(
            model, captions, batch_size, device, processor.tokenizer.pad_token_id, show
        )  # every caption

        start = time.perf_counter()
        num_images, num_captions = len(images), len(captions)
        top_k = self.args.rerank_top_k
        if top_k == 0:  # exhaustive: every pair through the head
            local_scores = model.score(image_tokens, caption_keys, *chunks, progress=show).float().cpu()
            image_to_text = self._gather_rows(local_scores, [len(shard) for shard in shards])
            model.train(was_training)
            return {
                "scores": (image_to_text, None, captions.caption_to_image),
                "head_pairs": num_images * num_captions,
                "scoring_runtime": round(time.perf_counter() - start, 4),
            }

        # Two-stage: the global cosine proposes the top-k of every query, the head re-scores those pairs only.
        all_image_global = torch.cat(self._gather_parts(image_global, [len(shard) for shard in shards]))
        global_scores = cosine_similarity_matrix(all_image_global, caption_global).float().cpu()  # (n_img, n_cap)
        shard = shards[rank]

        def on_this_process(score):
            """A pair scorer over this process's images; every process gets every pair's score."""

            def score_pairs(pair_images, pair_captions):
                local = (pair_images >= shard.start) & (pair_images < shard.stop)
                scores = torch.zeros(len(pair_images))
                scores[local] = score(pair_images[local] - shard.start, pair_captions[local]).float().cpu()
                if world_size > 1:  # each pair was scored by exactly one process
                    scores = self.accelerator.reduce(scores.to(device), reduction="sum").cpu()
                return scores

            return score_pairs

        score_middle = None
        if self.args.middle_stage_top_n:
            image_keys = model.caption_independent_image_keys(image_tokens)
            score_middle = on_this_process(lambda i, c: model.caption_independent_scores(image_keys, caption_keys, i, c))
        score_exact = on_this_process(lambda i, c: model.score_candidates(image_tokens, caption_keys, i, c, *chunks, progress=show))
        image_to_text, text_to_image, stats = two_stage_rank(
            global_scores, captions.caption_to_image, top_k, score_exact, self.args.middle_stage_top_n, score_middle
        )
        model.train(was_training)
        return {
            "scores": (image_to_text, text_to_image, captions.caption_to_image),
            "scoring_runtime": round(time.perf_counter() - start, 4),
            **stats,
        }

    def _gather_parts(self, local: torch.Tensor, rows_per_process: list[int]) -> list[torch.Tensor]:
        """Every process's `local` rows (sizes may differ), on every process."""
        if self.args.world_size == 1:
            return [local]
        padded = local.new_zeros(max(rows_per_process), *local.shape[1:])
        padded[: len(local)] = local
        gathered = self.accelerator.gather(padded[None].to(self.args.device))  # (world_size, max rows, ...)
        return [part[:n] for part, n in zip(gathered, rows_per_process)]

    def _gather_rows(self, local_rows: torch.Tensor, rows_per_process: list[int]) -> torch.Tensor:
        return torch.cat(self._gather_parts(local_rows, rows_per_process)).cpu()

    # -- checkpoints -------------------------------------------------------------------------------------------

    # transformers saves the towers in their Hub key layout (ViT's `encoder.layer.N...`) and converts on load;
    # the Trainer's own reload is a non-strict `load_state_dict` that would silently skip those keys.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info(
            "Loading the best model (%s = %s) from %s",
            self.args.metric_for_best_model, self.state.best_metric, self.state.best_model_checkpoint,
        )
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    # -- model card --------------------------------------------------------------------------------------------

    def create_model_card(self, **kwargs) -> None:
        """The Trainer's card (metadata, training log) preceded by SCTA's results table, settings and usage."""
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        card_path = Path(self.args.output_dir) / "README.md"
        card = card_path.read_text(encoding="utf-8")
        front_matter_end = card.index("---", 3) + 3 if card.startswith("---") else 0
        card_path.write_text(card[:front_matter_end] + "\n\n" + self.scta_card_section() + "\n" + card[front_matter_end:], encoding="utf-8")

    def scta_card_section(self) -> str:
        config = self.accelerator.unwrap_model(self.model).config
        lines = ["# SCTA image-text retrieval model", ""]
        for prefix, metrics in self.retrieval_results.items():
            for fold in ("1k_", ""):
                if f"{prefix}_{fold}r1_i2t" not in metrics:
                    continue
                title = f"{prefix} split" + (" (5-fold 1K mean)" if fold else "")
                lines += [f"## Results: {title}", "", "| direction | R@1 | R@5 | R@10 | medr | meanr |", "|---|---|---|---|---|---|"]
                for direction, name in (("i2t", "image → text"), ("t2i", "text → image")):
                    values = [metrics[f"{prefix}_{fold}r{k}_{direction}"] for k in (1, 5, 10)]
                    values += [metrics[f"{prefix}_{fold}medr_{direction}"], metrics[f"{prefix}_{fold}meanr_{direction}"]]
                    lines.append(f"| {name} | " + " | ".join(f"{value:.1f}" for value in values) + " |")
                lines += ["", f"rsum: {metrics[f'{prefix}_{fold}rsum']:.1f}", ""]
        settings = {name: getattr(config, name) for name in HEAD_SETTINGS}
        lines += [
            "## Configuration",
            "",
            f"- image tower: `{config.vision_config.model_type}` ({config.num_patches} patches"
            f"{' + [CLS]' if config.vision_has_cls_token else ''}), text tower: `{config.text_config.model_type}`",
            "- head: " + ", ".join(f"`{name}={value}`" for name, value in settings.items()),
            "",
            "## Usage",
            "",
            "```python",
            "import torch",
            "from transformers import AutoModel, AutoProcessor",
            "",
            'model = AutoModel.from_pretrained("<this repo>", trust_remote_code=True).eval()',
            'processor = AutoProcessor.from_pretrained("<this repo>", trust_remote_code=True)',
            'inputs = processor(images=images, text=["a dog runs on the beach"], return_tensors="pt")',
            "with torch.no_grad():",
            "    scores = model(**inputs).logits_per_image  # (images, captions)",
            "```",
            "",
            "`trust_remote_code=True` runs this repo's `configuration_scta.py`, `modeling_scta.py` and "
            "`processing_scta.py`; read them, and pin a reviewed commit with `revision=\"<commit sha>\"`.",
            "",
        ]
        return "\n".join(lines)


# ================================================================================================================
# 4. Data, processor and model


def load_checkpoint_weights(model: SCTAModel, folder: str) -> None:
    """Copy the weights of a `save_pretrained` folder into `model`, through transformers' key conversion, strictly."""
    loaded = type(model).from_pretrained(folder, config=model.config)
    model.load_state_dict(loaded.state_dict())


def is_complete_checkpoint(folder: str) -> bool:
    """Whether a checkpoint folder was written to the end: the Trainer writes `trainer_state.json` last."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as file:
            json.load(file)
    except (OSError, json.JSONDecodeError):
        return False
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("model.safetensors", "model.safetensors.index.json"))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """
    The newest `checkpoint-N` folder written to the end; a folder of a run killed while saving is skipped (and
    logged), never resumed from.
    """
    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted((int(match.group(1)), name) for name in os.listdir(output_dir) if (match := pattern.match(name)))
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if is_complete_checkpoint(folder):
            return folder
        logger.warning("Ignoring the incomplete checkpoint %s (killed while it was being written?).", folder)
    return None


def load_retrieval_dataset(data_args: DataArguments, training_args: TrainingArguments) -> datasets.DatasetDict:
    """The dataset folder, or the synthetic set (generated once into the cache, atomically)."""
    if data_args.dataset_dir is not None:
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
        path = os.path.join(data_args.cache_dir, name)
        with training_args.main_process_first(desc="generating the synthetic set"):
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
                )
                os.replace(temporary, path)  # a killed generation never leaves a half-written set behind
            dataset = datasets.load_from_disk(path)
    if not isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{data_args.dataset_dir} holds a single Dataset; expected a DatasetDict with splits.")
    for name, limit in ((data_args.train_split, data_args.max_train_images),):
        if limit is not None and name in dataset:
            dataset[name] = dataset[name].select(range(min(limit, len(dataset[name]))))
    if data_args.max_eval_images is not None:
        for name in (data_args.eval_split, data_args.test_split):
            if name in dataset:
                dataset[name] = dataset[name].select(range(min(data_args.max_eval_images, len(dataset[name]))))
    return dataset


def _tower_config(spec: dict, side: str):
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"--{side}_config needs a model_type, got {spec}.")
    return AutoConfig.for_model(model_type, **spec)


def load_scta_config(model_name_or_path: str, revision: str | None = None) -> SCTAConfig:
    """The config of a saved SCTA model; an error that says so when the folder or Hub id holds another model."""
    config = AutoConfig.from_pretrained(model_name_or_path, **({"revision": revision} if revision else {}))
    if config.model_type != SCTAConfig.model_type:
        raise ValueError(
            f"--model_name_or_path {model_name_or_path} is not an SCTA model (its config has "
            f"model_type={config.model_type!r}). For pretrained towers use --vision_model_name_or_path and "
            "--text_model_name_or_path."
        )
    return config


def build_processor(model_args: ModelArguments, dataset: datasets.DatasetDict, train_split: str) -> SCTAProcessor:
    """The model folder's processor; or the text tower's tokenizer; or a WordPiece vocabulary of the train captions."""
    revision = {"revision": model_args.model_revision} if model_args.model_revision else {}
    if model_args.model_name_or_path is not None and model_args.tokenizer_name_or_path is None:
        load_scta_config(model_args.model_name_or_path, model_args.model_revision)
        return SCTAProcessor.from_pretrained(model_args.model_name_or_path, **revision)
    if model_args.tokenizer_name_or_path or model_args.text_model_name_or_path:
        name = model_args.tokenizer_name_or_path or model_args.text_model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(name, **revision)
    else:
        if train_split not in dataset:
            raise ValueError(f"Building a vocabulary needs the {train_split!r} split; the dataset has {list(dataset)}.")
        logger.info("Building a %d-entry WordPiece vocabulary from the training captions", model_args.vocab_size)
        captions = (caption for row in dataset[train_split]["captions"] for caption in row)
        tokenizer = train_wordpiece_tokenizer(captions, vocab_size=model_args.vocab_size)
    if model_args.model_name_or_path is not None:
        image_size = load_scta_config(model_args.model_name_or_path, model_args.model_revision).vision_config.image_size
    elif model_args.vision_model_name_or_path is not None:
        image_size = AutoConfig.from_pretrained(model_args.vision_model_name_or_path, **revision).image_size
    else:
        image_size = _tower_config(model_args.vision_config, "vision").image_size
    return SCTAProcessor.from_tokenizer(tokenizer, image_size=image_size)


def build_model(model_args: ModelArguments, processor: SCTAProcessor) -> SCTAModel:
    revision = {"revision": model_args.model_revision} if model_args.model_revision else {}
    head_settings = model_args.head_settings()
    if model_args.model_name_or_path is not None:
        load_scta_config(model_args.model_name_or_path, model_args.model_revision)
        return SCTAModel.from_pretrained(model_args.model_name_or_path, **head_settings, **revision)
    if model_args.vision_model_name_or_path is not None:
        return SCTAModel.from_vision_text_pretrained(
            model_args.vision_model_name_or_path,
            model_args.text_model_name_or_path,
            **{f"vision_{k}": v for k, v in revision.items()},
            **{f"text_{k}": v for k, v in revision.items()},
            **head_settings,
        )
    vision_config = _tower_config(model_args.vision_config, "vision")
    text_config = _tower_config({**model_args.text_config, "vocab_size": len(processor.tokenizer)}, "text")
    config = SCTAConfig.from_vision_text_configs(vision_config, text_config, **head_settings)
    return SCTAModel(config)


# ================================================================================================================
# 5. Main


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SCTATrainingArguments)
# Fields given as JSON objects in a config file (a string on the command line), checked in __post_init__.
JSON_OBJECT_FIELDS = ("vision_config", "text_config")


def _expected_type(annotation) -> str:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected_type(argument) for argument in arguments)
    if origin is list:
        return f"a list of {_expected_type(arguments[0])}" if arguments else "a list"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _fits(value, annotation) -> bool:
    """Whether a JSON value has the type of a dataclass field (no conversion: "false" is not a bool)."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, argument) for argument in arguments)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, arguments[0]) for item in value) if arguments else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {member.value for member in annotation} or isinstance(value, annotation)
    return True  # a type this check does not know: the dataclass checks it


def load_json_arguments(path: str) -> dict:
    """
    A JSON config file, checked before any work: a JSON object whose keys are argument names and whose values
    have the arguments' types. Errors name the file, the key, the value and what was expected.
    """
    try:
        with open(path, encoding="utf-8-sig") as file:
            config = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.") from None
    except OSError as error:
        raise ValueError(f"Cannot read the config file {path}: {error.strerror}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of argument names and values, not a {type(config).__name__}.")
    annotations = {}
    for argument_class in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(argument_class)
        annotations.update({f.name: hints[f.name] for f in dataclasses.fields(argument_class) if f.init})
    unknown = [key for key in config if key not in annotations]
    if unknown:
        hints = "; ".join(
            f"{key!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, annotations, 1)) else "")
            for key in unknown
        )
        raise ValueError(f"{path} has keys that are not arguments of run_retrieval.py: {hints}. See --help.")
    for key, value in config.items():
        if key in JSON_OBJECT_FIELDS and isinstance(value, dict):
            continue
        if not _fits(value, annotations[key]):
            raise ValueError(
                f"{path}: {key!r} is {json.dumps(value)}, but it must be {_expected_type(annotations[key])} "
                f"(a JSON {'true/false' if annotations[key] is bool else 'value of that type'}, not a string)."
                if isinstance(value, str) else
                f"{path}: {key!r} is {json.dumps(value)}, but it must be {_expected_type(annotations[key])}."
            )
    return config


def parse_arguments(argv: list[str] | None = None):
    """
    `run_retrieval.py [CONFIG.json] [--argument value ...]`: a JSON config file (any case of `.json`), then
    command-line arguments that override it; or command-line arguments alone.
    """
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].lower().endswith(".json"):
        config = load_json_arguments(argv[0])
        if len(argv) == 1:
            return parser.parse_dict(config)
        parser.set_defaults(**config)  # typed values: argparse converts only string defaults
        return parser.parse_args_into_dataclasses(args=argv[1:])
    return parser.parse_args_into_dataclasses(args=argv)


def check_output_dir(training_args: TrainingArguments, resume: str | None) -> None:
    """
    Refuse, before any work, an output_dir that holds another run's model, checkpoints or results (a new run
    would overwrite them and checkpoint rotation would delete the old checkpoints), unless resuming or
    `--overwrite_output_dir`. An evaluation-only run may rewrite evaluation results, but not next to a model.
    """
    folder = training_args.output_dir
    if resume is not None or not os.path.isdir(folder):
        return
    entries = sorted(os.listdir(folder))
    model_files = [
        name for name in entries
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") or name in ("model.safetensors", "model.safetensors.index.json", "trainer_state.json")
    ]  # fmt: skip
    others = [name for name in entries if name not in model_files]
    existing = model_files + others if training_args.do_train else model_files  # the weights first
    if not existing:
        return
    listed = ", ".join(existing[:6]) + (f" and {len(existing) - 6} more" if len(existing) > 6 else "")
    if training_args.overwrite_output_dir:
        logger.warning("--overwrite_output_dir: %s holds %s, which this run may overwrite or delete.", folder, listed)
        return
    raise ValueError(
        f"--output_dir {folder} already holds {listed}. A new run would overwrite them (and checkpoint rotation "
        "would delete the old checkpoints). Choose another --output_dir, continue that run with "
        "--resume_from_checkpoint last, or pass --overwrite_output_dir."
    )


def check_splits(dataset: datasets.DatasetDict, data_args, training_args, eval_split_name: str) -> None:
    """The splits a run needs exist and are non-empty; the 5-fold protocol only on 5,000-image splits."""
    needed = {
        data_args.train_split: training_args.do_train,
        eval_split_name: training_args.do_eval or (training_args.do_train and training_args.eval_strategy != "no"),
        data_args.test_split: training_args.do_predict,
    }
    for name, is_needed in needed.items():
        if not is_needed:
            continue
        if name not in dataset:
            raise ValueError(f"The dataset has no {name!r} split (it has {list(dataset)}).")
        if len(dataset[name]) == 0:
            raise ValueError(f"The dataset's {name!r} split has no rows.")
    if data_args.five_fold_test:
        for name, is_needed in needed.items():
            if is_needed and name != data_args.train_split and len(dataset[name]) != 5000:
                raise ValueError(
                    f"--five_fold_test true needs 5,000 images (the MSCOCO 5K test), but the {name!r} split has "
                    f"{len(dataset[name])}. Leave --five_fold_test unset (it is then used exactly on 5,000-image splits)."
                )


def check_launch(training_args: TrainingArguments) -> None:
    """
    Fail fast when a launcher started several processes that would each train alone into the same output_dir.

    Without a GPU, the Trainer joins a process group only with `--use_cpu`; otherwise each process of
    `torchrun --nproc_per_node 2` runs as "process 0 of 1".
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise ValueError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}), but the Trainer runs each of them "
            f"alone on {training_args.device}, so they would train separately into the same output_dir. Without "
            "GPUs, add --use_cpu to the script's arguments so that the processes join one gloo process group."
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(argv)

    # 1. Logging: this script at INFO on the main process; transformers and datasets at --log_level.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    if training_args.log_level != "passive":
        transformers.utils.logging.set_verbosity(log_level)
        datasets.utils.logging.set_verbosity(log_level)
    logger.info(
        "Process %d of %d, device %s", training_args.process_index, training_args.world_size, training_args.device
    )
    check_launch(training_args)
    transformers.set_seed(training_args.seed)

    # 2. Resuming: the newest complete checkpoint, never one cut off mid-write.
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in ("true", "last"):
        resume = last_complete_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no complete "
                             f"checkpoint in {training_args.output_dir}.")
    elif resume is not None and not is_complete_checkpoint(resume):
        raise ValueError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint folder (no readable trainer_state.json "
            "or model weights); pass --resume_from_checkpoint last to take the newest complete one."
        )
    if resume is not None:
        logger.info("Resuming from %s", resume)

    # 3. Data, processor, model.
    check_output_dir(training_args, resume)
    if not training_args.do_train:
        # Evaluation strategy and checkpoint selection concern training only (the Trainer would ask for a dev split).
        training_args.eval_strategy = training_args.save_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False
    global_batch = training_args.per_device_train_batch_size * training_args.world_size
    if training_args.do_train and global_batch < 2:
        raise ValueError(
            f"The global training batch is {global_batch} pair (--per_device_train_batch_size "
            f"{training_args.per_device_train_batch_size} x {training_args.world_size} processes): the hinge loss "
            "compares a pair with the other pairs of its batch, so it would be 0 at every step. Use at least 2."
        )
    if model_args.model_name_or_path is not None:
        changed = [name for name in SHAPE_SETTINGS if getattr(model_args, name) is not None]
        saved = load_scta_config(model_args.model_name_or_path, model_args.model_revision)
        changed = [name for name in changed if getattr(model_args, name) != getattr(saved, name)]
        if changed:
            raise ValueError(
                "--" + ", --".join(f"{name} {getattr(model_args, name)}" for name in changed) + " would change the "
                f"shape of weights of the trained model {model_args.model_name_or_path} (which has "
                + ", ".join(f"{name}={getattr(saved, name)}" for name in changed) + "). Drop the override, or start "
                "from pretrained towers (--vision_model_name_or_path / --text_model_name_or_path) to train another head."
            )
    dataset = load_retrieval_dataset(data_args, training_args)
    processor = build_processor(model_args, dataset, data_args.train_split)
    model = build_model(model_args, processor)
    logger.info(
        "SCTA model: %s + %s towers, %d patches, %.1fM parameters",
        model.config.vision_config.model_type,
        model.config.text_config.model_type,
        model.config.num_patches,
        model.num_parameters() / 1e6,
    )
    eval_split_name = data_args.test_split if data_args.select_on_test else data_args.eval_split
    if data_args.select_on_test:
        logger.warning("--select_on_test: checkpoints are selected on the TEST split, as the published code did.")
    if not training_args.do_train and training_args.do_eval and training_args.do_predict and eval_split_name not in dataset:
        # --do_eval is on by default (TrainingArguments sets it with the default eval_strategy); a test-only dataset
        # evaluated with --do_predict has nothing else to do.
        logger.info("The dataset has no %r split: evaluating the %r split only.", eval_split_name, data_args.test_split)
        training_args.do_eval = False
    check_splits(dataset, data_args, training_args, eval_split_name)

    train_dataset = None
    if training_args.do_train:
        image_transform = ImageTrainTransform.from_image_processor(
            processor.image_processor, horizontal_flip=data_args.horizontal_flip, scale=tuple(data_args.crop_scale)
        )
        caption_augmenter = CaptionAugmenter(
            processor.tokenizer,
            word_prob=data_args.caption_word_prob,
            mask_prob=data_args.caption_mask_prob,
            random_prob=data_args.caption_random_prob,
            max_length=model.config.text_config.max_position_embeddings,
        )
        train_dataset = RetrievalTrainDataset(
            dataset[data_args.train_split],
            image_transform,
            caption_augmenter,
            seed=training_args.seed,
            on_bad_image=data_args.on_bad_image,
        )
        logger.info(
            "Training on %d images, %d (image, caption) pairs per epoch",
            len(dataset[data_args.train_split]),
            len(train_dataset),
        )
    eval_dataset = dataset[eval_split_name] if eval_split_name in dataset else None

    eval_max_caption_tokens = min(data_args.max_eval_caption_tokens, model.config.text_config.max_position_embeddings)
    if eval_max_caption_tokens < data_args.max_eval_caption_tokens:
        logger.info(
            "Evaluation captions keep at most %d tokens (the text tower's max_position_embeddings), not %d.",
            eval_max_caption_tokens, data_args.max_eval_caption_tokens,
        )
    trainer = SCTATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=RetrievalCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        compute_metrics=lambda prediction: compute_retrieval_metrics(prediction, data_args.five_fold_test),
        eval_max_caption_tokens=eval_max_caption_tokens,
    )

    # 4. Train.
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()  # the best checkpoint when load_best_model_at_end, with the processor
        train_metrics = dict(
            train_result.metrics,
            nonfinite_loss_steps=trainer.nonfinite_loss_steps,
            steps_without_negatives=trainer.steps_without_negatives,
        )
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)

    # 5. Evaluate on the selection split and, once, on the test split.
    splits = []
    if training_args.do_eval:
        splits.append(("eval", eval_dataset))
    if training_args.do_predict and not (data_args.select_on_test and training_args.do_eval):
        splits.append(("test", dataset[data_args.test_split]))
    for prefix, split in splits:
        metrics = trainer.evaluate(split, metric_key_prefix=prefix)
        trainer.save_metrics(prefix, metrics)
        logger.info("Retrieval on %s (%d images, %d captions):\n%s", prefix, len(split),
                    sum(len(c) for c in split["captions"]), format_results(metrics, prefix))
        results.update(metrics)

    # 6. Model card (with the results above) and Hub.
    if training_args.do_train:
        trainer.create_model_card(model_name=Path(training_args.output_dir).name, tags=["scta", "image-text-retrieval"])
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="SCTA: end of training", tags=["scta", "image-text-retrieval"])
    return results


def leave_process_group() -> None:
    """
    Leave the process group together, at the end of a multi-process run. A process that exits while another still
    holds a connection to it can make gloo abort the other ("Connection closed by peer", SIGABRT).
    """
    if dist.is_available() and dist.is_initialized():
        state = PartialState()  # the Trainer's; its barrier names each process's device, as NCCL wants
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    main()
    leave_process_group()
