"""
The steps of `run_retrieval.py`, in run_clip.py's order: logging, resuming, data, processor and model, Trainer,
training, evaluation, model card and Hub. `run_retrieval.py` parses the arguments and calls `run`; tests call `run`
too, so that they never import the script.
"""

import json
import logging
from pathlib import Path

import torch.distributed as dist
import transformers
from accelerate import PartialState
from transformers.trainer_utils import IntervalStrategy

from scta_train.arguments import SYNTHETIC_DATASET_NAME
from scta_train.checks import check_run, check_splits, setup_logging
from scta_train.coco_extended import coco_metrics_hook
from scta_train.data import load_retrieval_dataset
from scta_train.fit_first_stage import refit_first_stage
from scta_train.metrics import compute_retrieval_metrics
from scta_train.models import build_model, build_processor
from scta_train.processing import CaptionAugmenter, ImageTrainTransform, RetrievalCollator, RetrievalTrainDataset
from scta_train.results import format_results
from scta_train.trainer import SCTATrainer


logger = logging.getLogger(__name__)


def run(model_args, data_args, training_args) -> dict[str, float]:
    """Train and/or evaluate as the arguments say; returns the train, eval and test metrics."""
    # 1. Logging, then every check that needs no data (launcher, resuming, output folder, batch, overrides).
    setup_logging(training_args)
    logger.info(
        "Process %d of %d, device %s", training_args.process_index, training_args.world_size, training_args.device
    )
    resume = check_run(model_args, training_args)
    if resume is not None:
        logger.info("Resuming from %s", resume)
    transformers.set_seed(training_args.seed)
    if not training_args.do_train:
        # Evaluation strategy and checkpoint selection concern training only (the Trainer would ask for a dev split).
        training_args.eval_strategy = training_args.save_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False

    # 2. Data, processor, model.
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
    if (
        not training_args.do_train
        and training_args.do_eval
        and training_args.do_predict
        and eval_split_name not in dataset
    ):
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
            eval_max_caption_tokens,
            data_args.max_eval_caption_tokens,
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
        extra_metrics={"test": coco_metrics_hook(data_args.eccv_pm_dir)} if data_args.coco_extended_metrics else None,
        # the fusion weight is chosen on dev unless given; a trained model's stored weight is kept when evaluating
        choose_fusion_weight=model_args.fusion_weight is None
        and (training_args.do_train or model.config.fusion_weight is None),
    )

    # 3. Train. Results carry the seed the model was trained with and the setting (data and head) they belong to,
    # so that aggregating runs of several seeds never mixes settings.
    seed = {"seed": training_args.seed} if training_args.do_train else training_seed(model_args.model_name_or_path)
    setting = {"setting": run_setting(data_args, model.config)}  # saved with the results, not logged
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        # the adapter trained beside a moving model: fitted again on the final embeddings (the model is untouched)
        refit_first_stage(
            trainer.accelerator.unwrap_model(trainer.model),
            dataset[data_args.train_split],
            processor,
            training_args,
            skip_on_bad_image=data_args.on_bad_image == "skip",
        )
        trainer.save_model()  # the best checkpoint when load_best_model_at_end, with the processor
        train_metrics = dict(
            train_result.metrics,
            nonfinite_loss_steps=trainer.nonfinite_loss_steps,
            steps_without_negatives=trainer.steps_without_negatives,
            collapsed_steps=trainer.collapsed_steps,
            chance_ranking_steps=trainer.chance_ranking_steps,
            **seed,
        )
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", {**train_metrics, **setting})
        trainer.save_state()
        results.update(train_metrics, **setting)

    # 4. Evaluate on the selection split and, once, on the test split.
    splits = []
    if training_args.do_eval:
        splits.append(("eval", eval_dataset))
    if training_args.do_predict and not (data_args.select_on_test and training_args.do_eval):
        splits.append(("test", dataset[data_args.test_split]))
    for prefix, split in splits:
        metrics = {**trainer.evaluate(split, metric_key_prefix=prefix), **seed}
        trainer.save_metrics(prefix, {**metrics, **setting})
        logger.info(
            "Retrieval on %s (%d images, %d captions):\n%s",
            prefix,
            len(split),
            sum(len(c) for c in split["captions"]),
            format_results(metrics, prefix),
        )
        results.update(metrics, **setting)
        if (
            prefix == "eval"
            and training_args.do_train
            and trainer.choose_fusion_weight
            and trainer.is_world_process_zero()
        ):
            # the weight chosen on this final dev evaluation is the saved model's
            model.config.save_pretrained(training_args.output_dir)

    # 5. Model card (with the results above) and Hub.
    if training_args.do_train:
        trainer.create_model_card(
            model_name=Path(training_args.output_dir).name,
            tags=["scta", "image-text-retrieval"],
            dataset_name=data_args.dataset_name or Path(data_args.dataset_dir or data_args.train_file or "data").name,
            dataset_id=hub_dataset_id(data_args.dataset_name),
            base_models=[
                name
                for name in (model_args.vision_model_name_or_path, model_args.text_model_name_or_path)
                if name and not Path(name).exists()
            ],  # Hub ids only, not local folders
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="SCTA: end of training", tags=["scta", "image-text-retrieval"])
    return results


def run_setting(data_args, config) -> dict:
    """What identifies a run's setting for aggregation: the data it was evaluated on and the model's head settings."""
    from configuration_scta import HEAD_SETTINGS

    if data_args.dataset_name == SYNTHETIC_DATASET_NAME or not (
        data_args.dataset_name or data_args.dataset_dir or data_args.train_file or data_args.test_file
    ):
        data = {
            "dataset": SYNTHETIC_DATASET_NAME,
            **{
                name: getattr(data_args, name)
                for name in (
                    "synthetic_train_images",
                    "synthetic_dev_images",
                    "synthetic_test_images",
                    "synthetic_image_size",
                    "synthetic_seed",
                    "synthetic_caption_redundancy",
                    "synthetic_object_scale",
                )
            },
        }
    else:
        source = data_args.dataset_name or data_args.dataset_dir or data_args.test_file or data_args.train_file
        data = {
            "dataset": str(Path(source).resolve()) if Path(source).exists() else source,
            "config": data_args.dataset_config_name,
        }
    # the fusion weight is chosen at evaluation, after training: not part of what was trained
    return {"data": data, "head": {name: getattr(config, name) for name in HEAD_SETTINGS if name != "fusion_weight"}}


def hub_dataset_id(dataset_name: str | None) -> str | None:
    """A Hub dataset id for the card's `datasets` metadata: not the synthetic set, not a local path."""
    if dataset_name is None or dataset_name == SYNTHETIC_DATASET_NAME or Path(dataset_name).exists():
        return None
    return dataset_name


def training_seed(model_name_or_path: str | None) -> dict:
    """`{"seed": s}` of the run that trained a local model folder (its train_results.json), or `{}` when unknown."""
    path = Path(model_name_or_path or "") / "train_results.json"
    if model_name_or_path is None or not path.is_file():
        return {}
    seed = json.loads(path.read_text(encoding="utf-8")).get("seed")
    return {} if seed is None else {"seed": seed}


def leave_process_group() -> None:
    """
    Leave the process group together, at the end of a multi-process run. A process that exits while another still
    holds a connection to it can make gloo abort the other ("Connection closed by peer", SIGABRT).
    """
    if dist.is_available() and dist.is_initialized():
        state = PartialState()  # the Trainer's; its barrier names each process's device, as NCCL wants
        state.wait_for_everyone()
        state.destroy_process_group()
