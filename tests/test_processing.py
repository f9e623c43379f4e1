"""Tests of processing_scta: image modes, tokenizer, processor round trips, augmentation, dataset views."""

import io
import logging

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_without_project
from processing_scta import SCTAProcessor, convert_to_rgb
from scta_train.processing import (
    CaptionAugmenter,
    ImageEvalTransform,
    ImageTrainTransform,
    RetrievalCollator,
    RetrievalEvalCaptions,
    RetrievalEvalImages,
    RetrievalTrainDataset,
    train_wordpiece_tokenizer,
)


CAPTIONS = [
    "A man in an orange hat is looking at something .",
    "Two dogs run across the snowy field .",
    "A child playing in the ocean near some rocks .",
    "None",
    "null",
    "NA",
    "Ein Mann trinkt Kaffee im Café am Straßenrand .",
    "A skateboarder does a kickflip over a staircase .",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(CAPTIONS, vocab_size=200)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return SCTAProcessor.from_tokenizer(tokenizer, image_size=32)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_split(rows: list[tuple[bytes, int, list[str]]]) -> datasets.Dataset:
    """A split in the builder's schema from (image bytes, image_id, captions) rows."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "filename": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for data, _, _ in rows],
            "image_id": [image_id for _, image_id, _ in rows],
            "filename": [f"{image_id}.png" for _, image_id, _ in rows],
            "captions": [captions for _, _, captions in rows],
        },
        features=features,
    )


def noise_rows(captions_per_row: list[list[str]], first_id: int = 100) -> list[tuple[bytes, int, list[str]]]:
    """One random 12x10 image per row (so crops differ), ids first_id, first_id + 1, ..."""
    rng = np.random.default_rng(first_id)
    return [
        (png_bytes(PIL.Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))), first_id + row, captions)
        for row, captions in enumerate(captions_per_row)
    ]


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, expected",
    [
        (PIL.Image.new("1", (4, 4), 1), (255, 255, 255)),
        (PIL.Image.new("L", (4, 4), 77), (77, 77, 77)),
        (PIL.Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # fully transparent black -> white
        (PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (255, 127, 127)),  # half-transparent red on white
        (PIL.Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (PIL.Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (PIL.Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (PIL.Image.new("I;16", (4, 4), 32896), (128, 128, 128)),  # 32896 / 257 = 128
        (PIL.Image.new("I;16B", (4, 4), 257 * 40), (40, 40, 40)),
        (PIL.Image.new("I", (4, 4), 257 * 200), (200, 200, 200)),  # in 16-bit range: scaled as 16-bit
        (PIL.Image.new("F", (4, 4), 0.5), (128, 128, 128)),
    ],
    ids=["1", "L", "LA", "RGBA-half", "RGBA-opaque", "CMYK", "I16-max", "I16-mid", "I16B", "I", "F"],
)
def test_convert_to_rgb_modes(image, expected):
    rgb = convert_to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb)[0, 0], expected, atol=1)


def test_convert_to_rgb_palette_with_and_without_transparency():
    palette_image = PIL.Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    np.testing.assert_array_equal(np.asarray(convert_to_rgb(palette_image))[0, 0], (200, 100, 50))
    palette_image.info["transparency"] = 1  # index 1 is transparent -> white
    np.testing.assert_array_equal(np.asarray(convert_to_rgb(palette_image))[0, 0], (255, 255, 255))


def test_convert_to_rgb_stretches_out_of_range_high_bit_depth():
    # 32-bit integers beyond 16 bits and floats beyond [0, 1] are stretched, not clipped.
    integers = PIL.Image.fromarray(np.array([[0, 1_000_000], [2_000_000, 4_000_000]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(convert_to_rgb(integers))[:, :, 0], [[0, 64], [128, 255]])
    floats = PIL.Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(convert_to_rgb(floats))[:, :, 0], [[0, 64], [128, 255]])


def test_sixteen_bit_png_file_is_scaled_not_clipped():
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    decoded = PIL.Image.open(io.BytesIO(png_bytes(PIL.Image.fromarray(values))))
    rgb = np.asarray(convert_to_rgb(decoded))
    np.testing.assert_array_equal(rgb[:, :, 1], np.round(values / 257).astype(np.uint8))


def test_eval_transform_matches_processor(processor):
    images = [PIL.Image.new("RGB", (50, 37), (200, 10, 90)), PIL.Image.new("L", (20, 64), 30)]
    images[0].paste((0, 250, 0), (10, 5, 30, 20))
    expected = processor(images=images, return_tensors="pt")["pixel_values"]  # (2, 3, 32, 32)
    transform = ImageEvalTransform.from_image_processor(processor.image_processor)
    for image, pixel_values in zip(images, expected):
        torch.testing.assert_close(transform(image), pixel_values, atol=1e-5, rtol=0)


def test_train_transform_is_deterministic_and_random_across_seeds():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    transform = ImageTrainTransform(image_size=16)
    first = transform(image, torch.Generator().manual_seed(3))
    again = transform(image, torch.Generator().manual_seed(3))
    assert first.shape == (3, 16, 16) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    others = [transform(image, torch.Generator().manual_seed(seed)) for seed in range(4, 8)]
    assert all(not torch.equal(first, other) for other in others)


def test_train_transform_flip_is_switchable():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    eval_pixels = ImageEvalTransform(image_size=24)(image)
    # A crop of the whole image with aspect ratio 1 leaves only the flip random.
    no_flip = ImageTrainTransform(image_size=24, scale=(1, 1), ratio=(1, 1), horizontal_flip=False)
    for seed in range(8):
        torch.testing.assert_close(no_flip(image, torch.Generator().manual_seed(seed)), eval_pixels, atol=1e-5, rtol=0)
    flip = ImageTrainTransform(image_size=24, scale=(1, 1), ratio=(1, 1), horizontal_flip=True)
    outputs = [flip(image, torch.Generator().manual_seed(seed)) for seed in range(16)]
    num_flipped = sum(torch.allclose(output, eval_pixels.flip(-1), atol=1e-5) for output in outputs)
    num_kept = sum(torch.allclose(output, eval_pixels, atol=1e-5) for output in outputs)
    assert num_flipped + num_kept == 16 and 0 < num_flipped < 16


# ---------------------------------------------------------------------------
# Tokenizer and processor
# ---------------------------------------------------------------------------


def test_wordpiece_tokenizer_is_deterministic_and_spells_unknown_words(tokenizer):
    again = train_wordpiece_tokenizer(list(CAPTIONS), vocab_size=200)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert tokenizer.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = tokenizer.tokenize("hats")  # "hat" is in the vocabulary, "hats" is not
    assert "[UNK]" not in tokens and "".join(token.removeprefix("##") for token in tokens) == "hats"
    with pytest.raises(ValueError, match="vocab_size=10 is too small"):
        train_wordpiece_tokenizer(CAPTIONS, vocab_size=10)


def test_processor_text_outputs(processor, tokenizer):
    batch = processor(text=["A man .", "None", "null", "NA"], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 5)
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 3, 3]
    assert batch["input_ids"][1:, 3:].eq(tokenizer.pad_token_id).all()
    # "None", "null" and "NA" are text: tokenised like any other word.
    for row, word in zip(batch["input_ids"][1:], ["none", "null", "na"]):
        assert tokenizer.convert_ids_to_tokens(row[:3].tolist()) == ["[CLS]", word, "[SEP]"]


@pytest.mark.parametrize("bad_caption", ["", "   ", "\t\n"])
def test_empty_caption_is_an_error_naming_its_index(processor, bad_caption):
    with pytest.raises(ValueError, match=r"Caption at index 1 of the batch is empty or whitespace only"):
        processor(text=["a dog", bad_caption, "a cat"])


def test_long_captions_are_truncated_with_a_count(processor, tokenizer, caplog):
    long_caption = " ".join(["dog"] * 600)  # 1,802 tokens with [CLS] and [SEP] (d ##o ##g)
    with caplog.at_level(logging.WARNING):
        batch = processor(text=[long_caption, "a dog", long_caption], return_tensors="pt")
    assert batch["input_ids"].shape == (3, 90)
    assert batch["input_ids"][0, -1].item() == tokenizer.sep_token_id
    assert "2 of 3 captions longer than 90 tokens were truncated" in caplog.text
    assert processor(text=long_caption, max_length=512, return_tensors="pt")["input_ids"].shape == (1, 512)


def test_captions_are_tokenized_once_unless_they_reach_the_limit(processor, monkeypatch, caplog):
    """The checks read the tokenization itself; only a caption of exactly max_length tokens (cut or not?) is
    tokenized again, without truncation, to tell: one that fits exactly is not counted as truncated."""
    calls = []
    tokenizer_type = type(processor.tokenizer)
    original = tokenizer_type.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(list(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_type, "__call__", counting)
    processor(text=["a dog", "a red circle"], return_tensors="pt")
    assert len(calls) == 1
    calls.clear()
    exact = " ".join(["a"] * 88)  # 88 one-token words + [CLS] + [SEP] = 90 tokens: fits exactly
    with caplog.at_level(logging.WARNING):
        processor(text=["a dog", exact], return_tensors="pt")
    assert calls == [["a dog", exact], [exact]] and "truncated" not in caplog.text


def test_non_ascii_captions(processor, tokenizer):
    batch = processor(text=["Ein Mann trinkt Kaffee im Café", "日本 😀 naïve"], return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert "cafe" in tokens  # lower-cased and accent-stripped, as BERT uncased
    assert batch["attention_mask"][1].sum() > 2


def test_processor_images_of_any_mode(processor):
    images = [PIL.Image.new(mode, (40, 30)) for mode in ("L", "RGBA", "P", "CMYK", "I;16", "RGB")]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (6, 3, 32, 32)
    with pytest.raises(ValueError, match="Image at index 0 of the batch is a ndarray"):
        processor(images=[np.zeros((4, 4, 3), dtype=np.uint8)])


def _example_inputs():
    images = [PIL.Image.new("RGB", (50, 40), (10, 200, 30)), PIL.Image.new("L", (33, 33), 99)]
    return images, ["a man in an orange hat", "two dogs run across the snowy field ."]


def test_processor_save_load_round_trip(processor, tmp_path):
    images, texts = _example_inputs()
    expected = processor(images=images, text=texts, return_tensors="pt")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_scta.py").is_file()
    reloaded = SCTAProcessor.from_pretrained(tmp_path)
    actual = reloaded(images=images, text=texts, return_tensors="pt")
    assert set(actual) == {"pixel_values", "input_ids", "attention_mask"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0)


@pytest.mark.slow
def test_auto_processor_loads_in_a_process_without_the_project(processor, tmp_path):
    """A saved folder is self-contained remote code: AutoProcessor loads it where the repo is not importable."""
    images, texts = _example_inputs()
    folder = tmp_path / "scta_processor"
    processor.save_pretrained(folder)
    save_file(dict(processor(images=images, text=texts, return_tensors="pt")), tmp_path / "expected.safetensors")
    script = f"""
        import PIL.Image
        from safetensors.torch import save_file
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "SCTAProcessor"
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        images = [PIL.Image.new("RGB", (50, 40), (10, 200, 30)), PIL.Image.new("L", (33, 33), 99)]
        batch = processor(images=images, text={texts!r}, return_tensors="pt")
        save_file(dict(batch), {str(tmp_path / "actual.safetensors")!r})
        """
    run_without_project(script, tmp_path)
    expected, actual = load_file(tmp_path / "expected.safetensors"), load_file(tmp_path / "actual.safetensors")
    assert set(actual) == set(expected) == {"pixel_values", "input_ids", "attention_mask"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0)


# ---------------------------------------------------------------------------
# Caption augmentation
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def augmentation_tokenizer():
    words = [f"word{index}" for index in range(300)]
    return train_wordpiece_tokenizer([" ".join(words), "dog"], vocab_size=1000)


def test_caption_augmentation_statistics(augmentation_tokenizer):
    """≈20% of words altered; of those ≈50% [MASK], 10% random token, 40% deleted."""
    tokenizer = augmentation_tokenizer
    augmenter = CaptionAugmenter(tokenizer)
    generator = torch.Generator().manual_seed(0)
    dog = tokenizer.convert_tokens_to_ids("dog")
    num_words, masked, replaced, kept = 0, 0, 0, 0
    for _ in range(200):
        caption_words = 100
        input_ids = augmenter(" ".join(["dog"] * caption_words), generator)
        assert input_ids[0] == tokenizer.cls_token_id and input_ids[-1] == tokenizer.sep_token_id
        body = input_ids[1:-1]
        num_words += caption_words
        masked += body.count(tokenizer.mask_token_id)
        kept += body.count(dog)
        replaced += len(body) - body.count(tokenizer.mask_token_id) - body.count(dog)
        assert not set(body) & (set(tokenizer.all_special_ids) - {tokenizer.mask_token_id})
    altered = num_words - kept
    deleted = num_words - masked - replaced - kept
    # 20,000 words, ~4,000 altered: binomial standard deviations are 0.3% and under 1%.
    assert altered / num_words == pytest.approx(0.2, abs=0.015)
    assert masked / altered == pytest.approx(0.5, abs=0.04)
    assert replaced / altered == pytest.approx(0.1, abs=0.025)
    assert deleted / altered == pytest.approx(0.4, abs=0.04)


def test_caption_augmentation_is_deterministic_per_seed(augmentation_tokenizer):
    augmenter = CaptionAugmenter(augmentation_tokenizer)
    caption = " ".join(f"word{index}" for index in range(60))
    first = augmenter(caption, torch.Generator().manual_seed(7))
    assert first == augmenter(caption, torch.Generator().manual_seed(7))
    assert first != augmenter(caption, torch.Generator().manual_seed(8))


def test_altered_words_act_on_every_sub_token(augmentation_tokenizer):
    tokenizer = augmentation_tokenizer
    sub_tokens = tokenizer.tokenize("dogword")  # not in the vocabulary: spelled out in pieces
    assert len(sub_tokens) > 1
    generator = torch.Generator().manual_seed(0)
    masked = CaptionAugmenter(tokenizer, word_prob=1.0, mask_prob=1.0, random_prob=0.0)("dogword dog", generator)
    assert masked == [tokenizer.cls_token_id] + [tokenizer.mask_token_id] * (len(sub_tokens) + 1) + [
        tokenizer.sep_token_id
    ]
    replaced = CaptionAugmenter(tokenizer, word_prob=1.0, mask_prob=0.0, random_prob=1.0)("dogword dog", generator)
    assert len(replaced) == len(sub_tokens) + 3
    deleted = CaptionAugmenter(tokenizer, word_prob=1.0, mask_prob=0.0, random_prob=0.0)("dogword dog", generator)
    assert deleted == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    unchanged = CaptionAugmenter(tokenizer, word_prob=0.0)("dogword dog", generator)
    assert unchanged == tokenizer("dogword dog")["input_ids"]


def test_caption_augmenter_truncates_with_a_count(augmentation_tokenizer, caplog):
    augmenter = CaptionAugmenter(augmentation_tokenizer, word_prob=0.0, max_length=512)
    generator = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            input_ids = augmenter(" ".join(["dog"] * 600), generator)
    assert len(input_ids) == 512 and input_ids[-1] == augmentation_tokenizer.sep_token_id
    assert augmenter.num_truncated == 3
    assert len(caplog.records) == 1 and "602 tokens, more than max_length=512" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(word_prob=1.5), "word_prob must be in"),
        (dict(mask_prob=0.8, random_prob=0.3), "mask_prob \\+ random_prob"),
        (dict(max_length=2), "max_length must be at least 3"),
    ],
)
def test_caption_augmenter_rejects_bad_settings(augmentation_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaptionAugmenter(augmentation_tokenizer, **kwargs)


# ---------------------------------------------------------------------------
# Dataset views and collator
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
    captions = [
        ["a man in an orange hat", "a hat", "a man", "orange", "a man and a hat"],
        ["two dogs run", "dogs", "two dogs", "dogs run", "snow"],
        ["a child", "the ocean", "rocks", "a child playing", "playing"],
    ]
    return make_split(noise_rows(captions))


def identity_train_dataset(split, tokenizer, **kwargs):
    """A train view without caption changes, so items can be matched to captions."""
    return RetrievalTrainDataset(
        split, ImageTrainTransform(image_size=16), CaptionAugmenter(tokenizer, word_prob=0.0), **kwargs
    )


def test_train_view_yields_every_pair_once_per_epoch(split, tokenizer):
    dataset = identity_train_dataset(split, tokenizer)
    assert len(dataset) == 15
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 16, 16)
        seen.add((item["image_id"], tokenizer.decode(item["input_ids"], skip_special_tokens=True)))
    expected = {
        (image_id, caption) for image_id, captions in zip(split["image_id"], split["captions"]) for caption in captions
    }
    assert seen == expected


def test_train_view_randomness_depends_on_seed_epoch_index_only(split, tokenizer):
    dataset = RetrievalTrainDataset(split, ImageTrainTransform(image_size=16), CaptionAugmenter(tokenizer), seed=5)
    in_order = [dataset[index] for index in range(len(dataset))]
    in_reverse = [dataset[index] for index in reversed(range(len(dataset)))][::-1]
    for a, b in zip(in_order, in_reverse):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=0, rtol=0)
        assert a["input_ids"] == b["input_ids"]
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], in_order[0]["pixel_values"])
    dataset.set_epoch(0)
    torch.testing.assert_close(dataset[0]["pixel_values"], in_order[0]["pixel_values"], atol=0, rtol=0)


def test_train_view_batches_do_not_depend_on_worker_count(split, tokenizer):
    dataset = RetrievalTrainDataset(split, ImageTrainTransform(image_size=16), CaptionAugmenter(tokenizer), seed=1)
    collator = RetrievalCollator(tokenizer.pad_token_id)

    def batches(num_workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collator, num_workers=num_workers)
        return list(loader)

    for serial, parallel in zip(batches(0), batches(2)):
        for key in serial:
            torch.testing.assert_close(serial[key], parallel[key], atol=0, rtol=0)


def test_eval_views_encode_each_image_and_caption_once(tokenizer, processor):
    captions = [
        ["a dog"],
        ["a cat", "two cats", "cats", "a cat sleeps", "cat", "cats play"],
        ["a hat", "hats", "a red hat"],
    ]
    split = make_split(noise_rows(captions, first_id=7))
    images = RetrievalEvalImages(split, processor.image_processor)
    texts = RetrievalEvalCaptions(split, tokenizer)
    assert len(images) == 3 and len(texts) == 10
    assert images.image_ids.tolist() == texts.image_ids.tolist() == [7, 8, 9]
    assert texts.caption_to_image.tolist() == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    decoded = [tokenizer.decode(texts[index]["input_ids"], skip_special_tokens=True) for index in range(10)]
    assert decoded == [caption for row in captions for caption in row]
    expected = processor(images=[split[row]["image"] for row in range(3)], return_tensors="pt")["pixel_values"]
    for row in range(3):
        assert set(images[row]) == {"pixel_values"}
        torch.testing.assert_close(images[row]["pixel_values"], expected[row], atol=1e-5, rtol=0)


def test_eval_captions_are_truncated_to_90_tokens_with_a_count(tokenizer, caplog):
    split = make_split(noise_rows([["a man", " ".join(["man"] * 200)], [" ".join(["hat"] * 95)]]))
    with caplog.at_level(logging.WARNING):
        texts = RetrievalEvalCaptions(split, tokenizer)
    assert texts.num_truncated == 2
    assert [len(texts[index]["input_ids"]) for index in range(3)] == [4, 90, 90]
    assert "2 captions longer than 90 tokens were truncated" in caplog.text


def test_eval_captions_name_an_empty_caption(tokenizer):
    split = make_split(noise_rows([["a dog"], ["a cat", "  "]], first_id=40))
    with pytest.raises(
        ValueError, match=r"Caption 1 of row 1 \(image_id 41, file 41.png\) is empty or whitespace only"
    ):
        RetrievalEvalCaptions(split, tokenizer)


def test_train_view_names_an_empty_caption(tokenizer):
    split = make_split(noise_rows([["a dog", "a cat"], ["a hat", "\t "]], first_id=40))
    with pytest.raises(
        ValueError, match=r"Caption 1 of row 1 \(image_id 41, file 41.png\) is empty or whitespace only"
    ):
        identity_train_dataset(split, tokenizer)


def test_collator_keys_and_shapes(split, tokenizer):
    collator = RetrievalCollator(tokenizer.pad_token_id)
    train_batch = collator([identity_train_dataset(split, tokenizer)[index] for index in (0, 6, 12)])
    assert set(train_batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert train_batch["pixel_values"].shape == (3, 3, 16, 16)
    assert train_batch["input_ids"].shape == train_batch["attention_mask"].shape
    assert train_batch["image_ids"].tolist() == [100, 101, 102] and train_batch["image_ids"].dtype == torch.long
    lengths = train_batch["attention_mask"].sum(1)
    assert lengths.max() == train_batch["input_ids"].shape[1]
    assert all(row[length:].eq(tokenizer.pad_token_id).all() for row, length in zip(train_batch["input_ids"], lengths))

    image_batch = collator([RetrievalEvalImages(split, ImageEvalTransform(16))[row] for row in range(3)])
    assert set(image_batch) == {"pixel_values"} and image_batch["pixel_values"].shape == (3, 3, 16, 16)
    texts = RetrievalEvalCaptions(split, tokenizer)
    caption_batch = collator([texts[index] for index in range(4)])
    assert set(caption_batch) == {"input_ids", "attention_mask"} and caption_batch["input_ids"].shape[0] == 4


def test_bad_image_at_training_time_errors_by_default(tokenizer):
    rows = noise_rows([["a dog"], ["a cat"], ["a hat"]])
    rows[1] = (b"this is not an image", rows[1][1], rows[1][2])
    dataset = identity_train_dataset(make_split(rows), tokenizer)
    assert dataset[0] is not None
    with pytest.raises(ValueError, match=r"row 1 \(image_id 101, file 101.png\).*on_bad_image='skip'"):
        dataset[1]
    with pytest.raises(ValueError, match=r"row 1 \(image_id 101"):
        RetrievalEvalImages(make_split(rows), ImageEvalTransform(16))[1]


def test_bad_image_at_training_time_is_skipped_and_counted(tokenizer, caplog):
    rows = noise_rows([["a dog", "dogs"], ["a cat", "cats"], ["a hat", "hats"]])
    truncated_png = rows[2][0][: len(rows[2][0]) // 2]
    rows[2] = (truncated_png, rows[2][1], rows[2][2])
    dataset = identity_train_dataset(make_split(rows), tokenizer, on_bad_image="skip")
    with caplog.at_level(logging.WARNING):
        items = [dataset[index] for index in range(len(dataset))]
    assert [item is None for item in items] == [False] * 4 + [True] * 2
    assert dataset.num_skipped == 2
    assert caplog.text.count("Skipping pair") == 2 and "image_id 102" in caplog.text
    batch = RetrievalCollator(tokenizer.pad_token_id)(items)
    assert batch["image_ids"].tolist() == [100, 100, 101, 101]
    with pytest.raises(ValueError, match="Every item of this batch was skipped"):
        RetrievalCollator(tokenizer.pad_token_id)(items[4:])
    with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip'"):
        identity_train_dataset(make_split(rows), tokenizer, on_bad_image="ignore")
