"""The `Trainer` of SCTA: optimiser and schedule, the loss over the global batch, retrieval evaluation, checkpoints."""

import bisect
import collections
import functools
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import torch
from torch.utils.data import Subset
from transformers import EvalPrediction, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, speed_metrics
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled

from modeling_scta import SCTAModel
from processing_scta import EVAL_MAX_CAPTION_TOKENS
from scta_train.distributed import shard_bounds
from scta_train.loss import SCTALoss, first_stage_loss
from scta_train.metrics import compute_retrieval_metrics, retrieval_eval_loss
from scta_train.model_card import write_model_card
from scta_train.processing import RetrievalEvalCaptions, RetrievalEvalImages
from scta_train.retrieval import (
    NON_CANDIDATE_OFFSET,
    choose_fusion_weight_on,
    encode_caption_corpus,
    encode_image_corpus,
    two_stage_rank,
)


logger = logging.getLogger(__name__)


# Training stops when this many steps in a row from the start had no negative pair (see _count_steps_without_negatives).
NO_NEGATIVE_STEPS_TO_STOP = 10
# A collapse: every score of the batch equal (to this relative spread) for this many steps in a row (_watch_collapse).
COLLAPSE_SPREAD = 1e-4
COLLAPSE_STEPS_TO_WARN = 20
# A collapse of the ranking (_watch_ranking): over the last COLLAPSE_STEPS_TO_WARN steps the in-batch R@1 at most this
# many times chance, in a run that had once ranked a batch above LEARNED_RANKING_FACTOR times chance.
CHANCE_RANKING_FACTOR = 2.0
LEARNED_RANKING_FACTOR = 10.0


def batch_recall_at_1(scores: torch.Tensor, image_ids: torch.Tensor) -> float:
    """In-batch R@1 of a `(pairs, pairs)` score matrix, the mean of both directions: the share of rows (images)
    whose best column shows the same image, and of columns (captions) whose best row does."""
    same_image = image_ids[:, None] == image_ids[None, :]
    image_to_text = same_image.gather(1, scores.argmax(1, keepdim=True)).float().mean()
    text_to_image = same_image.gather(0, scores.argmax(0, keepdim=True)).float().mean()
    return float(image_to_text + text_to_image) / 2


def batch_chance_recall(image_ids: torch.Tensor) -> float:
    """The in-batch R@1 of a ranking at random (`batch_recall_at_1`'s expectation for scores that carry no
    information): the share of (row, column) pairs that show the same image, about 1 / batch."""
    return float((image_ids[:, None] == image_ids[None, :]).float().mean())


def warmup_step_decay(step: int, warmup_steps: int, decay_steps: list[int], decay_factor: float) -> float:
    """Learning-rate multiplier at `step`: `step / warmup_steps` during the warmup, x `decay_factor` per decay step passed."""
    warmup = step / warmup_steps if step < warmup_steps else 1.0
    return warmup * decay_factor ** bisect.bisect_right(decay_steps, step)


