"""
The start of a run, for `run_retrieval.py` and `python -m scta_train.fit_first_stage` alike: logging, and every
check made before any work (launcher, resuming, output folder, batch, shape overrides of a trained model, the
splits a run needs). The one home of run-level checks: a value that is wrong on its own is refused where it is
parsed, by the argument dataclasses (`scta_train.arguments`) and, for the head's settings, by
`SCTAConfig.check_settings`; what depends on several arguments, on the file system or on the data is checked here.
"""

import logging
import os
import sys

import datasets
import transformers
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from configuration_scta import SHAPE_SETTINGS
from scta_train.coco_extended import coco_5k_caption_ids, load_eccv_metrics
from scta_train.data import caption_rows
from scta_train.models import load_scta_config
from scta_train.trainer import is_complete_checkpoint, last_complete_checkpoint


logger = logging.getLogger(__name__)


def setup_logging(training_args: TrainingArguments) -> None:
    """The training package at INFO on the main process (run_clip.py's setup), transformers and datasets at
    `--log_level`; with `--disable_tqdm` (the default off a terminal) no progress bar of theirs either."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logging.getLogger("scta_train").setLevel(logging.INFO if training_args.should_log else log_level)
    if training_args.log_level != "passive":
        transformers.utils.logging.set_verbosity(log_level)
        datasets.utils.logging.set_verbosity(log_level)
    if training_args.disable_tqdm:  # also the bars of datasets and of transformers' weight loading and saving
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def check_run(model_args, training_args: TrainingArguments) -> str | None:
    """Every check of `run_retrieval.py` that needs no data, in order; returns the checkpoint to resume from."""
    check_launch(training_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, resume)
    check_training_batch(training_args)
    check_shape_overrides(model_args)
    return resume


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint`: `last` / `true` is the newest complete checkpoint, never one cut off mid-write;
    a folder given by name must be a complete checkpoint."""
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).lower() in ("true", "last"):
        resume = last_complete_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no complete "
                f"checkpoint in {training_args.output_dir}."
            )
    elif resume is not None and not is_complete_checkpoint(resume):
        raise ValueError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint folder (no readable trainer_state.json "
            "or model weights); pass --resume_from_checkpoint last to take the newest complete one."
        )
    return resume


def check_training_batch(training_args: TrainingArguments) -> None:
    global_batch = training_args.per_device_train_batch_size * training_args.world_size
    if training_args.do_train and global_batch < 2:
        raise ValueError(
            f"The global training batch is {global_batch} pair (--per_device_train_batch_size "
            f"{training_args.per_device_train_batch_size} x {training_args.world_size} processes): the loss "
            "compares a pair with the other pairs of its batch, so it would be 0 at every step. Use at least 2."
        )


def check_shape_overrides(model_args) -> None:
    """A head setting given beside a trained model must not change the shape of its weights."""
    if model_args.model_name_or_path is None:
        return
    changed = [name for name in SHAPE_SETTINGS if getattr(model_args, name) is not None]
    saved = load_scta_config(model_args.model_name_or_path, model_args.model_revision)
    changed = [name for name in changed if getattr(model_args, name) != getattr(saved, name)]
    if changed:
        raise ValueError(
            "--" + ", --".join(f"{name} {getattr(model_args, name)}" for name in changed) + " would change the "
            f"shape of weights of the trained model {model_args.model_name_or_path} (which has "
            + ", ".join(f"{name}={getattr(saved, name)}" for name in changed)
            + "). Drop the override, or start "
            "from pretrained towers (--vision_model_name_or_path / --text_model_name_or_path) to train another head."
        )


def check_first_stage_fit(model_args, training_args: TrainingArguments) -> str:
    """The arguments of `python -m scta_train.fit_first_stage`; returns the adapter kind to fit (default linear)."""
    if model_args.model_name_or_path is None:
        raise ValueError("fit_first_stage needs --model_name_or_path: the trained SCTA model whose first stage to fit.")
    if training_args.first_stage_epochs < 1:
        raise ValueError(f"--first_stage_epochs must be >= 1 to fit anything, got {training_args.first_stage_epochs}.")
    kind = model_args.first_stage_adapter or "linear"
    if kind == "none":
        raise ValueError("--first_stage_adapter none fits nothing: use linear or mlp.")
    check_output_dir(training_args, None)
    return kind


def require_splits(dataset: datasets.DatasetDict, names, purpose: str = "this run") -> None:
    """Each split of `names` exists and has rows."""
    for name in names:
        if name not in dataset:
            raise ValueError(f"The dataset has no {name!r} split (it has {list(dataset)}), which {purpose} needs.")
        if len(dataset[name]) == 0:
            raise ValueError(f"The dataset's {name!r} split has no rows.")


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
    require_splits(dataset, [name for name, is_needed in needed.items() if is_needed])
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
