"""
Fit the first-stage adapter of a trained SCTA model after the fact, and choose its fusion weight on dev:

    python -m scta_train.fit_first_stage --model_name_or_path outputs/demo_synthetic \
        --dataset_name synthetic_shapes --synthetic_train_images 16000 --output_dir outputs/demo_synthetic_fs

The towers and the head are frozen and left bit for bit as they were: every training image and caption is encoded
once, then the adapter (`--first_stage_adapter linear|mlp`) learns on those global embeddings with symmetric InfoNCE
(`scta_train.loss.first_stage_loss`, the loss it trains with beside the head in `run_retrieval.py`). The dev split
chooses the fusion weight (unless `--fusion_weight` is given); dev and test (when the dataset has one) are then
evaluated as `run_retrieval.py` does (head-only, first-stage and fused metrics, two-stage with `--rerank_top_k`),
and the model with its adapter is saved to `--output_dir` with its processor. Takes the arguments of
`run_retrieval.py` (data, evaluation, `--first_stage_epochs`, `--first_stage_batch_size`,
`--first_stage_learning_rate`). `run_retrieval.py` runs the same fit at the end of training (`refit_first_stage`).
"""

import logging
import math

import torch
import transformers
from transformers import HfArgumentParser
from transformers.trainer_utils import IntervalStrategy

from scta_train.arguments import DataArguments, ModelArguments, SCTATrainingArguments
from scta_train.checks import check_first_stage_fit, require_splits, setup_logging
from scta_train.data import load_retrieval_dataset
from scta_train.loss import first_stage_loss
from scta_train.models import build_model, build_processor
from scta_train.processing import RetrievalCollator, RetrievalEvalCaptions, RetrievalEvalImages
from scta_train.results import format_results
from scta_train.retrieval import encode_caption_corpus, encode_image_corpus
from scta_train.trainer import SCTATrainer


logger = logging.getLogger("scta_train.fit_first_stage")  # not "__main__" under python -m


@torch.no_grad()
def encode_training_pairs(model, split, processor, batch_size: int, device, show: bool):
    """Global embeddings of every training image and caption, each encoded once (eval preprocessing, no augmentation):
    `(n_img, C)`, `(n_cap, C)` and the `(n_cap,)` image row of every caption."""
    images = RetrievalEvalImages(split, processor.image_processor)
    captions = RetrievalEvalCaptions(split, processor.tokenizer)
    _, image_global = encode_image_corpus(model, images, batch_size, device, show=show, keep_tokens=False)
    _, caption_global = encode_caption_corpus(
        model, captions, batch_size, device, processor.tokenizer.pad_token_id, show, keep_key_tokens=False
    )
    return image_global.float(), caption_global.float(), captions.caption_to_image


def fit_adapter(model, image_global, caption_global, caption_to_image, epochs, batch_size, learning_rate, seed):
    """Train `model.first_stage` alone on fixed embeddings: shuffled (caption, its image) pairs, AdamW, InfoNCE."""
    adapter = model.first_stage
    adapter.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(caption_to_image) / batch_size)
    device = image_global.device
    for epoch in range(epochs):
        order = torch.randperm(len(caption_to_image), generator=generator)
        total = 0.0
        for step in range(steps):
            pairs = order[step * batch_size : (step + 1) * batch_size]
            if len(pairs) < 2:
                continue
            rows = caption_to_image[pairs].to(device)
            loss = first_stage_loss(adapter, image_global[rows], caption_global[pairs.to(device)], rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        logger.info("First stage, epoch %d/%d: InfoNCE %.4f", epoch + 1, epochs, total / steps)
    adapter.eval()


def refit_first_stage(model, train_split, processor, training_args, skip_on_bad_image: bool = False) -> None:
    """Fit `model.first_stage` on the final, frozen global embeddings of `train_split` (`--first_stage_epochs` passes),
    on the main process; the other processes receive its weights. The towers and the head are not touched. The fit
    needs every training image: with `skip_on_bad_image` (training skipped undecodable ones), an undecodable image
    keeps the adapter as trained beside the model, with a warning."""
    if model.first_stage is None or training_args.first_stage_epochs == 0:
        return
    if training_args.process_index == 0:
        was_training = model.training
        model.eval()
        try:
            logger.info(
                "Fitting the first-stage adapter on the frozen embeddings of %d training images", len(train_split)
            )
            try:
                embeddings = encode_training_pairs(
                    model,
                    train_split,
                    processor,
                    training_args.per_device_eval_batch_size,
                    model.device,
                    show=not training_args.disable_tqdm,
                )
            except ValueError as error:
                if not skip_on_bad_image:
                    raise
                logger.warning("The first-stage adapter keeps its training-time weights: %s", error)
                embeddings = None
            if embeddings is not None:
                with torch.enable_grad():
                    fit_adapter(
                        model,
                        *embeddings,
                        training_args.first_stage_epochs,
                        training_args.first_stage_batch_size,
                        training_args.first_stage_learning_rate,
                        training_args.seed,
                    )
        finally:
            model.train(was_training)
    if training_args.world_size > 1:
        for parameter in model.first_stage.parameters():
            torch.distributed.broadcast(parameter.data, src=0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, SCTATrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    setup_logging(training_args)
    training_args.do_train = False
    training_args.eval_strategy = training_args.save_strategy = IntervalStrategy.NO  # evaluated below, by hand
    training_args.load_best_model_at_end = False
    kind = check_first_stage_fit(model_args, training_args)
    transformers.set_seed(training_args.seed)
    model_args.first_stage_adapter = None  # the saved model's weights load as they are; the adapter is replaced below

    dataset = load_retrieval_dataset(data_args, training_args)
    require_splits(dataset, (data_args.train_split, data_args.eval_split), "fit_first_stage")
    processor = build_processor(model_args, dataset, data_args.train_split)
    model = build_model(model_args, processor).to(training_args.device).eval()
    model.requires_grad_(False)
    model.set_first_stage_adapter(kind)  # a fresh identity map: before fitting, it ranks as the plain cosine
    if model_args.fusion_weight is not None:
        model.config.fusion_weight = model_args.fusion_weight
    refit_first_stage(model, dataset[data_args.train_split], processor, training_args)

    trainer = SCTATrainer(
        model=model,
        args=training_args,
        data_collator=RetrievalCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        choose_fusion_weight=model_args.fusion_weight is None,
    )
    results = {}
    splits = [("eval", data_args.eval_split)]
    if data_args.test_split in dataset:
        splits.append(("test", data_args.test_split))
    for prefix, name in splits:  # dev first: it chooses the fusion weight the test split is ranked with
        metrics = trainer.evaluate(dataset[name], metric_key_prefix=prefix)
        trainer.save_metrics(prefix, metrics)
        logger.info("Retrieval on %s:\n%s", prefix, format_results(metrics, prefix))
        results.update(metrics)
    trainer.save_model()  # with the processor; the weights of the towers and head are the loaded ones
    logger.info(
        "Saved the model with its first-stage adapter (fusion weight %s) to %s",
        model.config.fusion_weight,
        training_args.output_dir,
    )
    return results


if __name__ == "__main__":
    main()