class SCTATrainer(Trainer):
    """
    `Trainer` for SCTA: the paper's optimiser and step schedule, the hinge loss over the global batch, and an
    `evaluate` that scores every evaluation image against every caption.
    """

    def __init__(
        self,
        *args,
        eval_max_caption_tokens: int = EVAL_MAX_CAPTION_TOKENS,
        extra_metrics: dict | None = None,
        choose_fusion_weight: bool = True,
        **kwargs,
    ):
        """`extra_metrics`: `{metric_key_prefix: fn(image_to_text, text_to_image or None, caption_to_image, split)
        -> dict}`, more metrics for the evaluations of that prefix (e.g. the extended COCO metrics on "test").
        `choose_fusion_weight`: choose the fused score's weight on every evaluation of the dev split ("eval") and
        store it in the model's config (False: keep `config.fusion_weight`)."""
        super().__init__(*args, **kwargs)
        self.eval_max_caption_tokens = eval_max_caption_tokens
        self.extra_metrics = extra_metrics or {}
        self.nonfinite_loss_steps = 0  # skipped steps, over the run
        self.consecutive_nonfinite_steps = 0
        self.steps_without_negatives = 0  # batches whose pairs all show one image
        self.collapsed_steps = 0  # steps whose scores were all equal (a collapsed model), over the run
        self.consecutive_collapsed_steps = 0
        self.chance_ranking_steps = 0  # steps whose batches were ranked no better than chance after a good start
        self.recent_rankings = collections.deque(maxlen=COLLAPSE_STEPS_TO_WARN)  # (in-batch R@1, chance) per step
        self.best_ranking = 0.0  # the best in-batch R@1 of the run so far, in multiples of chance
        self.ranking_collapse_reported = False
        self.loss_steps = 0
        self.first_stage_losses: list[float] = []  # the adapter's losses since the last log
        self.batch_recalls: list[float] = []  # in-batch R@1 of the steps since the last log
        self.choose_fusion_weight = choose_fusion_weight
        self.retrieval_results: dict[str, dict] = {}  # metrics of every evaluated split, for the model card

    # -- optimisation ------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """
        AdamW (fused when `--optim adamw_torch_fused`, the default on recent torch), one parameter group per rate:
        the image tower's backbone at `learning_rate * vision_lr_scale`, the text tower's at
        `learning_rate * text_lr_scale` (both `backbone_lr_scale` unless set), projections and head at
        `learning_rate`; InfoNCE's `logit_scale` at `learning_rate` and the first-stage adapter at
        `first_stage_learning_rate`, both without weight decay (a temperature and an identity-initialised map).
        """
        if self.optimizer is None:
            model = model if model is not None else self.model
            vision, text, head, no_decay, first_stage = [], [], [], [], []
            for name, parameter in model.named_parameters():
                if not parameter.requires_grad:
                    continue
                if name.startswith("first_stage."):
                    first_stage.append(parameter)
                elif name.startswith("vision_model."):
                    vision.append(parameter)
                elif name.startswith("text_model."):
                    text.append(parameter)
                else:
                    (no_decay if name == "logit_scale" else head).append(parameter)
            learning_rate = self.args.learning_rate
            groups = [
                {"params": vision, "lr": learning_rate * self.args.tower_lr_scale("vision")},
                {"params": text, "lr": learning_rate * self.args.tower_lr_scale("text")},
                {"params": head, "lr": learning_rate},
            ]
            if no_decay:
                groups.append({"params": no_decay, "lr": learning_rate, "weight_decay": 0.0})
            if first_stage:
                groups.append({"params": first_stage, "lr": self.args.first_stage_learning_rate, "weight_decay": 0.0})
            # Weight decay on every other parameter, as in the published recipe.
            self.optimizer = torch.optim.AdamW(
                [group for group in groups if group["params"]],
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
        The loss on the global batch (`SCTALoss`): the hinge sums over negatives during the first
        `vse_mean_warmup_epochs`, the hardest negative after (InfoNCE always uses every negative); ramped from 0
        during epoch `embedding_warmup_epochs`. A non-finite loss skips the step.
        """
        image_ids = inputs.pop("image_ids")
        self._count_steps_without_negatives(image_ids)
        outputs = model(**inputs)  # through the DDP wrapper: the local tokens and the local block of scores
        self._watch_collapse(outputs.logits_per_image)
        self.batch_recalls.append(batch_recall_at_1(outputs.logits_per_image.detach(), image_ids))
        self._watch_ranking(self.batch_recalls[-1], batch_chance_recall(image_ids))
        epoch = self.state.epoch or 0.0
        hardest_negative = epoch >= self.args.vse_mean_warmup_epochs
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():  # the other processes' blocks are scored outside the prepared forward
            loss = SCTALoss(unwrapped.config)(
                unwrapped, outputs, inputs["attention_mask"], image_ids, hardest_negative, self.args.world_size
            )
        if self.args.embedding_warmup_epochs is not None and int(epoch) == self.args.embedding_warmup_epochs:
            loss = loss * (epoch - int(epoch))  # step_in_epoch / steps_per_epoch
        if unwrapped.first_stage is not None:
            # The adapter learns beside the head from detached embeddings. Its loss joins the backward without
            # changing the reported value (loss + x - x.detach()); its gradients reach the adapter only and are left
            # out of gradient clipping (_clip_grad_norm), so the towers and the head train bit for bit as without it.
            adapter_loss = first_stage_loss(
                unwrapped.first_stage, outputs.image_global_embeds, outputs.text_global_embeds, image_ids
            )
            if torch.isfinite(adapter_loss.detach()):
                self.first_stage_losses.append(float(adapter_loss.detach()))
                loss = loss + (adapter_loss - adapter_loss.detach())

        if not self._loss_is_finite(loss):
            self.nonfinite_loss_steps += 1
            self.consecutive_nonfinite_steps += 1
            logger.warning(
                "Non-finite loss (%s) at step %d: the step is skipped (%d skipped so far).",
                float(loss.detach()),
                self.state.global_step,
                self.nonfinite_loss_steps,
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
            self.state.global_step,
            len(all_ids),
            int(all_ids[0]),
            self.steps_without_negatives,
        )
        if self.steps_without_negatives == self.loss_steps >= NO_NEGATIVE_STEPS_TO_STOP:
            raise ValueError(
                f"None of the first {self.loss_steps} batches had two different images, so the loss and its gradient "
                "were 0 at every step: training would save a model that learnt nothing. Each batch needs pairs of "
                "several images: raise --per_device_train_batch_size, or use more images (--max_train_images)."
            )

    def _watch_collapse(self, scores: torch.Tensor) -> None:
        """
        A model whose scores are all equal across the batch has collapsed: the hinge loss is then exactly
        `2 x batch x margin` (InfoNCE: `log(batch)`) and its gradient carries no ranking signal. Such steps are
        counted (`collapsed_steps` in the logs), and a warning says so after `COLLAPSE_STEPS_TO_WARN` in a row (once
        per episode). The in-batch R@1 logged beside the loss (`batch_r1`) tells a collapse (near chance) from a
        plateau of the hinge at that value while the model still ranks.
        """
        scores = scores.detach().float()
        spread = float(scores.max() - scores.min())
        if spread > COLLAPSE_SPREAD * max(1.0, float(scores.abs().max())):
            self.consecutive_collapsed_steps = 0
            return
        self.collapsed_steps += 1
        self.consecutive_collapsed_steps += 1
        if self.consecutive_collapsed_steps == COLLAPSE_STEPS_TO_WARN:
            logger.warning(
                "Step %d: every score of the batch has been equal (spread %.2g) for %d steps: the model has collapsed "
                "(no ranking signal in the loss). It may recover; if it does not, lower the learning rate, lengthen "
                "--warmup_steps or --vse_mean_warmup_epochs, or resume from an earlier checkpoint.",
                self.state.global_step,
                spread,
                self.consecutive_collapsed_steps,
            )

    def _watch_ranking(self, recall: float, chance: float) -> None:
        """
        A model can collapse without equal scores: they differ, but rank the batch no better than chance, and dev
        recall falls to nothing (the hinge's loss sits near `2 x batch x margin` then too). Once the run has ranked a
        batch above `LEARNED_RANKING_FACTOR` x chance, a mean in-batch R@1 over the last `COLLAPSE_STEPS_TO_WARN`
        steps of at most `CHANCE_RANKING_FACTOR` x chance counts the step (`chance_ranking_steps` in the logs), and
        a warning says so once per episode. The start of a run, at chance before it has learnt, is not a collapse.
        """
        self.recent_rankings.append((recall, chance))
        self.best_ranking = max(self.best_ranking, recall / chance)
        mean_recall = sum(r for r, _ in self.recent_rankings) / len(self.recent_rankings)
        mean_chance = sum(c for _, c in self.recent_rankings) / len(self.recent_rankings)
        if (
            len(self.recent_rankings) < COLLAPSE_STEPS_TO_WARN
            or self.best_ranking < LEARNED_RANKING_FACTOR
            or mean_recall > CHANCE_RANKING_FACTOR * mean_chance
        ):
            self.ranking_collapse_reported = False
            return
        self.chance_ranking_steps += 1
        if not self.ranking_collapse_reported:
            self.ranking_collapse_reported = True
            logger.warning(
                "Step %d: the batches of the last %d steps were ranked no better than chance (in-batch R@1 %.1f%%, "
                "chance %.1f%%) by a model that had ranked up to %.0f times chance: the model has collapsed. It may "
                "recover; if it does not, lower the learning rate, lengthen --warmup_steps or "
                "--vse_mean_warmup_epochs, or resume from an earlier checkpoint.",
                self.state.global_step,
                len(self.recent_rankings),
                100 * mean_recall,
                100 * mean_chance,
                self.best_ranking,
            )

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.args.world_size > 1:  # every process must skip the same steps
            finite = self.accelerator.gather(finite).min()
        return bool(finite)

    def _clip_grad_norm(self, model):
        """Clip by the global norm of every gradient but the first-stage adapter's: its gradients must not scale
        the others' (the adapter trains beside the model without changing it)."""
        adapter = self.accelerator.unwrap_model(model).first_stage
        if adapter is None or is_sagemaker_mp_enabled() or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        excluded = {id(parameter) for parameter in adapter.parameters()}
        parameters = [parameter for parameter in model.parameters() if id(parameter) not in excluded]
        return self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["nonfinite_loss_steps"] = self.nonfinite_loss_steps
            logs["steps_without_negatives"] = self.steps_without_negatives
            logs["collapsed_steps"] = self.collapsed_steps
            logs["chance_ranking_steps"] = self.chance_ranking_steps
            if self.batch_recalls:
                logs["batch_r1"] = round(100 * sum(self.batch_recalls) / len(self.batch_recalls), 2)
                self.batch_recalls = []
            if self.first_stage_losses:
                logs["first_stage_loss"] = round(sum(self.first_stage_losses) / len(self.first_stage_losses), 4)
                self.first_stage_losses = []
        super().log(logs, start_time)

    # -- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        Recall@K of every image against every caption of a split (a `datasets.Dataset` with `image`, `image_id`,
        `captions`). Each image and each caption is encoded once; images are split across processes, every
        process scores its images against all captions.

        Every pair goes through the head (the paper's protocol, reported as `head_only_*`); the first stage's
        scores (`first_stage_*`) and the fused score `head + fusion_weight * first stage` (`fused_*`) come from the
        same pass. With `--rerank_top_k K` the first stage also proposes the top K candidates of every query and
        the configured score (`--ranking`) re-scores those only (`two_stage_*`, with the candidate recall). The
        unprefixed keys (`r1_i2t`, ..., `rsum`) are the configured ranking: `--ranking` at `--rerank_top_k`.
        On the dev split ("eval") the fusion weight is chosen (`choose_fusion_weight`) before the rest is scored.
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
        # under training's autocast (--bf16 / --fp16; accelerate applies it to the prepared model's forward only,
        # and evaluation calls the model's encoders and scorers directly)
        if self.accelerator.mixed_precision != "no":
            logger.info("Evaluating under %s autocast, as in training.", self.accelerator.mixed_precision)
        with self.accelerator.autocast():
            result = self.retrieval_scores(split, choose_fusion_weight=metric_key_prefix == "eval")
        rankings, caption_to_image = result.pop("rankings"), result.pop("caption_to_image")
        compute_metrics = self.compute_metrics or compute_retrieval_metrics
        metrics = {}
        for name, (image_to_text, text_to_image) in rankings.items():
            predictions = (
                image_to_text.numpy() if text_to_image is None else (image_to_text.numpy(), text_to_image.numpy())
            )
            ranking_metrics = compute_metrics(
                EvalPrediction(predictions=predictions, label_ids=caption_to_image.numpy())
            )
            metrics.update({f"{name}_{key}": value for key, value in ranking_metrics.items()})
        headline = self.headline_ranking()
        image_to_text, text_to_image = rankings[headline]
        metrics.update(
            {key[len(headline) + 1 :]: value for key, value in metrics.items() if key.startswith(headline + "_")}
        )
        unwrapped = self.accelerator.unwrap_model(self.model)
        metrics["loss"] = retrieval_eval_loss(  # the training objective's, on the head's scores
            rankings["head_only"][0], caption_to_image, unwrapped.config.margin, logit_scale=unwrapped.logit_scale
        )
        if metric_key_prefix in self.extra_metrics:
            metrics.update(self.extra_metrics[metric_key_prefix](image_to_text, text_to_image, caption_to_image, split))
        metrics.update(result)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=rankings["head_only"][0].shape[0]))
        self.retrieval_results[metric_key_prefix] = metrics
        self.log(dict(metrics))  # log() adds the epoch to the dict it gets
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def headline_ranking(self) -> str:
        """Which ranking the unprefixed metrics report: `--ranking` (head or fused), two-stage with `--rerank_top_k`."""
        if self.args.rerank_top_k:
            return "two_stage"
        return "fused" if self.args.ranking == "fused" else "head_only"

    @torch.no_grad()
    def retrieval_scores(self, split, choose_fusion_weight: bool = False) -> dict:
        """
        Scores of a split, on every process: `{"rankings": {name: (image_to_text, text_to_image or None)},
        "caption_to_image": ..., "fusion_weight": ..., "head_pairs": ..., "scoring_runtime": ..., and with
        --rerank_top_k the two-stage statistics}`, with `(n_img, n_cap)` ranking matrices (one for both
        directions when exhaustive) and `(n_cap,)` caption -> image row. `choose_fusion_weight`: choose the fusion
        weight on these scores first (the dev split), when the Trainer was asked to.
        """
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            return self._score_split(model, split, choose_fusion_weight and self.choose_fusion_weight)
        finally:
            model.train(was_training)  # also when scoring fails: the caller's model keeps its mode

    @property
    def _show_progress(self) -> bool:
        return self.is_local_process_zero() and not self.args.disable_tqdm

    @property
    def _eval_chunks(self) -> tuple[int | None, int | None]:
        """(images, captions) per block of the head's scoring: `--eval_image_chunk_size`, `--eval_text_chunk_size`."""
        return self.args.eval_image_chunk_size, self.args.eval_text_chunk_size

    def _score_split(self, model, split, choose_fusion_weight: bool) -> dict:
        device = self.args.device
        processor = self.processing_class
        show, chunks = self._show_progress, self._eval_chunks

        images = RetrievalEvalImages(split, processor.image_processor)
        captions = RetrievalEvalCaptions(split, processor.tokenizer, max_length=self.eval_max_caption_tokens)
        rank, world_size = self.args.process_index, self.args.world_size
        shards = [range(*shard_bounds(len(images), r, world_size)) for r in range(world_size)]
        batch_size = self.args.per_device_eval_batch_size
        image_tokens, image_global = encode_image_corpus(
            model, Subset(images, shards[rank]), batch_size, device, self.args.dataloader_num_workers, show
        )  # this process's images: (n_local, T_img, C), (n_local, C)
        caption_keys, caption_global = encode_caption_corpus(
            model, captions, batch_size, device, processor.tokenizer.pad_token_id, show
        )  # every caption
        top_k = self.args.rerank_top_k
        if top_k and not model.head.reranks:
            raise ValueError(
                f"--rerank_top_k {top_k} re-scores candidates with the key-token head, but this model scores pairs by "
                "its global embeddings alone (scoring_head='global'): evaluate it with --rerank_top_k 0."
            )

        # Every pair through the head (the paper's protocol), and the first stage's scores of every pair.
        start = time.perf_counter()
        local_scores = model.score(image_tokens, caption_keys, *chunks, progress=show).float().cpu()
        head = self._gather_rows(local_scores, [len(shard) for shard in shards])
        result = {"head_pairs": len(images) * len(captions), "scoring_runtime": round(time.perf_counter() - start, 4)}
        all_image_global = torch.cat(self._gather_parts(image_global, [len(shard) for shard in shards]))
        first_stage = model.first_stage_similarity(all_image_global, caption_global).float().cpu()  # (n_img, n_cap)
        if choose_fusion_weight:
            model.config.fusion_weight = choose_fusion_weight_on(head, first_stage, captions.caption_to_image)
            logger.info("Fusion weight chosen on this split: %s", model.config.fusion_weight)
        fusion_weight = model.config.fusion_weight or 0.0
        result["fusion_weight"] = fusion_weight
        rankings = {
            "head_only": (head, None),
            "first_stage": (first_stage, None),
            "fused": (head + fusion_weight * first_stage, None),
        }
        if top_k:
            ranked_weight = fusion_weight if self.args.ranking == "fused" else 0.0
            image_to_text, text_to_image, stats = self._two_stage(
                model, image_tokens, caption_keys, first_stage, captions.caption_to_image, shards, ranked_weight
            )
            rankings["two_stage"] = (image_to_text, text_to_image)
            result.update({f"two_stage_{name}": value for name, value in stats.items()})
        return {"rankings": rankings, "caption_to_image": captions.caption_to_image, **result}

    def _two_stage(self, model, image_tokens, caption_keys, first_stage, caption_to_image, shards, fusion_weight):
        """The first stage proposes `--rerank_top_k` candidates per query; the head (+ `fusion_weight` x the first
        stage) scores them. Returns both rankings and the statistics."""
        shard, world_size, device = shards[self.args.process_index], self.args.world_size, self.args.device

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

        score_exact = on_this_process(
            lambda i, c: model.score_candidates(
                image_tokens,
                caption_keys,
                i,
                c,
                *self._eval_chunks,
                progress=self._show_progress,
                fusion_weight=fusion_weight,
            )
        )
        start = time.perf_counter()
        image_to_text, text_to_image, stats = two_stage_rank(
            first_stage.clone(),
            caption_to_image,
            self.args.rerank_top_k,
            score_exact,
            non_candidate_offset=NON_CANDIDATE_OFFSET + fusion_weight,
        )
        stats["scoring_runtime"] = round(time.perf_counter() - start, 4)
        return image_to_text, text_to_image, stats

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
        load_checkpoint_weights(
            self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint
        )

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info(
            "Loading the best model (%s = %s) from %s",
            self.args.metric_for_best_model,
            self.state.best_metric,
            self.state.best_model_checkpoint,
        )
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    # -- model card --------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        dataset_name: str | None = None,
        dataset_id: str | None = None,
        base_models: list[str] | None = None,
        **kwargs,
    ) -> None:
        """The Trainer's card (metadata, training log) with SCTA's Hub metadata, results table, settings and usage
        (`scta_train.model_card`)."""
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        write_model_card(
            Path(self.args.output_dir) / "README.md",
            self.accelerator.unwrap_model(self.model).config,
            self.retrieval_results,
            model_name=kwargs.get("model_name") or Path(self.args.output_dir).name,
            dataset_name=dataset_name or "retrieval dataset",
            dataset_id=dataset_id,
            base_models=base_models,
        )


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
    return any(
        os.path.isfile(os.path.join(folder, name)) for name in ("model.safetensors", "model.safetensors.index.json")
    )


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
