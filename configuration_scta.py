"""SCTA model configuration."""

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# Image towers whose token layout we know. The head needs to know whether the tower's last hidden state
# starts with a [CLS] token and how many patch tokens follow; published code guessed both from whether
# the token count is a perfect square (METHOD.md, "Oddities"), we read them off the tower's config.
VISION_TOWERS_WITH_CLS = ("vit", "dinov2")
VISION_TOWERS_WITHOUT_CLS = ("swin", "swinv2")
# Text towers that put a start token ([CLS] / <s>) first and an end token ([SEP] / </s>) last.
TEXT_TOWERS = ("bert", "roberta", "xlm-roberta", "distilbert", "electra")
# How the global (one-vector) embeddings are pooled from the projected tokens.
GLOBAL_POOLINGS = ("mean", "cls")


@strict
class SCTAConfig(PreTrainedConfig):
    r"""
    Configuration of an [`SCTAModel`]: an image tower, a text tower and the key-token alignment head of SCTA
    ("Enhancing Cross-modal Semantic Consistency via Key Token Alignment for Image-text Retrieval", ICME 2025).

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the image tower. One of the model types in `VISION_TOWERS_WITH_CLS` or
            `VISION_TOWERS_WITHOUT_CLS`. Defaults to ViT-B/16 at 224 px.
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the text tower, one of the model types in `TEXT_TOWERS`. Defaults to BERT-base.
        embed_size (`int`, *optional*, defaults to 512):
            Joint width `C` that both towers' tokens are projected to.
        patch_keep_ratio (`float`, *optional*, defaults to 0.5):
            Share of patch tokens kept by the selection: `K = ceil(N * patch_keep_ratio)`. Must leave at least
            one patch to drop (the dropped ones are fused into one extra token).
        patch_aggr_ratio (`float`, *optional*, defaults to 0.3):
            Number of learned patch slots `M = int(N * patch_keep_ratio * patch_aggr_ratio)`.
        word_keep_ratio (`float`, *optional*, defaults to 0.75):
            Word slots per caption: `clamp(floor(word_keep_ratio * (n - 1)), min_word_slots, max_word_slots)`.
        min_word_slots (`int`, *optional*, defaults to 4):
            Lower bound of word slots per caption.
        max_word_slots (`int`, *optional*, defaults to 100):
            Upper bound of word slots per caption, also the output width of the learned word aggregator.
        aggregator_hidden_ratio (`float`, *optional*, defaults to 0.2):
            Hidden width of the aggregators' token-wise MLPs: `int(aggregator_hidden_ratio * embed_size)`.
        word_aggregation (`bool`, *optional*, defaults to `True`):
            SCTA's word-side aggregation. `False` aligns all caption tokens instead, which is LAPS (CVPR 2024).
        alignment_negative_slope (`float`, *optional*, defaults to 0.1):
            Negative slope of the leaky ReLU applied to token-to-token cosine similarities.
        margin (`float`, *optional*, defaults to 0.2):
            Margin of the hinge (triplet) ranking loss.
        global_pooling (`str`, *optional*, defaults to `"mean"`):
            How the one-vector global embeddings of the first retrieval stage are pooled from the projected
            tokens: `"mean"` (image: the mean of the patch tokens; caption: the mean of its real tokens, the two
            vectors the head's patch selection already uses) or `"cls"` (the projected [CLS] of both towers; an
            image tower without [CLS] then uses the patch mean). Not part of the paper: see RETRIEVAL.md.
        global_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an auxiliary hinge loss on the cosine matrix of the global embeddings, added to the SCTA
            loss so that the global embeddings become a good first retrieval stage. 0 reproduces the paper.

    Example:

    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> from configuration_scta import SCTAConfig
    >>> config = SCTAConfig.from_vision_text_configs(ViTConfig(), BertConfig(), embed_size=512)
    >>> config.num_patches, config.vision_has_cls_token
    (196, True)
    ```
    """

    model_type = "scta"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    embed_size: int = 512
    patch_keep_ratio: float | int = 0.5
    patch_aggr_ratio: float | int = 0.3
    word_keep_ratio: float | int = 0.75
    min_word_slots: int = 4
    max_word_slots: int = 100
    aggregator_hidden_ratio: float | int = 0.2
    word_aggregation: bool = True
    alignment_negative_slope: float | int = 0.1
    margin: float | int = 0.2
    global_pooling: str = "mean"
    global_loss_weight: float | int = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_settings()

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs
    ) -> "SCTAConfig":
        """Build an `SCTAConfig` from the configs of an image tower and a text tower; `kwargs` set head fields."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)

    # Derived, never stored: they follow from the tower config.
    @property
    def vision_has_cls_token(self) -> bool:
        """Whether the image tower's last hidden state starts with a [CLS] token."""
        return self.vision_config.model_type in VISION_TOWERS_WITH_CLS

    @property
    def num_patches(self) -> int:
        """Number `N` of patch tokens in the image tower's last hidden state ([CLS] excluded)."""
        vision = self.vision_config
        grid = vision.image_size // vision.patch_size
        if vision.model_type in ("swin", "swinv2"):
            # Every stage after the first merges 2x2 neighbouring patches.
            grid //= 2 ** (len(vision.depths) - 1)
        return grid * grid

    @property
    def num_kept_patches(self) -> int:
        """`K = ceil(N * patch_keep_ratio)` (196 * 0.5 -> 98)."""
        return math.ceil(self.num_patches * self.patch_keep_ratio)

    @property
    def num_patch_slots(self) -> int:
        """`M = int(N * patch_keep_ratio * patch_aggr_ratio)` (196 * 0.5 * 0.3 -> 29)."""
        return int(self.num_patches * self.patch_keep_ratio * self.patch_aggr_ratio)

    def check_settings(self):
        """Raise a `ValueError` naming the field, its value and the accepted range for any unusable setting.

        Runs at construction; run it again after assigning a field by hand.
        """
        self._check_towers()
        self._check_head()

    def _check_towers(self):
        vision_type = self.vision_config.model_type
        if vision_type not in VISION_TOWERS_WITH_CLS + VISION_TOWERS_WITHOUT_CLS:
            raise ValueError(
                f"vision_config.model_type={vision_type!r} is not a supported image tower. The SCTA head must know "
                f"the tower's token layout; supported: {', '.join(VISION_TOWERS_WITH_CLS + VISION_TOWERS_WITHOUT_CLS)}."
            )
        text_type = self.text_config.model_type
        if text_type not in TEXT_TOWERS:
            raise ValueError(
                f"text_config.model_type={text_type!r} is not a supported text tower. SCTA needs an encoder that "
                f"puts a start token first and an end token last; supported: {', '.join(TEXT_TOWERS)}."
            )
        max_positions = getattr(self.text_config, "max_position_embeddings", None)
        if max_positions is not None and max_positions < 3:
            raise ValueError(
                f"text_config.max_position_embeddings={max_positions} leaves no room for a caption: SCTA needs at "
                "least [CLS], one word and [SEP]. Use a text tower with more positions (BERT: 512)."
            )
        if self.num_patches < 2:
            raise ValueError(
                f"vision_config (image_size={self.vision_config.image_size}, "
                f"patch_size={self.vision_config.patch_size}) gives {self.num_patches} patch token(s); "
                "the patch selection needs at least 2. Use a larger image_size or a smaller patch_size."
            )

    def _check_head(self):
        def check(name: str, value, low, high, low_open: bool, high_open: bool):
            above = value > low if low_open else value >= low
            below = value < high if high_open else value <= high
            if not (above and below):
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"{name}={value!r} is out of range; accepted range: {interval}.")

        check("embed_size", self.embed_size, 1, math.inf, False, True)
        check("patch_keep_ratio", self.patch_keep_ratio, 0, 1, True, True)
        check("patch_aggr_ratio", self.patch_aggr_ratio, 0, 1, True, False)
        check("word_keep_ratio", self.word_keep_ratio, 0, 1, True, False)
        check("min_word_slots", self.min_word_slots, 1, math.inf, False, True)
        check("max_word_slots", self.max_word_slots, self.min_word_slots, math.inf, False, True)
        check("aggregator_hidden_ratio", self.aggregator_hidden_ratio, 0, math.inf, True, True)
        check("alignment_negative_slope", self.alignment_negative_slope, 0, 1, False, False)
        check("margin", self.margin, 0, math.inf, False, True)
        check("global_loss_weight", self.global_loss_weight, 0, math.inf, False, True)
        if self.global_pooling not in GLOBAL_POOLINGS:
            raise ValueError(f"global_pooling={self.global_pooling!r} is not one of {', '.join(GLOBAL_POOLINGS)}.")
        if int(self.aggregator_hidden_ratio * self.embed_size) < 1:
            raise ValueError(
                f"aggregator_hidden_ratio={self.aggregator_hidden_ratio} with embed_size={self.embed_size} gives an "
                "aggregator hidden width of 0; accepted range: aggregator_hidden_ratio >= 1 / embed_size."
            )
        if self.num_kept_patches >= self.num_patches:
            raise ValueError(
                f"patch_keep_ratio={self.patch_keep_ratio} keeps all {self.num_patches} patches "
                f"(ceil({self.num_patches} * {self.patch_keep_ratio}) = {self.num_kept_patches}); the fused token "
                f"needs at least one dropped patch. Accepted range: patch_keep_ratio <= "
                f"{(self.num_patches - 1) / self.num_patches:.4f} for this image tower."
            )
        if self.num_patch_slots < 1:
            raise ValueError(
                f"patch_keep_ratio={self.patch_keep_ratio} and patch_aggr_ratio={self.patch_aggr_ratio} give "
                f"int({self.num_patches} * {self.patch_keep_ratio} * {self.patch_aggr_ratio}) = 0 patch slots; "
                f"accepted range: patch_keep_ratio * patch_aggr_ratio >= 1 / {self.num_patches}."
            )


__all__ = ["SCTAConfig"]
