"""The command-line and JSON arguments of `run_retrieval.py`: model, data and training arguments."""

import dataclasses
import difflib
import enum
import json
import logging
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from configuration_scta import HEAD_SETTINGS, SCTAConfig, config_field_doc
from dataset_scripts.synthetic_shapes import CAPTION_REDUNDANCY
from processing_scta import EVAL_MAX_CAPTION_TOKENS


logger = logging.getLogger(__name__)


SYNTHETIC_DATASET_NAME = "synthetic_shapes"
# What the headline evaluation metrics rank by (SCTATrainingArguments.ranking).
RANKINGS = ("fused", "head")


def _head_setting_fields() -> list[tuple]:
    """One optional argument per head setting of `SCTAConfig` (its name, its type, its docstring as help); None keeps
    the config's value. Derived, so that a new config field is an argument without being written here."""
    fields = []
    for name in HEAD_SETTINGS:
        annotation = SCTAConfig.__annotations__[name]
        kinds = [kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)]
        kind = float if float in kinds else kinds[0]  # `float | int` fields are floats on the command line
        help_text = f"Head setting (None: the config's value). {config_field_doc(name)}"
        fields.append((name, kind | None, field(default=None, metadata={"help": help_text})))
    return fields


HeadSettingArguments = dataclasses.make_dataclass("HeadSettingArguments", _head_setting_fields())


