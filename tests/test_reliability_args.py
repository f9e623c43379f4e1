"""Reliability, round 2: arguments checked before work starts, no silent no-op training, no silent overwrite,
clear errors for inputs the towers cannot take, EXIF orientation."""

import io
import os

import datasets
import PIL.Image
import pytest
import torch

from configuration_scta import SCTAConfig
from helpers import (
    random_text_batch,
    run_main,
    tiny_bert_config,
    tiny_run_config,
    tiny_scta_config,
    tiny_vit_config,
    write_config,
)
from modeling_scta import SCTAModel
from processing_scta import SCTAProcessor, convert_to_rgb, decode_image
from scta_train.arguments import SCTATrainingArguments, load_json_arguments, parse_arguments
from scta_train.processing import train_wordpiece_tokenizer


def run(tmp_path, config: dict, *overrides: str, name: str = "run.json"):
    return run_main([write_config(tmp_path / name, config), *overrides])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, synthetic_dir):
    """A model trained for 2 steps, saved with its processor."""
    output_dir = tmp_path_factory.mktemp("saved") / "model"
    config = tiny_run_config(
        synthetic_dir,
        str(output_dir),
        max_steps=2,
        do_eval=False,
        do_predict=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    run_main([write_config(output_dir.parent / "run.json", config)])
    return output_dir


# ---------------------------------------------------------------------------------------------- JSON configs


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("do_train", "false", r"'do_train' is \"false\", but it must be bool \(a JSON true/false"),
        ("lr_decay_epochs", 9, r"'lr_decay_epochs' is 9, but it must be a list of float"),
        ("crop_scale", 0.8, r"'crop_scale' is 0.8, but it must be a list of float"),
        ("learning_rate", "1e-3", r"'learning_rate' is \"1e-3\", but it must be float"),
        ("max_steps", 2.5, r"'max_steps' is 2.5, but it must be int"),
    ],
)
def test_json_values_are_type_checked_naming_key_value_and_type(tmp_path, synthetic_dir, key, value, message):
    config = tiny_run_config(synthetic_dir, str(tmp_path / "out"), **{key: value})
    for overrides in ((), ("--seed", "3")):  # alone and with command-line overrides
        with pytest.raises(ValueError, match=message):
            run(tmp_path, config, *overrides)
    assert not (tmp_path / "out").exists()


def test_misspelt_keys_invalid_json_and_other_shapes_name_the_file(tmp_path, synthetic_dir):
    config = tiny_run_config(synthetic_dir, str(tmp_path / "out"))
    config["learning_rat"] = 1e-3
    with pytest.raises(
        ValueError,
        match=r"run\.json has keys that are not arguments .*'learning_rat' \(did you mean 'learning_rate'\?\)",
    ):
        run(tmp_path, config, "--seed", "3")
    (tmp_path / "bad.json").write_text('{"do_train": true,,}')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON: .* at line 1, column 19"):
        run_main([str(tmp_path / "bad.json")])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json must hold a JSON object .*not a list"):
        run_main([str(tmp_path / "list.json")])
    # an upper-case extension is a config file too, not an unknown positional argument
    del config["learning_rat"]
    config["max_steps"] = 0
    with pytest.raises(ValueError, match="--max_steps must be >= 1"):
        run(tmp_path, config, name="x.JSON")


# ---------------------------------------------------------------------------------------------- settings that failed late


@pytest.mark.parametrize("max_steps", [0, -2])
def test_max_steps_below_one_other_than_minus_one_is_an_error(tmp_path, max_steps):
    with pytest.raises(ValueError, match=rf"--max_steps must be >= 1, or -1 .*got {max_steps}"):
        SCTATrainingArguments(output_dir=str(tmp_path), max_steps=max_steps)


