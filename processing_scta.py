"""Preprocessing for SCTA inference: the processor and its image helpers.

This file ships as Hub remote code next to the model files, so it holds only what `SCTAProcessor` needs and imports
only transformers, PIL, numpy and the standard library. Training-time preprocessing
(augmentation, the WordPiece trainer, dataset views, the collator) lives in `scta_train/processing.py`.

Top to bottom:
1. images: `convert_to_rgb` (EXIF orientation, alpha, palette, 16-bit), `image_side`;
2. `SCTAProcessor`, registered for `AutoProcessor`;
3. `decode_image`: image bytes to a PIL image, or a ValueError saying why not.
"""

import io
import logging
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers import AutoProcessor, ViTImageProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


try:
    from .configuration_scta import SCTAConfig
except ImportError:
    from configuration_scta import SCTAConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The paper keeps at most 90 tokens of an evaluation caption (docs/METHOD.md, Recipe).
EVAL_MAX_CAPTION_TOKENS = 90
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the stored pixels are rotated or mirrored


# ---------------------------------------------------------------------------
# 1. Images
# ---------------------------------------------------------------------------


def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Return `image` as an 8-bit RGB image, whatever its mode.

    - Transparent images (RGBA, LA, PA, and P/L/RGB with a transparency key)
      are composited on white, so a transparent background does not turn black.
    - 16-bit images (`I;16`, `I;16B`, ...) are scaled from [0, 65535] to
      [0, 255]. Mode `I` (32-bit integers, e.g. an older Pillow's 16-bit PNG)
      is scaled the same way when its values lie in [0, 65535], otherwise its
      [min, max] is stretched to [0, 255]. Mode `F` (floats) is scaled from
      [0, 1] when its values lie there, otherwise stretched the same way.
    - Every other mode (1, L, P, CMYK, YCbCr, ...) goes through Pillow's
      `convert("RGB")`.
    - The EXIF orientation is applied first (`PIL.ImageOps.exif_transpose`): a
      photo taken in portrait is stored on its side with a tag saying so, and
      its captions describe it upright. Every path (processor, training and
      evaluation views) converts through here, so all see the same picture.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose would copy even an upright image
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Scale a single-channel 16/32-bit integer or float image to 8-bit RGB."""
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    gray = np.clip(np.round((values - low) * scale), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(gray).convert("RGB")


def image_side(image_processor: BaseImageProcessor) -> int:
    """The side of the square `pixel_values` an image processor gives: its crop size when it centre-crops (CLIP),
    else its resize height (ViT)."""
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        return image_processor.crop_size["height"]
    size = image_processor.size
    return size["height"] if "height" in size else size["shortest_edge"]


# ---------------------------------------------------------------------------
# 2. Processor
# ---------------------------------------------------------------------------


class SCTAProcessorKwargs(ProcessingKwargs, total=False):
    """`SCTAProcessor`'s defaults: captions padded to the longest of the batch and truncated to 90 tokens (the paper's
    evaluation limit); no token_type_ids (one sentence per caption)."""

    _defaults = {
        "text_kwargs": {
            "padding": "longest",
            "truncation": True,
            "max_length": EVAL_MAX_CAPTION_TOKENS,
            "return_token_type_ids": False,
        },
    }


class SCTAProcessor(ProcessorMixin):
    r"""Image processor + tokenizer of SCTA, in `CLIPProcessor`'s conventions.

    `processor(images=..., text=..., return_tensors="pt")` gives `pixel_values` (B, 3, S, S) and/or `input_ids`,
    `attention_mask` (B, L): `model_input_names`. Keyword arguments go where they belong: tokenizer arguments
    (`padding`, `truncation`, `max_length`, ...) to the tokenizer, image-processor arguments to the image processor,
    or explicitly as `text_kwargs={...}` / `images_kwargs={...}`; `return_tensors` to both. Defaults:
    `SCTAProcessorKwargs`. Images are PIL images of any mode; they go through `convert_to_rgb` (EXIF orientation,
    alpha, palette) first.

    Args:
        image_processor: the image tower's image processor (any `AutoImageProcessor`; `from_tokenizer` builds
            the paper's ViT-style one for towers trained from scratch).
        tokenizer: the text tower's tokenizer (any `AutoTokenizer`).
    """

    valid_processor_kwargs = SCTAProcessorKwargs

    def __init__(self, image_processor: BaseImageProcessor, tokenizer: PreTrainedTokenizerBase):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, image_size: int = 224) -> "SCTAProcessor":
        """The paper's evaluation preprocessing at `image_size` (the vision tower's) around `tokenizer`."""
        image_processor = ViTImageProcessor(
            size={"height": image_size, "width": image_size},
            resample=PILImageResampling.BICUBIC,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        )
        return cls(image_processor, tokenizer)

    @property
    def unused_input_names(self) -> list[str]:
        """A caption is one sentence: its token_type_ids would be all zeros, and are not returned."""
        return ["token_type_ids"]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Preprocess images and/or captions.

        Raises:
            ValueError: neither images nor text given; an empty list; an image that is not a PIL image; a caption that is bytes, not a string, or empty / whitespace only (the message names its
                index in the batch); videos or audio.
        """
        if videos is not None or audio is not None:
            raise ValueError("SCTAProcessor takes images and captions only, not videos or audio.")
        if images is None and text is None:
            raise ValueError("Pass images=..., text=..., or both.")
        merged = self._merge_kwargs(SCTAProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        data = {}
        if images is not None:
            data.update(self.image_processor(_checked_images(images), **merged["images_kwargs"]))
        if text is not None:
            captions = _checked_captions(text)
            text_kwargs = merged["text_kwargs"]
            encoded = self.tokenizer(captions, **text_kwargs)
            self._check_caption_tokens(captions, encoded, text_kwargs)
            data.update(encoded)
        data = {name: value for name, value in data.items() if name not in self.unused_input_names}
        return_tensors = merged["text_kwargs"].get("return_tensors") or merged["images_kwargs"].get("return_tensors")
        return BatchFeature(data, tensor_type=return_tensors)

    def _check_caption_tokens(self, captions: list[str], encoded, text_kwargs: dict) -> None:
        """Every caption has a token; captions cut by `max_length` are counted in a warning, not cut silently. Reads
        the lengths from the tokenization itself; only captions that reach `max_length` are tokenized again (without
        truncation) to tell the cut ones from those that fit exactly."""
        special = self.tokenizer.num_special_tokens_to_add() if text_kwargs.get("add_special_tokens", True) else 0
        masks = encoded.get("attention_mask")
        if masks is None:  # return_attention_mask=False: count the tokens without the tokenization's padding
            masks = [[1] * len(ids) for ids in self.tokenizer(captions, verbose=False)["input_ids"]]
        lengths = [int(sum(mask)) - special for mask in masks]  # word tokens, as truncated
        for index, length in enumerate(lengths):
            if length <= 0:
                raise ValueError(
                    f"Caption at index {index} of the batch is empty or whitespace only ({captions[index]!r}). "
                    "Every caption needs at least one word: fix or remove it."
                )
        max_length = text_kwargs.get("max_length")
        if text_kwargs.get("truncation") and max_length:
            limit = max_length - special
            full = [captions[index] for index, length in enumerate(lengths) if length >= limit]
            untruncated = self.tokenizer(full, add_special_tokens=False, verbose=False)["input_ids"] if full else []
            truncated = sum(len(ids) > limit for ids in untruncated)
            if truncated:
                logger.warning(
                    "%d of %d captions longer than %d tokens were truncated.", truncated, len(captions), max_length
                )


def _checked_images(images) -> list[PIL.Image.Image]:
    """`images` as a non-empty list of RGB PIL images (`convert_to_rgb`), or a ValueError naming the one that is
    not a PIL image. (Arrays are refused rather than guessed at: a (4, 4, 3) array is channels-last or -first.)"""
    images = [images] if isinstance(images, PIL.Image.Image) else images
    if not isinstance(images, (list, tuple)):
        raise ValueError(
            f"images must be a PIL image or a list of PIL images, got a {type(images).__name__}. Open files with "
            "PIL.Image.open(path); convert arrays with PIL.Image.fromarray(array)."
        )
    if len(images) == 0:
        raise ValueError("images=[] is empty: pass at least one image, or leave images out.")
    for index, image in enumerate(images):
        if not isinstance(image, PIL.Image.Image):
            hint = " (encoded bytes: PIL.Image.open(io.BytesIO(data)))" if isinstance(image, bytes) else ""
            raise ValueError(
                f"Image at index {index} of the batch is a {type(image).__name__}{hint}; pass PIL images "
                "(PIL.Image.open(path) or PIL.Image.fromarray(array))."
            )
    return [convert_to_rgb(image) for image in images]


def _checked_captions(text) -> list[str]:
    """`text` as a non-empty list of strings, or a ValueError naming the caption that is not one."""
    if isinstance(text, bytes):
        raise ValueError("text is bytes, not a string: decode it first (text.decode('utf-8')).")
    captions = [text] if isinstance(text, str) else text
    if not isinstance(captions, (list, tuple)):
        raise ValueError(f"text must be a string or a list of strings, got a {type(text).__name__}.")
    if len(captions) == 0:
        raise ValueError("text=[] is empty: pass at least one caption, or leave text out.")
    for index, caption in enumerate(captions):
        if isinstance(caption, bytes):
            raise ValueError(
                f"Caption at index {index} of the batch is bytes: decode it first (caption.decode('utf-8'))."
            )
        if not isinstance(caption, str):
            raise ValueError(
                f"Caption at index {index} of the batch is a {type(caption).__name__}, not a string: {caption!r}."
            )
    return list(captions)


SCTAProcessor.register_for_auto_class("AutoProcessor")
# With this file imported (the project installed), AutoProcessor.from_pretrained(folder) uses it directly: no remote
# code, no trust_remote_code prompt.
AutoProcessor.register(SCTAConfig, SCTAProcessor, exist_ok=True)


# ---------------------------------------------------------------------------
# 3. Decoding image bytes
# ---------------------------------------------------------------------------


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """Decode image bytes fully (`load()`), treating Pillow's decompression-bomb warning as an error.

    The one test of "this image is usable", shared by the dataset builder, the dataset views and scta-search.
    With `draft_size`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 of its size that still covers
    `draft_size` (Pillow's `draft`): a 24-megapixel photo that the processor will shrink to 224 px anyway is then
    never held at full size.

    Raises:
        ValueError: saying why: not an image file Pillow can read, over the
            decompression-bomb limit, or not decodable (truncated or corrupt).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
    except PIL.UnidentifiedImageError as error:
        raise ValueError("not an image file Pillow can read") from error
    except (PIL.Image.DecompressionBombWarning, PIL.Image.DecompressionBombError) as error:
        raise ValueError(
            f"over Pillow's decompression-bomb limit of {PIL.Image.MAX_IMAGE_PIXELS} pixels ({error})"
        ) from error
    # Pillow reports broken files with many exception types (OSError for truncation, SyntaxError,
    # ValueError, struct.error, ...); any of them means the image cannot be used.
    except Exception as error:
        raise ValueError(f"cannot be decoded ({type(error).__name__}: {error})") from error
    return image
