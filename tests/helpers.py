"""Helpers shared by the test files (test files import this module, never each other or conftest): tiny models and
inputs, run_retrieval.py configs, a fresh process without the project, the search tool's model and photos, and the
marker of tests that need the real Karpathy-split caption files."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, SwinConfig, ViTConfig

from configuration_scta import SCTAConfig
from modeling_scta import KeyTokenAlignmentHead, SCTAModel
from scta_train.testing import TINY_TEXT, TINY_VISION


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and inputs

# Every test and quick CPU benchmark builds its towers from scta_train.testing's shapes: the configs below,
# conftest.TINY_TOWERS for run_retrieval.py configs, the CLIP towers of test_conformance, bench --quick runs.


def tiny_vit_config(image_size: int = 32, patch_size: int = 8) -> ViTConfig:
    """ViT with [CLS] and (32 / 8)^2 = 16 patches."""
    return ViTConfig(**{**TINY_VISION, "image_size": image_size, "patch_size": patch_size})


def tiny_swin_config() -> SwinConfig:
    """Swin without [CLS]: 32 / 4 = 8x8 patches, merged once to 4x4 = 16 tokens."""
    return SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)


def tiny_bert_config(vocab_size: int = 99) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, **TINY_TEXT)


def tiny_scta_config(vision: str = "vit", **head_settings) -> SCTAConfig:
    vision_config = tiny_vit_config() if vision == "vit" else tiny_swin_config()
    head_settings.setdefault("embed_size", 24)
    head_settings.setdefault("patch_aggr_ratio", 0.5)  # 16 patches -> 8 kept -> 4 slots
    return SCTAConfig.from_vision_text_configs(vision_config, tiny_bert_config(), **head_settings)


def random_text_batch(lengths, max_length=None, vocab_size: int = 99, generator=None):
    """Right-padded `input_ids` / `attention_mask` for captions of the given token counts."""
    lengths = torch.as_tensor(lengths)
    max_length = max_length or int(lengths.max())
    input_ids = torch.randint(5, vocab_size, (len(lengths), max_length), generator=generator)
    attention_mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    return input_ids * attention_mask, attention_mask


def make_head(vision_has_cls_token=True, word_aggregation=True, dtype=torch.float64, seed=0, **settings):
    torch.manual_seed(seed)
    settings.setdefault("patch_aggr_ratio", 0.5)
    head = KeyTokenAlignmentHead(
        embed_size=32,
        num_patches=16,
        vision_has_cls_token=vision_has_cls_token,
        word_aggregation=word_aggregation,
        **settings,
    )
    return head.to(dtype)


def random_tokens(num_images, lengths, head, dtype=torch.float64, seed=1, extra_padding=3):
    generator = torch.Generator().manual_seed(seed)
    image_tokens = torch.randn(num_images, 16 + int(head.vision_has_cls_token), 32, generator=generator, dtype=dtype)
    lengths = torch.as_tensor(lengths)
    max_length = int(lengths.max()) + extra_padding
    text_tokens = torch.randn(len(lengths), max_length, 32, generator=generator, dtype=dtype)
    text_mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    return image_tokens, text_tokens, text_mask


CAPTION_LENGTHS = [3, 4, 5, 7, 9, 12, 16, 21, 27, 33, 40]


class SCTAModelTester:
    """Builds a tiny model and inputs; checks every output field."""

    def __init__(self, vision="vit", **head_settings):
        self.config = tiny_scta_config(vision, **head_settings)
        torch.manual_seed(0)
        self.model = SCTAModel(self.config).eval()
        self.batch_size = 3
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(self.batch_size, 3, 32, 32, generator=generator)
        self.input_ids, self.attention_mask = random_text_batch([9, 5, 7], generator=generator)

    def loss_outputs(self, image_ids: torch.Tensor):
        """The model's forward on the tester's pairs with `return_loss=True` (in the model's current mode)."""
        return self.model(
            pixel_values=self.pixel_values,
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            image_ids=image_ids,
            return_loss=True,
        )

    def check_outputs(self):
        outputs = self.model(
            pixel_values=self.pixel_values,
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            image_ids=torch.tensor([0, 1, 2]),
            return_loss=True,
        )
        tokens = self.config.num_patches + int(self.config.vision_has_cls_token)
        assert outputs.loss.shape == ()
        assert torch.isfinite(outputs.loss)
        assert outputs.logits_per_image.shape == (3, 3)
        assert outputs.logits_per_text.shape == (3, 3)
        assert torch.equal(outputs.logits_per_text, outputs.logits_per_image.t())
        assert outputs.image_embeds.shape == (3, tokens, self.config.embed_size)
        assert outputs.text_embeds.shape == (3, self.input_ids.shape[1], self.config.embed_size)
        assert outputs.kept_patch_fraction.item() == pytest.approx(
            self.config.num_kept_patches / self.config.num_patches
        )
        assert outputs.image_global_embeds.shape == (3, self.config.embed_size)
        assert outputs.text_global_embeds.shape == (3, self.config.embed_size)
        assert set(outputs.keys()) == {
            "loss",
            "logits_per_image",
            "logits_per_text",
            "image_embeds",
            "text_embeds",
            "kept_patch_fraction",
            "image_global_embeds",
            "text_global_embeds",
            "vision_model_output",
            "text_model_output",
        }
        return outputs


# ---------------------------------------------------------------------------------------------------------------
# run_retrieval.py in this process

# run_retrieval.py's tower configs, from the tiny shapes of scta_train.testing (longer captions than its BERT takes)
TINY_TOWERS = {
    "vision_config": {"model_type": "vit", **TINY_VISION},
    "text_config": {"model_type": "bert", **TINY_TEXT, "max_position_embeddings": 128},
}


def tiny_run_config(dataset_dir: str, output_dir: str, **overrides) -> dict:
    """Arguments of a seconds-long `run_retrieval.py` run: tiny towers from scratch on the synthetic set."""
    config = {
        "dataset_dir": dataset_dir,
        **TINY_TOWERS,
        "embed_size": 32,
        "vocab_size": 400,
        "output_dir": output_dir,
        "do_train": True,
        "do_eval": True,
        "do_predict": True,
        "num_train_epochs": 2,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "lr_decay_epochs": [1],
        "logging_steps": 5,
        "use_cpu": True,
        "report_to": "none",
        "horizontal_flip": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 7,
    }
    config.update(overrides)
    return config


def write_config(path, config: dict) -> str:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    return str(path)


def run_main(argv: list[str]) -> dict:
    """What `python run_retrieval.py ARGV` does, in this process: parse the arguments, then `scta_train.pipeline.run`."""
    from scta_train.arguments import parse_arguments
    from scta_train.pipeline import run

    return run(*parse_arguments(argv))


# ---------------------------------------------------------------------------------------------------------------
# A fresh process in which this project is not importable (remote-code checks)

PROJECT_MODULES = ("configuration_scta", "modeling_scta", "processing_scta", "run_retrieval")

# Hides the checkout from the child: the repo's folder on sys.path and the import hook of an editable install
# (`pip install -e .` maps each top-level module to its file in the checkout).
_HIDE_PROJECT = textwrap.dedent(
    f"""
    import importlib, importlib.util, os, sys
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != {REPO!r}]
    sys.meta_path[:] = [
        finder for finder in sys.meta_path
        if "modeling_scta" not in getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", {{}})
    ]
    importlib.invalidate_caches()
    for name in {PROJECT_MODULES!r}:
        assert importlib.util.find_spec(name) is None, f"the project must not be importable here: {{name}}"
    """
)


def run_without_project(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` with `cwd` outside the repo, offline, with a private remote-code module cache; assert success."""
    origin = importlib.util.find_spec("modeling_scta").origin
    if str(Path(origin).resolve().parent) != REPO:
        pytest.skip(f"modeling_scta is installed as a copy ({origin}); a fresh process would import it from there")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", _HIDE_PROJECT + textwrap.dedent(script)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Data that is not part of the project


# The real Karpathy-split caption and id files (f30k/ and coco/ of caption-files layout) are not part of the
# project: the tests that read them run when SCTA_KARPATHY_DATA names their folder, and are skipped otherwise.
KARPATHY_DATA = Path(os.environ.get("SCTA_KARPATHY_DATA", "")) if os.environ.get("SCTA_KARPATHY_DATA") else None


def requires_karpathy_data(*files: str):
    """Skip unless every `files` path (relative to $SCTA_KARPATHY_DATA) exists, saying how to run the test."""
    missing = KARPATHY_DATA is None or not all((KARPATHY_DATA / name).is_file() for name in files)
    where = (
        "SCTA_KARPATHY_DATA is not set" if KARPATHY_DATA is None else f"{', '.join(files)} not all in {KARPATHY_DATA}"
    )
    skip = pytest.mark.skipif(
        missing, reason=f"needs the Karpathy-split caption files ({where}); set SCTA_KARPATHY_DATA to their folder"
    )
    return lambda test: pytest.mark.karpathy_data(skip(test))


# Checkouts of the published SCTA and LAPS code (no license: never copied here) for the cross-check: the test that
# runs `bench/crosscheck_published.py` needs SCTA_PUBLISHED_SCTA and SCTA_PUBLISHED_LAPS, and is skipped otherwise.
PUBLISHED_CODE = {name: os.environ.get(f"SCTA_PUBLISHED_{name}") for name in ("SCTA", "LAPS")}


def requires_published_code(test):
    missing = [f"SCTA_PUBLISHED_{name}" for name, folder in PUBLISHED_CODE.items() if not folder]
    reason = (
        f"needs checkouts of the published code ({', '.join(missing)} not set): git clone "
        "https://github.com/ICME2025ITR/SCTA and https://github.com/CrossmodalGroup/LAPS and name their folders"
    )
    return pytest.mark.published_code(pytest.mark.skipif(bool(missing), reason=reason)(test))


# ---------------------------------------------------------------------------------------------------------------
# A tiny saved model and a folder of photos, for the search tool's tests

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta"]
CAPTIONS = [f"a {colour} square on a plain background" for colour in COLOURS]


def save_search_model(folder, seed=0):
    """A random tiny SCTA model (16 patches, width 24) with a WordPiece tokenizer of the test captions, saved."""
    import torch

    from configuration_scta import SCTAConfig
    from modeling_scta import SCTAModel
    from processing_scta import SCTAProcessor
    from scta_train.processing import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(CAPTIONS + ["a circle at the top", "two dogs"], vocab_size=90)
    processor = SCTAProcessor.from_tokenizer(tokenizer, image_size=32)
    torch.manual_seed(seed)
    config = SCTAConfig.from_vision_text_configs(tiny_vit_config(), tiny_bert_config(len(tokenizer)), embed_size=24)
    model = SCTAModel(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def write_photos(folder, count=10, start=0):
    """`count` small PNGs of plain colours with a white square at a different place each."""
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        image = PIL.Image.new("RGB", (40 + index, 36), COLOURS[index % len(COLOURS)])
        image.paste((255, 255, 255), (index, index, index + 8, index + 8))
        image.save(folder / f"photo{index:02d}.png")
