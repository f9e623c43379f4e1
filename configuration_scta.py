"""SCTA model configuration."""

import dataclasses
import math
import re
from collections.abc import Callable

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


def _patch_grid(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def _merged_patch_grid(vision_config) -> int:
    """Swin: every stage after the first merges 2x2 neighbouring patches."""
    grid = vision_config.image_size // vision_config.patch_size // 2 ** (len(vision_config.depths) - 1)
    return grid * grid


@dataclasses.dataclass(frozen=True)
class VisionTower:
    """What the head must know of an image tower's last hidden state: whether it starts with a [CLS] token, and how
    many patch tokens follow, from the tower's config. (The published code guessed both from whether the token
    count is a perfect square; docs/METHOD.md, "Oddities".)"""

    has_cls_token: bool
    num_patches: Callable


@dataclasses.dataclass(frozen=True)
class TextTower:
    """Where a text tower puts a caption's global token: `"first"` ([CLS] / <s> of a bidirectional encoder) or
    `"last"` (the end-of-text token of CLIP's causal encoder, the only one that has seen the whole caption). The
    other real tokens are the caption's words."""

    global_token: str


# The towers SCTA knows, by `model_type`: one table instead of whitelists. `clip_*` are the towers of a CLIP
# checkpoint (`from_vision_text_pretrained("openai/clip-vit-base-patch16", "openai/clip-vit-base-patch16")`).
VISION_TOWERS = {
    "vit": VisionTower(has_cls_token=True, num_patches=_patch_grid),
    "dinov2": VisionTower(has_cls_token=True, num_patches=_patch_grid),
    "clip_vision_model": VisionTower(has_cls_token=True, num_patches=_patch_grid),
    "siglip_vision_model": VisionTower(has_cls_token=False, num_patches=_patch_grid),
    "swin": VisionTower(has_cls_token=False, num_patches=_merged_patch_grid),
    "swinv2": VisionTower(has_cls_token=False, num_patches=_merged_patch_grid),
}
TEXT_TOWERS = {
    "bert": TextTower(global_token="first"),
    "roberta": TextTower(global_token="first"),
    "xlm-roberta": TextTower(global_token="first"),
    "distilbert": TextTower(global_token="first"),
    "electra": TextTower(global_token="first"),
    "clip_text_model": TextTower(global_token="last"),
}
# Checkpoints that hold both towers: the tower of each side, by the checkpoint's model_type.
COMPOSITE_CHECKPOINTS = {
    "clip": {"vision": "clip_vision_model", "text": "clip_text_model"},
    "siglip": {"vision": "siglip_vision_model"},
}


def num_kept_patches(num_patches: int, patch_keep_ratio: float) -> int:
    """`K = ceil(N * patch_keep_ratio)` (196 * 0.5 -> 98): the patches the selection keeps."""
    return math.ceil(num_patches * patch_keep_ratio)


def num_patch_slots(num_patches: int, patch_keep_ratio: float, patch_aggr_ratio: float) -> int:
    """`M = int(N * patch_keep_ratio * patch_aggr_ratio)` (196 * 0.5 * 0.3 -> 29): the learned patch slots."""
    return int(num_patches * patch_keep_ratio * patch_aggr_ratio)


# How the global (one-vector) embeddings are pooled from the projected tokens.
GLOBAL_POOLINGS = ("mean", "cls")
# What scores a pair: SCTA's key-token head, or the cosine of the global embeddings (a dual-encoder baseline).
SCORING_HEADS = ("key_tokens", "global")
# The first retrieval stage's map over the global embeddings: none (their plain cosine), linear, or a residual MLP.
FIRST_STAGE_ADAPTERS = ("none", "linear", "mlp")
# The objective over the batch's score matrix: the paper's hinge, or symmetric InfoNCE with a learned temperature.
TRAINING_LOSSES = ("hinge", "infonce")


@strict
class SCTAConfig(PreTrainedConfig):
    r"""
    Configuration of an [`SCTAModel`]: an image tower, a text tower and the key-token alignment head of SCTA
    ("Enhancing Cross-modal Semantic Consistency via Key Token Alignment for Image-text Retrieval", ICME 2025).

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the image tower, one of the model types in `VISION_TOWERS`. Defaults to ViT-B/16 at 224 px.
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
        training_loss (`str`, *optional*, defaults to `"hinge"`):
            The contrastive objective over the batch's score matrix: `"hinge"`, the paper's triplet ranking loss
            (summed negatives during warm-up, then the hardest), or `"infonce"`, symmetric InfoNCE over the same
            scores with a learned temperature, as CLIP trains its dual encoder (the model then holds
            `logit_scale`). Not part of the paper: an option, see docs/METHOD.md "Training objective".
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial `logit_scale = log(1 / temperature)` of `training_loss="infonce"`; CLIP's value, `log(1 / 0.07)`.
        global_pooling (`str`, *optional*, defaults to `"mean"`):
            How the one-vector global embeddings of the first retrieval stage are pooled from the projected
            tokens: `"mean"` (image: the mean of the patch tokens; caption: the mean of its real tokens, the two
            vectors the head's patch selection already uses) or `"cls"` (the projected [CLS] of both towers; an
            image tower without [CLS] then uses the patch mean). Not part of the paper: see docs/RETRIEVAL.md.
        global_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an auxiliary hinge loss on the cosine matrix of the global embeddings, added to the SCTA
            loss so that the global embeddings become a good first retrieval stage. 0 reproduces the paper.
        scoring_head (`str`, *optional*, defaults to `"key_tokens"`):
            What scores an (image, caption) pair: `"key_tokens"`, the SCTA head (LAPS with
            `word_aggregation=False`), or `"global"`, the cosine of the global embeddings alone: a dual encoder in
            the style of CLIP / `VisionTextDualEncoderModel` with the same towers and projections, trained with
            the same hinge loss. A baseline, not the paper's model; the head's weights are then unused.
        text_guided_selection (`bool`, *optional*, defaults to `True`):
            Whether the patch selection adds the caption term `s_text` to `s_self` (docs/METHOD.md step 1). `False`
            selects patches by `s_self` alone, the same for every caption (an ablation of LAPS's
            language-guided selection).
        first_stage_adapter (`str`, *optional*, defaults to `"linear"`):
            A small map per side over the global embeddings, trained with symmetric InfoNCE on detached inputs so
            that it never changes the towers or the head (docs/RETRIEVAL.md "First-stage adapter"): `"linear"`,
            `"mlp"` (residual, one hidden layer) or `"none"` (the first stage is the global embeddings' cosine).
            Its cosine proposes the candidates of two-stage retrieval and joins the fused score.
        fusion_weight (`float`, *optional*):
            `lambda` of the fused score `head + lambda * adapter cosine`. `None`: chosen on the dev split at
            evaluation (and stored here); 0 ranks by the head alone.

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
    training_loss: str = "hinge"
    logit_scale_init_value: float | int = 2.6592
    global_pooling: str = "mean"
    global_loss_weight: float | int = 0.0
    scoring_head: str = "key_tokens"
    text_guided_selection: bool = True
    first_stage_adapter: str = "linear"
    fusion_weight: float | int | None = None

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
        """Whether the image tower's last hidden state starts with a [CLS] token (`VISION_TOWERS`)."""
        return VISION_TOWERS[self.vision_config.model_type].has_cls_token

    @property
    def num_patches(self) -> int:
        """Number `N` of patch tokens in the image tower's last hidden state ([CLS] excluded)."""
        return VISION_TOWERS[self.vision_config.model_type].num_patches(self.vision_config)

    @property
    def text_global_token(self) -> str:
        """Where the caption's global token is: `"first"` or `"last"` real token (`TEXT_TOWERS`)."""
        return TEXT_TOWERS[self.text_config.model_type].global_token

    @property
    def num_kept_patches(self) -> int:
        """`K`, see `num_kept_patches`."""
        return num_kept_patches(self.num_patches, self.patch_keep_ratio)

    @property
    def num_patch_slots(self) -> int:
        """`M`, see `num_patch_slots`."""
        return num_patch_slots(self.num_patches, self.patch_keep_ratio, self.patch_aggr_ratio)

    def check_settings(self):
        """Raise a `ValueError` naming the field, its value and the accepted range for any unusable setting.

        Runs at construction; run it again after assigning a field by hand.
        """
        self._check_towers()
        self._check_head()

    def _check_towers(self):
        vision_type = self.vision_config.model_type
        if vision_type not in VISION_TOWERS:
            raise ValueError(
                f"vision_config.model_type={vision_type!r} is not a supported image tower. The SCTA head must know "
                f"the tower's token layout; supported: {', '.join(VISION_TOWERS)} (configuration_scta.VISION_TOWERS)."
            )
        text_type = self.text_config.model_type
        if text_type not in TEXT_TOWERS:
            raise ValueError(
                f"text_config.model_type={text_type!r} is not a supported text tower. SCTA must know where the "
                f"tower puts a caption's global token; supported: {', '.join(TEXT_TOWERS)} (configuration_scta.TEXT_TOWERS)."
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
        if self.training_loss not in TRAINING_LOSSES:
            raise ValueError(f"training_loss={self.training_loss!r} is not one of {', '.join(TRAINING_LOSSES)}.")
        if self.global_pooling not in GLOBAL_POOLINGS:
            raise ValueError(f"global_pooling={self.global_pooling!r} is not one of {', '.join(GLOBAL_POOLINGS)}.")
        if self.scoring_head not in SCORING_HEADS:
            raise ValueError(f"scoring_head={self.scoring_head!r} is not one of {', '.join(SCORING_HEADS)}.")
        if self.first_stage_adapter not in FIRST_STAGE_ADAPTERS:
            raise ValueError(
                f"first_stage_adapter={self.first_stage_adapter!r} is not one of {', '.join(FIRST_STAGE_ADAPTERS)}."
            )
        if self.fusion_weight is not None:
            check("fusion_weight", self.fusion_weight, 0, math.inf, False, True)
        if self.scoring_head == "global" and self.global_loss_weight:
            raise ValueError(
                f"global_loss_weight={self.global_loss_weight} with scoring_head='global': the global embeddings are "
                "already what the loss trains; set global_loss_weight to 0."
            )
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


# The head settings: every SCTAConfig field but the towers, declared once above. run_retrieval.py derives one
# argument from each, the model card lists them.
HEAD_SETTINGS = tuple(name for name in SCTAConfig.__annotations__ if name not in ("vision_config", "text_config"))
# Head settings that change the shape of a weight: a trained model's cannot be overridden.
SHAPE_SETTINGS = (
    "embed_size",
    "patch_keep_ratio",
    "patch_aggr_ratio",
    "max_word_slots",
    "aggregator_hidden_ratio",
    "word_aggregation",
    "first_stage_adapter",
    "training_loss",  # "infonce" adds the weight logit_scale
)


def config_field_doc(name: str) -> str:
    """The `Args:` text of one `SCTAConfig` field, on one line."""
    match = re.search(rf"^ {{8}}{name} \(.*?\):\n((?: {{12}}.*\n)+)", SCTAConfig.__doc__, flags=re.MULTILINE)
    return " ".join(match.group(1).split()) if match else ""


__all__ = ["HEAD_SETTINGS", "SCTAConfig", "TEXT_TOWERS", "VISION_TOWERS"]