def test_empty_image_limits_and_one_pair_batches_are_refused_up_front(tmp_path, synthetic_dir):
    config = tiny_run_config(synthetic_dir, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--max_train_images must be >= 1"):
        run(tmp_path, {**config, "max_train_images": 0})
    with pytest.raises(ValueError, match=r"global training batch is 1 pair .*the loss compares a pair"):
        run(tmp_path, {**config, "per_device_train_batch_size": 1})
    assert not (tmp_path / "out").exists()


def test_batches_without_negatives_are_counted_and_stop_the_run(tmp_path, synthetic_dir, caplog):
    # one training image: every batch's 5 pairs show it, so the loss has no negative at any step
    config = tiny_run_config(
        synthetic_dir,
        str(tmp_path / "out"),
        max_train_images=1,
        per_device_train_batch_size=5,
        num_train_epochs=20,
        do_eval=False,
        do_predict=False,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    with (
        caplog.at_level("WARNING"),
        pytest.raises(ValueError, match=r"None of the first 10 batches had two different images"),
    ):
        run(tmp_path, config)
    warnings = [r.getMessage() for r in caplog.records if "has no negative" in r.getMessage()]
    assert len(warnings) == 10 and "10 such steps so far" in warnings[-1]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_five_fold_on_a_split_that_is_not_5000_images_fails_before_training(tmp_path, synthetic_dir):
    config = tiny_run_config(synthetic_dir, str(tmp_path / "out"), five_fold_test=True)
    with pytest.raises(ValueError, match=r"--five_fold_test true needs 5,000 images .*'dev' split has 16"):
        run(tmp_path, config)
    written = os.listdir(tmp_path / "out") if (tmp_path / "out").exists() else []
    assert not any(name.startswith("checkpoint") for name in written)


def test_a_head_override_that_changes_weight_shapes_of_a_saved_model_is_named(tmp_path, synthetic_dir, saved_model):
    config = {
        "model_name_or_path": str(saved_model),
        "dataset_dir": synthetic_dir,
        "output_dir": str(tmp_path / "e"),
        "do_train": False,
        "do_eval": True,
        "use_cpu": True,
        "report_to": "none",
        "embed_size": 64,
    }
    with pytest.raises(
        ValueError, match=r"--embed_size 64 would change the shape of weights of the trained model .*embed_size=32"
    ):
        run(tmp_path, config)
    # a setting that changes no weight is fine
    results = run(tmp_path, {**config, "embed_size": None, "margin": 0.3})
    assert results["eval_rsum"] >= 0


def test_evaluation_only_on_a_test_only_dataset(tmp_path, synthetic_dir, saved_model):
    test_only = datasets.DatasetDict({"test": datasets.load_from_disk(synthetic_dir)["test"]})
    test_only.save_to_disk(str(tmp_path / "test_only"))
    config = {
        "model_name_or_path": str(saved_model),
        "dataset_dir": str(tmp_path / "test_only"),
        "output_dir": str(tmp_path / "e"),
        "do_train": False,
        "do_predict": True,
        "use_cpu": True,
        "report_to": "none",
    }
    results = run(tmp_path, config)
    assert results["test_r1_i2t"] >= 0 and not any(name.startswith("eval_") for name in results)
    with pytest.raises(ValueError, match=r"The dataset has no 'dev' split"):
        run(tmp_path, {**config, "do_predict": False, "do_eval": True})


# ---------------------------------------------------------------------------------------------- overwriting a finished run


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_without_the_flag(tmp_path, synthetic_dir):
    output_dir = tmp_path / "out"
    config = tiny_run_config(synthetic_dir, str(output_dir), num_train_epochs=1, do_predict=False)
    run(tmp_path, config)
    weights = (output_dir / "model.safetensors").read_bytes()
    with pytest.raises(
        ValueError, match=r"--output_dir .*out already holds .*model\.safetensors.*--overwrite_output_dir"
    ):
        run(tmp_path, {**config, "seed": 8})
    assert (output_dir / "model.safetensors").read_bytes() == weights
    # evaluating a saved model into its own folder would overwrite its recorded results: refused too
    evaluation = {
        "model_name_or_path": str(output_dir),
        "dataset_dir": synthetic_dir,
        "output_dir": str(output_dir),
        "do_train": False,
        "do_eval": True,
        "use_cpu": True,
        "report_to": "none",
    }
    with pytest.raises(ValueError, match="already holds"):
        run(tmp_path, evaluation)
    run(tmp_path, {**config, "seed": 8, "overwrite_output_dir": True})
    assert (output_dir / "model.safetensors").read_bytes() != weights


# ---------------------------------------------------------------------------------------------- model inputs


def test_token_ids_outside_the_vocabulary_and_too_long_captions_name_the_limit():
    model = SCTAModel(tiny_scta_config()).eval()  # vocabulary 99, 64 positions
    pixel_values = torch.randn(2, 3, 32, 32)
    input_ids, attention_mask = random_text_batch([5, 7])
    bad_ids = input_ids.clone()
    bad_ids[1, 2] = 30522  # a bert-base-uncased id
    with pytest.raises(ValueError, match=r"token id 30522, outside the text tower's vocabulary of 99"):
        model(pixel_values, bad_ids, attention_mask)
    long_ids, long_mask = random_text_batch([70, 5])
    with pytest.raises(
        ValueError, match=r"70 tokens per caption, more than the text tower's 64 positions .*max_position_embeddings=64"
    ):
        model(pixel_values, long_ids, long_mask)


def test_a_text_tower_without_room_for_a_caption_is_refused():
    text_config = tiny_bert_config()
    text_config.max_position_embeddings = 2
    with pytest.raises(ValueError, match=r"text_config\.max_position_embeddings=2 leaves no room for a caption"):
        SCTAConfig.from_vision_text_configs(tiny_vit_config(), text_config)


# ---------------------------------------------------------------------------------------------- EXIF orientation


def portrait_jpeg_stored_on_its_side() -> bytes:
    """A 40 x 20 (w x h) JPEG whose EXIF says: rotate by 90 degrees to view it (orientation 6), i.e. upright 20 x 40."""
    image = PIL.Image.new("RGB", (40, 20), (200, 30, 30))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied_wherever_an_image_is_decoded():
    data = portrait_jpeg_stored_on_its_side()
    assert PIL.Image.open(io.BytesIO(data)).size == (40, 20)  # premise: stored on its side
    assert convert_to_rgb(decode_image(data)).size == (20, 40)  # the dataset views and the builder's check
    assert convert_to_rgb(PIL.Image.open(io.BytesIO(data))).size == (20, 40)  # the processor's path
    upright = PIL.Image.new("RGB", (5, 5))
    assert convert_to_rgb(upright) is upright  # no copy when there is nothing to apply

    processor = SCTAProcessor.from_tokenizer(train_wordpiece_tokenizer(["a red square"], vocab_size=50), image_size=8)
    from_file = processor(images=[PIL.Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"]
    upright_copy = PIL.Image.open(io.BytesIO(data)).transpose(PIL.Image.Transpose.ROTATE_270)
    expected = processor(images=[upright_copy], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_file, expected)


@pytest.mark.parametrize(
    "name", sorted(os.listdir(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")))
)
def test_every_shipped_config_passes_the_type_check(name):
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name)
    config = load_json_arguments(path)
    model_args, data_args, training_args = parse_arguments([path])
    assert training_args.do_train is True and training_args.output_dir == config["output_dir"]
