"""Checks run before any work starts: output folder, splits, launcher."""

import logging
import os

import datasets
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from scta_train.coco_extended import coco_5k_caption_ids, load_eccv_metrics
from scta_train.data import caption_rows


logger = logging.getLogger(__name__)


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
        name
        for name in entries
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        or name in ("model.safetensors", "model.safetensors.index.json", "trainer_state.json")
    ]
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
    if data_args.coco_extended_metrics:
        if not training_args.do_predict:
            raise ValueError("--coco_extended_metrics is computed on the test split: add --do_predict.")
        test = dataset[data_args.test_split]
        coco_5k_caption_ids(test["image_id"], caption_rows(test["captions"]), load_eccv_metrics(data_args.eccv_pm_dir))


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