@dataclass
class ModelArguments(HeadSettingArguments):
    """Which model to train or evaluate: `model_name_or_path`, or one source per tower (a pretrained name or a
    config from scratch, e.g. a from-scratch image tower with a pretrained text tower); and head settings (one
    argument per `SCTAConfig` head field, see `HEAD_SETTINGS`)."""

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
        metadata={
            "help": "From scratch: image tower config as a dict (in a JSON file) or a JSON string, with model_type."
        },
    )
    text_config: str | None = field(
        default=None,
        metadata={
            "help": "From scratch: text tower config as a dict or JSON string; vocab_size comes from the tokenizer."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use instead of the text tower's or the model folder's."}
    )
    vocab_size: int = field(
        default=8192, metadata={"help": "From scratch without a tokenizer: WordPiece vocabulary size to build."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to pin."})

    def __post_init__(self):
        tower_sources = [
            self.vision_model_name_or_path,
            self.vision_config,
            self.text_model_name_or_path,
            self.text_config,
        ]
        if self.model_name_or_path is not None and any(source is not None for source in tower_sources):
            raise ValueError(
                "Give exactly one model source: --model_name_or_path (an SCTA model) brings both towers; do not "
                "also give --vision_* / --text_* tower sources."
            )
        if self.model_name_or_path is None:
            for side in ("vision", "text"):
                given = [
                    f"--{side}_{kind}"
                    for kind in ("model_name_or_path", "config")
                    if getattr(self, f"{side}_{kind}") is not None
                ]
                if len(given) != 1:
                    raise ValueError(
                        f"Give exactly one model source: --model_name_or_path (an SCTA model), or for each tower "
                        f"either a pretrained name or a config from scratch; the {side} tower has "
                        f"{' and '.join(given) if given else 'neither'} (--{side}_model_name_or_path or "
                        f"--{side}_config)."
                    )
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
        default=None,
        metadata={
            "help": f"'{SYNTHETIC_DATASET_NAME}' (the built-in synthetic set, generated if needed), a Hub dataset id, "
            "a local dataset script or folder (datasets.load_dataset), or a save_to_disk folder."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "An image folder's metadata.jsonl / metadata.csv (file_name + caption column) for training."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "The same, for the eval split."})
    test_file: str | None = field(default=None, metadata={"help": "The same, for the test split."})
    image_column: str = field(
        default="image",
        metadata={"help": "Column of the images (an Image feature, or file paths; metadata files: file_name)."},
    )
    caption_column: str = field(
        default="captions",
        metadata={
            "help": "Column of the captions: a list of captions per row, or one caption per row (rows of the "
            "same image are grouped)."
        },
    )
    image_id_column: str | None = field(
        default=None,
        metadata={"help": "Column identifying an image (default: image_id / img_id when present, else its file)."},
    )
    split_column: str | None = field(
        default=None,
        metadata={
            "help": "A column naming each row's split (e.g. 'split' with train/val/test in one Hub split); "
            "default: 'split' when the dataset has a single split and that column."
        },
    )
    synthetic_train_images: int = 8000
    synthetic_dev_images: int = 500
    synthetic_test_images: int = 1000
    synthetic_image_size: int = 64
    synthetic_seed: int = 0
    synthetic_caption_redundancy: str = field(
        default="default",
        metadata={"help": "Filler and modification in the synthetic captions: 'none', 'default' or 'heavy'."},
    )
    synthetic_object_scale: float = field(
        default=1.0,
        metadata={
            "help": "Size of the synthetic set's objects, x the usual (in (0, 2]); e.g. 0.5 with 128-px images and "
            "16-px patches puts a small object inside one patch."
        },
    )
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
        metadata={
            "help": "A training image that cannot be decoded: 'error' stops, 'skip' skips it with a counted warning."
        },
    )
    five_fold_test: bool | None = field(
        default=None,
        metadata={"help": "Also report the 5-fold 1K mean (COCO protocol); default: when a split has 5,000 images."},
    )
    coco_extended_metrics: bool = field(
        default=False,
        metadata={
            "help": "On the COCO 5K test, also report ECCV Caption mAP@R / R-Precision / R@1, CxC R@K and (with "
            "--eccv_pm_dir) PMRP, by the eccv-caption package (pip install -e '.[coco]')."
        },
    )
    eccv_pm_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the downloaded Plausible Match annotations (pm_*.json), for PMRP."},
    )

    def __post_init__(self):
        files = [self.train_file, self.validation_file, self.test_file]
        sources = [self.dataset_dir is not None, self.dataset_name is not None, any(files)]
        if sum(sources) != 1:
            raise ValueError(
                "Give exactly one data source: --dataset_dir (a folder built by dataset_scripts/), --dataset_name "
                f"({SYNTHETIC_DATASET_NAME!r}, a Hub id or a local dataset), or --train_file / --validation_file / "
                "--test_file (image folders' metadata files)."
            )
        for path in files:
            if path is not None and not path.endswith((".jsonl", ".json", ".csv")):
                raise ValueError(f"{path}: a metadata file must be .jsonl, .json or .csv (file_name + caption column).")
        for name in ("max_train_images", "max_eval_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 (or left unset for all images), got {getattr(self, name)}.")
        for name in ("synthetic_train_images", "synthetic_dev_images", "synthetic_test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.synthetic_caption_redundancy not in CAPTION_REDUNDANCY:
            raise ValueError(
                f"--synthetic_caption_redundancy {self.synthetic_caption_redundancy!r} is not one of "
                f"{', '.join(CAPTION_REDUNDANCY)}."
            )
        if not 0 < self.synthetic_object_scale <= 2:
            raise ValueError(
                f"--synthetic_object_scale must be in (0, 2] (1: the usual size), got {self.synthetic_object_scale}."
            )
        if len(self.crop_scale) != 2:
            raise ValueError(
                f"--crop_scale takes two numbers (smallest and largest area share), got {self.crop_scale}."
            )
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
    metric_for_best_model: str = "head_only_rsum"  # the model's own recall, whatever the adapter (fitted at the end)
    greater_is_better: bool = True
    load_best_model_at_end: bool = True
    remove_unused_columns: bool = False  # the collator builds the model's inputs
    ddp_find_unused_parameters: bool = False
    backbone_lr_scale: float = field(default=0.1, metadata={"help": "Learning rate of both towers' backbones, x lr."})
    vision_lr_scale: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the image tower's backbone, x lr (default: --backbone_lr_scale)."},
    )
    text_lr_scale: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the text tower's backbone, x lr (default: --backbone_lr_scale); e.g. lower for "
            "a pretrained text tower beside an image tower trained from scratch."
        },
    )
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
        default=10,
        metadata={"help": "Consecutive steps with a non-finite loss (each skipped) after which training stops."},
    )
    rerank_top_k: int = field(
        default=0,
        metadata={
            "help": "Two-stage evaluation as well: the first stage (the adapter's cosine) proposes the top K "
            "candidates of every query and --ranking's score re-ranks only those (two_stage_* metrics, the headline "
            "when K > 0). 0: exhaustive only."
        },
    )
    ranking: str = field(
        default="fused",
        metadata={
            "help": "What the headline metrics rank by: 'fused' (head + fusion_weight x the first-stage adapter's "
            "cosine, the weight chosen on dev) or 'head' (the head alone: the paper's protocol). Both are always "
            "reported, as fused_* and head_only_*, beside first_stage_*."
        },
    )
    first_stage_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the first-stage adapter (trained beside the model on detached inputs)."},
    )
    first_stage_epochs: int = field(
        default=10,
        metadata={
            "help": "After training, the first-stage adapter is fitted again on the final, frozen embeddings of the "
            "training split (each image and caption encoded once) for this many epochs; the towers and head are "
            "untouched. 0: keep the adapter as trained beside the model."
        },
    )
    first_stage_batch_size: int = field(default=256, metadata={"help": "Pairs per InfoNCE batch of that fit."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow training (or evaluating) into an output_dir that holds another run's model, checkpoints "
            "or results, overwriting them. Without it such a run stops before any work (resuming needs no flag)."
        },
    )
    eval_image_chunk_size: int | None = field(default=None, metadata={"help": "Images per block of scored pairs."})
    eval_text_chunk_size: int | None = field(default=None, metadata={"help": "Captions per block of scored pairs."})

    def tower_lr_scale(self, tower: str) -> float:
        """The learning-rate scale of a tower's backbone, `"vision"` or `"text"`: its own if set, else the shared."""
        own = getattr(self, f"{tower}_lr_scale")
        return self.backbone_lr_scale if own is None else own

    def __post_init__(self):
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(
                f"--max_steps must be >= 1, or -1 to train for --num_train_epochs; got {self.max_steps} (0 would still "
                "run one optimizer step and save a model)."
            )
        if self.disable_tqdm is None and not sys.stderr.isatty():
            self.disable_tqdm = True  # progress bars only on a terminal: in a log file they are kilobytes of escapes
        super().__post_init__()
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinned memory only speeds copies to a GPU (torch warns without one)
        for name in ("backbone_lr_scale", "vision_lr_scale", "text_lr_scale"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}.")
        if not 0 < self.lr_decay_factor <= 1:
            raise ValueError(f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}.")
        if self.rerank_top_k < 0:
            raise ValueError(f"rerank_top_k must be >= 0 (0: exhaustive), got {self.rerank_top_k}.")
        if self.ranking not in RANKINGS:
            raise ValueError(f"--ranking {self.ranking!r} is not one of {', '.join(RANKINGS)}.")
        if self.first_stage_learning_rate < 0:
            raise ValueError(f"first_stage_learning_rate must be >= 0, got {self.first_stage_learning_rate}.")
        if self.first_stage_epochs < 0 or self.first_stage_batch_size < 2:
            raise ValueError(
                f"--first_stage_epochs must be >= 0 and --first_stage_batch_size >= 2 (InfoNCE needs negatives); got "
                f"{self.first_stage_epochs} and {self.first_stage_batch_size}."
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
        return (
            isinstance(value, list) and all(_fits(item, arguments[0]) for item in value)
            if arguments
            else isinstance(value, list)
        )
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
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
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
            f"{key!r}"
            + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, annotations, 1)) else "")
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
                if isinstance(value, str)
                else f"{path}: {key!r} is {json.dumps(value)}, but it must be {_expected_type(annotations[key])}."
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
