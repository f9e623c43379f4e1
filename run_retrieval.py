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

The arguments are the dataclasses of `scta_train.arguments` (`python run_retrieval.py --help` lists them all);
the steps, in run_clip.py's order, are `scta_train.pipeline.run`; the Trainer is `scta_train.trainer`.
"""

from scta_train.arguments import DataArguments, ModelArguments, SCTATrainingArguments, parse_arguments
from scta_train.pipeline import leave_process_group, run


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the arguments (`ModelArguments`, `DataArguments`, `SCTATrainingArguments`, from the command line or
    one JSON file), then train and/or evaluate; returns the metrics."""
    model_args, data_args, training_args = parse_arguments(argv)
    return run(model_args, data_args, training_args)


__all__ = ["DataArguments", "ModelArguments", "SCTATrainingArguments", "main"]


if __name__ == "__main__":
    main()
    leave_process_group()
