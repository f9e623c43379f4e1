"""The processor and model of a run: from a saved SCTA model, pretrained towers, or tower configs."""

import logging

import datasets
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from configuration_scta import SCTAConfig
from modeling_scta import SCTAModel, load_pretrained_tower, tower_from_config
from processing_scta import SCTAProcessor
from scta_train.arguments import ModelArguments
from scta_train.processing import train_wordpiece_tokenizer


logger = logging.getLogger(__name__)


def tower_config_from_spec(spec: dict, side: str):
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
    if model_args.vision_model_name_or_path is not None:
        name = model_args.vision_model_name_or_path
        try:  # the pretrained tower's own preprocessing (CLIP's resize, crop, mean and std)
            return SCTAProcessor(AutoImageProcessor.from_pretrained(name, **revision), tokenizer)
        except OSError:  # a tower folder without preprocessor_config.json: the paper's ViT-style preprocessing
            config = AutoConfig.from_pretrained(name, **revision)
            image_size = getattr(config, "vision_config", config).image_size
            logger.info("%s has no image processor: resizing to %d px with ImageNet mean and std", name, image_size)
    elif model_args.model_name_or_path is not None:
        image_size = load_scta_config(model_args.model_name_or_path, model_args.model_revision).vision_config.image_size
    else:
        image_size = tower_config_from_spec(model_args.vision_config, "vision").image_size
    return SCTAProcessor.from_tokenizer(tokenizer, image_size=image_size)


def build_model(model_args: ModelArguments, processor: SCTAProcessor) -> SCTAModel:
    revision = {"revision": model_args.model_revision} if model_args.model_revision else {}
    head_settings = model_args.head_settings()
    if model_args.model_name_or_path is not None:
        load_scta_config(model_args.model_name_or_path, model_args.model_revision)
        return SCTAModel.from_pretrained(model_args.model_name_or_path, **head_settings, **revision)
    if model_args.vision_model_name_or_path is not None and model_args.text_model_name_or_path is not None:
        return SCTAModel.from_vision_text_pretrained(
            model_args.vision_model_name_or_path,
            model_args.text_model_name_or_path,
            **{f"vision_{k}": v for k, v in revision.items()},
            **{f"text_{k}": v for k, v in revision.items()},
            **head_settings,
        )
    # at least one tower from scratch
    towers = {}
    for side in ("vision", "text"):
        name = getattr(model_args, f"{side}_model_name_or_path")
        if name is not None:
            towers[side] = load_pretrained_tower(name, side, **revision)
        else:
            spec = getattr(model_args, f"{side}_config")
            if side == "text":
                spec = {**spec, "vocab_size": len(processor.tokenizer)}
            towers[side] = tower_from_config(tower_config_from_spec(spec, side))
    config = SCTAConfig.from_vision_text_configs(towers["vision"].config, towers["text"].config, **head_settings)
    return SCTAModel(config, vision_model=towers["vision"], text_model=towers["text"])
