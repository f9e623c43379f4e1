"""Training-time preprocessing: image augmentation, the WordPiece tokenizer trainer, caption encoding and
augmentation, and the dataset views and collator over a retrieval split.

The views read a `datasets.Dataset` split with the columns `image`, `image_id`, `filename`, `captions` (one row per
image, see `dataset_scripts/build_retrieval_dataset.py`): `RetrievalTrainDataset`, `RetrievalEvalImages`,
`RetrievalEvalCaptions`, and `RetrievalCollator`. The processor a saved model ships with is in `processing_scta.py`.
"""

import collections
import logging
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.v2.functional as tvF
from torchvision.transforms import InterpolationMode
from transformers import BertTokenizer
from transformers.image_processing_utils import BaseImageProcessor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from processing_scta import (
    EVAL_MAX_CAPTION_TOKENS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    convert_to_rgb,
    decode_image,
    image_side,
)


logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BERT's position embeddings end at 512 tokens.
TRAIN_MAX_CAPTION_TOKENS = 512


# ---------------------------------------------------------------------------
# 1. Images
# ---------------------------------------------------------------------------


def _to_uint8_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """PIL image of any mode -> uint8 tensor (3, H, W)."""
    pixels = np.array(convert_to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W), rescaled to [0, 1] then normalised."""
    return tvF.normalize(pixels.float() / 255.0, list(mean), list(std))


class ImageEvalTransform:
    """Evaluation image preprocessing: resize to `image_size`², bicubic, then normalise.

    Gives the same `pixel_values` as `SCTAProcessor(images=...)` (the image
    processor also resizes the uint8 image with antialiased bicubic
    interpolation), one image at a time, for dataset views.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    @classmethod
    def from_image_processor(cls, image_processor: BaseImageProcessor) -> Callable[[PIL.Image.Image], torch.Tensor]:
        """The transform matching an image processor: this fast one for a square-resizing processor (ViT's), else
        the image processor itself, one image at a time (CLIP's shortest-edge resize and centre crop)."""
        size = getattr(image_processor, "size", None) or {}
        if "height" in size and not getattr(image_processor, "do_center_crop", False):
            return cls(size["height"], image_processor.image_mean, image_processor.image_std)
        return lambda image: image_processor(image, return_tensors="pt")["pixel_values"][0]

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        pixels = _to_uint8_tensor(image)
        pixels = tvF.resize(
            pixels, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )  # (3, image_size, image_size)
        return _normalize(pixels, self.mean, self.std)


