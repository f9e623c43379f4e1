"""Tiny, randomly initialised SCTA configurations and inputs for CPU tests (no downloads)."""

import torch
from transformers import BertConfig, SwinConfig, ViTConfig

from configuration_scta import SCTAConfig
from scta_train.testing import TINY_TEXT, TINY_VISION


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
