"""The `Trainer` of SCTA: optimiser and schedule, the loss over the global batch, retrieval evaluation, checkpoints."""

import bisect
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

from modeling_scta import SCTALoss, SCTAModel, cosine_similarity_matrix
from processing_scta import EVAL_MAX_CAPTION_TOKENS
from scta_train.distributed import shard_bounds
from scta_train.metrics import compute_retrieval_metrics, retrieval_eval_loss
from scta_train.model_card import write_model_card
from scta_train.processing import RetrievalEvalCaptions, RetrievalEvalImages
from scta_train.retrieval import encode_caption_corpus, encode_image_corpus, two_stage_rank


logger = logging.getLogger(__name__)


# Training stops when this many steps in a row from the start had no negative pair (see _count_steps_without_negatives).
NO_NEGATIVE_STEPS_TO_STOP = 10


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
        **kwargs,
    ):
        """`extra_metrics`: `{metric_key_prefix: fn(image_to_text, text_to_image or None, caption_to_image, split)
        -> dict}`, more metrics for the evaluations of that prefix (e.g. the extended COCO metrics on "test")."""
        super().__init__(*args, **kwargs)
        self.eval_max_caption_tokens = eval_max_caption_tokens
        self.extra_metrics = extra_metrics or {}
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
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():  # the other processes' blocks are scored outside the prepared forward
            loss = SCTALoss(unwrapped.config)(
                unwrapped, outputs, inputs["attention_mask"], image_ids, hardest_negative, self.args.world_size
            )
        if self.args.embedding_warmup_epochs is not None and int(epoch) == self.args.embedding_warmup_epochs:
            loss = loss * (epoch - int(epoch))  # step_in_epoch / steps_per_epoch

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

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.args.world_size > 1:  # every process must skip the same steps
            finite = self.accelerator.gather(finite).min()
        return bool(finite)

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
        # under training's autocast (--bf16 / --fp16; accelerate applies it to the prepared model's forward only,
        # and evaluation calls the model's encoders and scorers directly)
        if self.accelerator.mixed_precision != "no":
            logger.info("Evaluating under %s autocast, as in training.", self.accelerator.mixed_precision)
        with self.accelerator.autocast():
            result = self.retrieval_scores(split)
        image_to_text, text_to_image, caption_to_image = result.pop("scores")
        predictions = image_to_text.numpy() if text_to_image is None else (image_to_text.numpy(), text_to_image.numpy())
        compute_metrics = self.compute_metrics or compute_retrieval_metrics
        metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=caption_to_image.numpy()))
        margin = self.accelerator.unwrap_model(self.model).config.margin
        metrics["loss"] = retrieval_eval_loss(image_to_text, caption_to_image, margin, text_to_image)
        if metric_key_prefix in self.extra_metrics:
            metrics.update(self.extra_metrics[metric_key_prefix](image_to_text, text_to_image, caption_to_image, split))
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
        try:
            return self._score_split(model, split)
        finally:
            model.train(was_training)  # also when scoring fails: the caller's model keeps its mode

    def _score_split(self, model, split) -> dict:
        device = self.args.device
        processor = self.processing_class
        show = self.is_local_process_zero() and not self.args.disable_tqdm
        chunks = (self.args.eval_image_chunk_size, self.args.eval_text_chunk_size)

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

        start = time.perf_counter()
        num_images, num_captions = len(images), len(captions)
        top_k = self.args.rerank_top_k
        if top_k and not model.head.reranks:
            raise ValueError(
                f"--rerank_top_k {top_k} re-scores candidates with the key-token head, but this model scores pairs by "
                "its global embeddings alone (scoring_head='global'): evaluate it with --rerank_top_k 0."
            )
        if top_k == 0:  # exhaustive: every pair through the head
            local_scores = model.score(image_tokens, caption_keys, *chunks, progress=show).float().cpu()
            image_to_text = self._gather_rows(local_scores, [len(shard) for shard in shards])
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
            score_middle = on_this_process(
                lambda i, c: model.caption_independent_scores(image_keys, caption_keys, i, c)
            )
        score_exact = on_this_process(
            lambda i, c: model.score_candidates(image_tokens, caption_keys, i, c, *chunks, progress=show)
        )
        image_to_text, text_to_image, stats = two_stage_rank(
            global_scores, captions.caption_to_image, top_k, score_exact, self.args.middle_stage_top_n, score_middle
        )
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