class ImageTrainTransform:
    """Training image augmentation of the paper: RandomResizedCrop (bicubic) + horizontal flip + normalise.

    All randomness comes from the `generator` passed to each call, so a
    sample's augmentation depends only on that generator's seed.

    Args:
        image_size: output side length (the vision tower's `image_size`).
        scale: range of the crop's area as a fraction of the image area (paper: 0.6 to 1.0).
        ratio: range of the crop's aspect ratio (torchvision's default).
        horizontal_flip: flip with probability 0.5. Switch it off when captions
            mention left and right (the synthetic shapes set does).
        mean, std: normalisation (ImageNet's by default, as in the paper).
    """

    def __init__(
        self,
        image_size: int = 224,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        horizontal_flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}.")
        self.image_size = image_size
        self.scale = scale
        self.ratio = ratio
        self.horizontal_flip = horizontal_flip
        self.mean = tuple(mean)
        self.std = tuple(std)

    @classmethod
    def from_image_processor(
        cls,
        image_processor: BaseImageProcessor,
        horizontal_flip: bool = True,
        scale: tuple[float, float] = (0.6, 1.0),
    ) -> "ImageTrainTransform":
        """The augmentation producing images of the image processor's output size, mean and std."""
        return cls(
            image_side(image_processor),
            scale=scale,
            mean=image_processor.image_mean,
            std=image_processor.image_std,
            horizontal_flip=horizontal_flip,
        )

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator) -> torch.Tensor:
        pixels = _to_uint8_tensor(image)  # (3, H, W)
        top, left, height, width = self._sample_crop(pixels.shape[1], pixels.shape[2], generator)
        pixels = tvF.resized_crop(
            pixels,
            top,
            left,
            height,
            width,
            [self.image_size, self.image_size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )  # (3, image_size, image_size)
        if self.horizontal_flip and torch.rand((), generator=generator) < 0.5:
            pixels = pixels.flip(-1)
        return _normalize(pixels, self.mean, self.std)

    def _sample_crop(
        self, image_height: int, image_width: int, generator: torch.Generator
    ) -> tuple[int, int, int, int]:
        """torchvision's `RandomResizedCrop.get_params`, drawing from `generator` instead of the global RNG."""
        area = image_height * image_width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(()).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect_ratio = math.exp(torch.empty(()).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
            width = int(round(math.sqrt(target_area * aspect_ratio)))
            height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < width <= image_width and 0 < height <= image_height:
                top = int(torch.randint(0, image_height - height + 1, (), generator=generator))
                left = int(torch.randint(0, image_width - width + 1, (), generator=generator))
                return top, left, height, width
        # Fallback of torchvision: a central crop with the aspect ratio clamped to `ratio`.
        in_ratio = image_width / image_height
        if in_ratio < self.ratio[0]:
            width, height = image_width, int(round(image_width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            width, height = int(round(image_height * self.ratio[1])), image_height
        else:
            width, height = image_width, image_height
        return (image_height - height) // 2, (image_width - width) // 2, height, width


# ---------------------------------------------------------------------------
# 2. Captions
# ---------------------------------------------------------------------------


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 8192, lowercase: bool = True) -> BertTokenizer:
    """Build a BERT WordPiece tokenizer whose vocabulary comes from `texts`.

    The vocabulary is the five special tokens ([PAD] [UNK] [CLS] [SEP] [MASK],
    ids 0-4), every character seen (as a word start and as a `##` continuation,
    so any word made of seen characters can be spelled out), then whole words
    by decreasing frequency (ties alphabetically) until `vocab_size`. Words are
    found with BERT's own normaliser and pre-tokeniser, so they are exactly
    the units the tokenizer later looks up.

    Deterministic for the same texts; the `tokenizers` WordPieceTrainer is not
    (four runs on the Flickr30K test captions gave four different vocabularies).
    """
    # A tokenizer with only the special tokens lends its normaliser and pre-tokeniser.
    pipeline = BertTokenizer(do_lower_case=lowercase).backend_tokenizer
    normalizer, pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    word_counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        word_counts.update(word for word, _ in words)
    characters = sorted({character for word in word_counts for character in word})
    vocabulary = list(SPECIAL_TOKENS) + characters + [f"##{character}" for character in characters]
    if len(vocabulary) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the texts have {len(characters)} distinct characters, which "
            f"with their ## continuations and the 5 special tokens need {len(vocabulary)} entries. "
            "Raise vocab_size."
        )
    known = set(vocabulary)
    frequent_words = sorted(word_counts.items(), key=lambda item: (-item[1], item[0]))
    new_words = [word for word, _ in frequent_words if word not in known]
    vocabulary += new_words[: vocab_size - len(vocabulary)]
    return BertTokenizer(vocab={token: index for index, token in enumerate(vocabulary)}, do_lower_case=lowercase)


def _truncate(input_ids: list[int], max_length: int, sep_token_id: int) -> list[int]:
    """Ids longer than `max_length`: keep the first `max_length - 1` and end with [SEP] again."""
    if len(input_ids) <= max_length:
        return input_ids
    return input_ids[: max_length - 1] + [sep_token_id]


def encode_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    max_length: int,
    describe: Callable[[int], str] = lambda index: f"at index {index} of the batch",
) -> tuple[list[list[int]], int]:
    """Tokenise captions to `[CLS] ... [SEP]` id lists of at most `max_length` ids.

    Args:
        describe: names caption `index` in error messages (its batch index by default).

    Returns:
        The id lists and how many captions were truncated.

    Raises:
        ValueError: a caption that is not a string, or has no tokens (empty or
            whitespace only). Text such as "None", "null" or "NA" is a caption
            like any other.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 ([CLS], one token, [SEP]), got {max_length}.")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"Caption {describe(index)} is a {type(caption).__name__}, not a string: {caption!r}.")
    encoded = tokenizer(
        list(captions),
        add_special_tokens=True,
        truncation=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    for index, input_ids in enumerate(encoded):
        if len(input_ids) <= 2:
            raise ValueError(
                f"Caption {describe(index)} is empty or whitespace only ({captions[index]!r}). "
                "Every caption needs at least one word: fix or remove it."
            )
    num_truncated = sum(len(input_ids) > max_length for input_ids in encoded)
    encoded = [_truncate(input_ids, max_length, tokenizer.sep_token_id) for input_ids in encoded]
    return encoded, num_truncated


class CaptionAugmenter:
    """The paper's caption "size augmentation" (docs/METHOD.md, Recipe).

    Each word is altered with probability `word_prob`. An altered word becomes
    [MASK] (one per sub-token) with probability `mask_prob`, random vocabulary
    tokens (one per sub-token) with probability `random_prob`, and is deleted
    otherwise (50% / 10% / 40% by default). A word is a unit of BERT's
    pre-tokeniser (split at whitespace and punctuation), as in the published
    code; its sub-tokens are its WordPiece pieces.

    Random tokens are drawn from the non-special vocabulary, listed once here.
    Captions longer than `max_length` ids are truncated (keeping [SEP]); the
    first truncation is logged, all are counted in `num_truncated`.
    """

    KEEP, MASK, RANDOM, DELETE = 0, 1, 2, 3

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        word_prob: float = 0.2,
        mask_prob: float = 0.5,
        random_prob: float = 0.1,
        max_length: int = TRAIN_MAX_CAPTION_TOKENS,
    ):
        for name, value in (("word_prob", word_prob), ("mask_prob", mask_prob), ("random_prob", random_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if mask_prob + random_prob > 1:
            raise ValueError(f"mask_prob + random_prob must be at most 1, got {mask_prob} + {random_prob}.")
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 ([CLS], one token, [SEP]), got {max_length}.")
        self.tokenizer = tokenizer
        self.word_prob = word_prob
        self.mask_prob = mask_prob
        self.random_prob = random_prob
        self.max_length = max_length
        special_ids = set(tokenizer.all_special_ids)
        self.random_token_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
        self.num_truncated = 0

    def __call__(self, caption: str, generator: torch.Generator) -> list[int]:
        """Augment one caption; returns its input ids, [CLS] and [SEP] included."""
        encoding = self.tokenizer(caption, add_special_tokens=False, verbose=False)
        token_ids = encoding["input_ids"]
        if not token_ids:
            raise ValueError(f"Caption {caption!r} is empty or whitespace only; every caption needs at least one word.")
        word_of_token = encoding.word_ids()
        num_words = word_of_token[-1] + 1
        actions = self._sample_word_actions(num_words, generator)  # (num_words,)
        random_tokens = self.random_token_ids[
            torch.randint(len(self.random_token_ids), (len(token_ids),), generator=generator)
        ].tolist()  # (num_tokens,)
        augmented = [self.tokenizer.cls_token_id]
        for position, (token_id, word) in enumerate(zip(token_ids, word_of_token)):
            action = actions[word]
            if action == self.KEEP:
                augmented.append(token_id)
            elif action == self.MASK:
                augmented.append(self.tokenizer.mask_token_id)
            elif action == self.RANDOM:
                augmented.append(random_tokens[position])
        augmented.append(self.tokenizer.sep_token_id)
        if len(augmented) > self.max_length:
            if self.num_truncated == 0:
                logger.warning(
                    "A training caption has %d tokens, more than max_length=%d: it is truncated. Later "
                    "truncations are not logged; CaptionAugmenter.num_truncated counts them.",
                    len(augmented),
                    self.max_length,
                )
            self.num_truncated += 1
            augmented = _truncate(augmented, self.max_length, self.tokenizer.sep_token_id)
        return augmented

    def _sample_word_actions(self, num_words: int, generator: torch.Generator) -> list[int]:
        """One of KEEP / MASK / RANDOM / DELETE per word."""
        draws = torch.rand(num_words, generator=generator)
        # As in the published code, one uniform draw decides both whether and how a word is altered.
        within_altered = draws / self.word_prob if self.word_prob > 0 else torch.ones(num_words)
        actions = torch.full((num_words,), self.DELETE)
        actions[within_altered < self.mask_prob + self.random_prob] = self.RANDOM
        actions[within_altered < self.mask_prob] = self.MASK
        actions[draws >= self.word_prob] = self.KEEP
        return actions.tolist()


# ---------------------------------------------------------------------------
# 3. Dataset views
# ---------------------------------------------------------------------------


class _SplitImages:
    """Raw access to the `image` column of a split, decoding here so errors can name the row."""

    def __init__(self, split):
        missing = {"image", "image_id", "captions"} - set(split.column_names)
        if missing:
            raise ValueError(
                f"The dataset split lacks the column(s) {sorted(missing)} (it has {split.column_names}). Build it "
                "with dataset_scripts/build_retrieval_dataset.py or dataset_scripts/synthetic_shapes.py."
            )
        # The arrow format hands out the stored {bytes, path} struct without decoding (and without a copy).
        self.raw_images = split.select_columns(["image"]).with_format("arrow")
        self.image_ids = [int(image_id) for image_id in split["image_id"]]
        self.filenames = list(split["filename"]) if "filename" in split.column_names else [None] * len(split)

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self, row: int) -> str:
        return f"row {row} (image_id {self.image_ids[row]}, file {self.filenames[row]})"

    def load(self, row: int) -> PIL.Image.Image:
        """Decode the image of `row`; raises ValueError naming the row, image id and file if it cannot."""
        stored = self.raw_images[row].column("image")[0].as_py()  # {"bytes": ..., "path": ...}
        try:
            if stored["bytes"] is not None:
                return decode_image(stored["bytes"])
            with open(stored["path"], "rb") as file:
                return decode_image(file.read())
        except (OSError, TypeError) as error:  # the stored path cannot be read
            raise ValueError(
                f"Cannot read the image of {self.describe(row)}: {type(error).__name__}: {error}"
            ) from error
        except ValueError as error:
            raise ValueError(f"Cannot decode the image of {self.describe(row)}: {error}") from error


def _captions_of(split, images: _SplitImages) -> list[list[str]]:
    """The captions column, checked: every row has captions, and none is empty or whitespace only."""
    captions = [list(row_captions) for row_captions in split["captions"]]
    for row, row_captions in enumerate(captions):
        if not row_captions:
            raise ValueError(f"The image of {images.describe(row)} has no captions; remove the row or add captions.")
        for index, caption in enumerate(row_captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"Caption {index} of {images.describe(row)} is empty or whitespace only ({caption!r}). "
                    "Every caption needs at least one word: fix or remove it."
                )
    return captions


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed from (seed, epoch, index): the same wherever and whenever the item is loaded."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class RetrievalTrainDataset(torch.utils.data.Dataset):
    """Every (image, caption) pair of a split once per epoch, augmented.

    Item `i` is the `i`-th caption in row order; its image is decoded from the
    split's stored bytes (images are never copied). Its randomness (crop, flip,
    caption augmentation) comes from a generator seeded by (seed, epoch, i),
    so it does not depend on the DataLoader's worker count or on where a
    resumed run starts. The HF Trainer calls `set_epoch` before each epoch.

    Args:
        split: a `datasets.Dataset` with columns `image`, `image_id`, `captions` (and `filename`).
        image_transform: e.g. `ImageTrainTransform`, called as `(image, generator)`.
        caption_augmenter: e.g. `CaptionAugmenter`, called as `(caption, generator)`.
        seed: base seed of the augmentation.
        on_bad_image: an image that cannot be decoded raises a ValueError naming
            it ("error", the default), or ("skip") makes the item `None` with a
            logged warning, counted in `num_skipped` (per process: each
            DataLoader worker counts its own); `RetrievalCollator` drops such items.

    Items: `{"pixel_values": (3, S, S) float tensor, "input_ids": list[int], "image_id": int}`.
    """

    def __init__(
        self,
        split,
        image_transform: Callable[[PIL.Image.Image, torch.Generator], torch.Tensor],
        caption_augmenter: Callable[[str, torch.Generator], list[int]],
        seed: int = 0,
        on_bad_image: str = "error",
    ):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
        self.images = _SplitImages(split)
        self.image_transform = image_transform
        self.caption_augmenter = caption_augmenter
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.epoch = 0
        self.num_skipped = 0
        captions = _captions_of(split, self.images)
        self.captions = [caption for row_captions in captions for caption in row_captions]
        self.caption_to_image = torch.tensor(
            [row for row, row_captions in enumerate(captions) for _ in row_captions]
        )  # (num_captions,)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict | None:
        row = int(self.caption_to_image[index])
        try:
            image = self.images.load(row)
        except ValueError as error:
            if self.on_bad_image == "error":
                raise ValueError(
                    f"{error}. Rebuild the dataset with dataset_scripts/build_retrieval_dataset.py (it checks "
                    "every image), or pass on_bad_image='skip' to skip such pairs with a counted warning."
                ) from error
            self.num_skipped += 1
            logger.warning("Skipping pair %d: %s (%d pairs skipped so far).", index, error, self.num_skipped)
            return None
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        return {
            "pixel_values": self.image_transform(image, generator),
            "input_ids": self.caption_augmenter(self.captions[index], generator),
            "image_id": self.images.image_ids[row],
        }


class RetrievalEvalImages(torch.utils.data.Dataset):
    """Every image of a split once, for evaluation: items `{"pixel_values": (3, S, S)}`.

    Args:
        split: a `datasets.Dataset` with columns `image`, `image_id`, `captions` (and `filename`).
        image_transform: an `ImageEvalTransform`, any callable image -> (3, S, S)
            tensor, or an image processor (wrapped in `ImageEvalTransform.from_image_processor`).
    An undecodable image raises a ValueError naming it: recall over a partial
    test set would not be comparable.

    Attributes:
        image_ids: LongTensor (num_images,), the `image_id` of each row.
    """

    def __init__(self, split, image_transform: Callable[[PIL.Image.Image], torch.Tensor] | BaseImageProcessor):
        if isinstance(image_transform, BaseImageProcessor):
            image_transform = ImageEvalTransform.from_image_processor(image_transform)
        self.images = _SplitImages(split)
        self.image_transform = image_transform
        self.image_ids = torch.tensor(self.images.image_ids)  # (num_images,)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> dict:
        return {"pixel_values": self.image_transform(self.images.load(row))}


class RetrievalEvalCaptions(torch.utils.data.Dataset):
    """Every caption of a split once, tokenised up front: items `{"input_ids": list[int]}`.

    Captions keep at most `max_length` tokens (90 in the paper); the number
    truncated is logged and kept in `num_truncated`. Any number of captions
    per image works.

    Attributes:
        caption_to_image: LongTensor (num_captions,), the row (index into the
            images view) of each caption's image.
        image_ids: LongTensor (num_images,), the `image_id` of each row.
    """

    def __init__(self, split, tokenizer: PreTrainedTokenizerBase, max_length: int = EVAL_MAX_CAPTION_TOKENS):
        images = _SplitImages(split)
        captions = _captions_of(split, images)
        flat_captions = [caption for row_captions in captions for caption in row_captions]
        rows = [row for row, row_captions in enumerate(captions) for _ in row_captions]
        first_index_of_row = np.cumsum([0] + [len(row_captions) for row_captions in captions])

        def describe(index: int) -> str:
            row = rows[index]
            return f"{index - first_index_of_row[row]} of {images.describe(row)}"

        self.input_ids, self.num_truncated = encode_captions(tokenizer, flat_captions, max_length, describe)
        if self.num_truncated:
            logger.warning("%d captions longer than %d tokens were truncated.", self.num_truncated, max_length)
        self.caption_to_image = torch.tensor(rows)  # (num_captions,)
        self.image_ids = torch.tensor(images.image_ids)  # (num_images,)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index]}


class RetrievalCollator:
    """Batch dataset-view items into the keys of `SCTAModel.forward`.

    Output keys, each present only when the items have the matching field:
    `pixel_values` (B, 3, S, S), `input_ids` and `attention_mask` (B, L) padded
    to the longest caption, `image_ids` (B,) LongTensor. `None` items (images
    skipped by `RetrievalTrainDataset(on_bad_image="skip")`, which logged and
    counted them) are dropped.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        items = [item for item in items if item is not None]
        if not items:
            raise ValueError(
                "Every item of this batch was skipped because its image could not be decoded; "
                "see the warnings above and rebuild the dataset."
            )
        batch = {}
        if "pixel_values" in items[0]:
            batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])  # (B, 3, S, S)
        if "input_ids" in items[0]:
            longest = max(len(item["input_ids"]) for item in items)
            input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)  # (B, L)
            attention_mask = torch.zeros((len(items), longest), dtype=torch.long)  # (B, L)
            for i, item in enumerate(items):
                input_ids[i, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
                attention_mask[i, : len(item["input_ids"])] = 1
            batch["input_ids"] = input_ids
            batch["attention_mask"] = attention_mask
        if "image_id" in items[0]:
            batch["image_ids"] = torch.tensor([item["image_id"] for item in items], dtype=torch.long)  # (B,)
        return batch
