"""SCTAModel: shapes, the batched head against the loop oracles, loss, gradients, save/load, remote code."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertModel, ViTModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from configuration_scta import SCTAConfig
from helpers import (
    CAPTION_LENGTHS,
    SCTAModelTester,
    make_head,
    random_tokens,
    run_without_project,
    tiny_bert_config,
    tiny_scta_config,
    tiny_vit_config,
)
from modeling_scta import KeyTokenAlignmentHead, SCTAModel, hinge_loss_one_direction, scta_loss
from scta_train.reference import reference_similarity, reference_similarity_loop


# ---------------------------------------------------------------------------------------------- config


def test_default_config_matches_the_paper():
    config = SCTAConfig()
    assert config.vision_config.model_type == "vit" and config.text_config.model_type == "bert"
    assert (config.embed_size, config.patch_keep_ratio, config.patch_aggr_ratio, config.word_keep_ratio) == (
        512,
        0.5,
        0.3,
        0.75,
    )
    assert (config.min_word_slots, config.max_word_slots, config.margin) == (4, 100, 0.2)
    assert config.vision_has_cls_token and config.num_patches == 196
    assert config.num_kept_patches == 98 and config.num_patch_slots == 29


def test_swin_tower_has_no_cls_and_merged_patches():
    config = tiny_scta_config("swin")
    assert not config.vision_has_cls_token
    assert config.num_patches == 16
    swin_b = SCTAConfig(
        vision_config={"model_type": "swin", "image_size": 224, "patch_size": 4, "depths": [2, 2, 18, 2]}
    )
    assert swin_b.num_patches == 49 and not swin_b.vision_has_cls_token


def test_config_round_trip(tmp_path):
    config = tiny_scta_config(word_aggregation=False, margin=0.3)
    config.save_pretrained(tmp_path)
    loaded = SCTAConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert "num_patches" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "field, value",
    [
        ("patch_keep_ratio", 0.0),
        ("patch_keep_ratio", 1.0),
        ("patch_keep_ratio", -0.5),
        ("patch_aggr_ratio", 0.0),
        ("patch_aggr_ratio", 1.5),
        ("word_keep_ratio", 0.0),
        ("word_keep_ratio", 2.0),
        ("min_word_slots", 0),
        ("max_word_slots", 2),
        ("aggregator_hidden_ratio", 0.0),
        ("alignment_negative_slope", -0.1),
        ("alignment_negative_slope", 1.5),
        ("margin", -0.2),
        ("embed_size", 0),
    ],
)
def test_out_of_range_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value}.*accepted range"):
        SCTAConfig(**{field: value})


def test_ratios_leaving_no_slot_or_no_dropped_patch_are_refused():
    with pytest.raises(ValueError, match="patch_keep_ratio=0.999.*keeps all 196"):
        SCTAConfig(patch_keep_ratio=0.999)
    with pytest.raises(ValueError, match="0 patch slots"):
        SCTAConfig(patch_keep_ratio=0.01, patch_aggr_ratio=0.1)


def test_unknown_towers_are_refused():
    with pytest.raises(ValueError, match="vision_config.model_type='resnet' is not a supported image tower"):
        SCTAConfig(vision_config={"model_type": "resnet"})
    with pytest.raises(ValueError, match="text_config.model_type='gpt2' is not a supported text tower"):
        SCTAConfig(text_config={"model_type": "gpt2"})


def test_settings_edited_after_construction_are_checked_by_the_model():
    config = tiny_scta_config()
    config.word_keep_ratio = 3.0
    with pytest.raises(ValueError, match="word_keep_ratio=3.0"):
        SCTAModel(config)


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("vision", ["vit", "swin"])
@pytest.mark.parametrize("word_aggregation", [True, False])
def test_output_fields_and_shapes(vision, word_aggregation):
    SCTAModelTester(vision, word_aggregation=word_aggregation).check_outputs()


def test_towers_have_no_pooler_and_features_have_documented_shapes():
    tester = SCTAModelTester()
    model = tester.model
    assert model.vision_model.pooler is None and model.text_model.pooler is None
    image_features = model.get_image_features(tester.pixel_values)
    text_features = model.get_text_features(tester.input_ids, tester.attention_mask)
    assert isinstance(image_features, BaseModelOutputWithPooling)
    assert isinstance(text_features, BaseModelOutputWithPooling)
    assert image_features.last_hidden_state.shape == (3, 17, 24)
    assert text_features.last_hidden_state.shape == (3, 9, 24)
    assert image_features.pooler_output.shape == text_features.pooler_output.shape == (3, 24)
    scores = model.similarity(image_features.last_hidden_state, text_features.last_hidden_state, tester.attention_mask)
    outputs = model(tester.pixel_values, tester.input_ids, tester.attention_mask)
    assert torch.equal(scores, outputs.logits_per_image)
    assert torch.equal(image_features.pooler_output, outputs.image_global_embeds)
    assert torch.equal(text_features.pooler_output, outputs.text_global_embeds)


def test_forward_rejects_mismatched_inputs():
    tester = SCTAModelTester()
    model = tester.model
    with pytest.raises(ValueError, match=r"image_ids must have one id per image, shape \(3,\)"):
        model(tester.pixel_values, tester.input_ids, tester.attention_mask, image_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs \\(image, caption\\) pairs, but got 2 images and 3 captions"):
        model(tester.pixel_values[:2], tester.input_ids, tester.attention_mask, return_loss=True)
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        model(tester.pixel_values, tester.input_ids, tester.attention_mask[:, :4])
    left_padded = tester.attention_mask.flip(1)
    with pytest.raises(ValueError, match="not right-padded"):
        model(tester.pixel_values, tester.input_ids, left_padded)
    too_short = tester.attention_mask.clone()
    too_short[1, 1:] = 0
    with pytest.raises(ValueError, match="caption 1 has 1 real token"):
        model(tester.pixel_values, tester.input_ids, too_short)
    with pytest.raises(ValueError, match=r"image tokens must be \(batch, 17, embed_size\)"):
        model.similarity(torch.randn(2, 12, 24), torch.randn(3, 9, 24), tester.attention_mask)


# ---------------------------------------------------------------------------------------------- head vs oracle


@pytest.mark.parametrize("vision_has_cls_token", [True, False])
@pytest.mark.parametrize("word_aggregation", [True, False])
def test_batched_head_equals_per_pair_oracle(vision_has_cls_token, word_aggregation):
    head = make_head(vision_has_cls_token, word_aggregation)
    image_tokens, text_tokens, text_mask = random_tokens(5, CAPTION_LENGTHS, head)
    with torch.no_grad():
        oracle = reference_similarity(head, image_tokens, text_tokens, text_mask)
        batched = head(image_tokens, text_tokens, text_mask, image_chunk_size=2, text_chunk_size=4)
        loop = reference_similarity_loop(head, image_tokens, text_tokens, text_mask)
    torch.testing.assert_close(batched, oracle, atol=1e-10, rtol=0)
    torch.testing.assert_close(loop, oracle, atol=1e-10, rtol=0)


@pytest.mark.parametrize("vision_has_cls_token", [True, False])
def test_batched_head_equals_oracle_in_float32(vision_has_cls_token):
    head = make_head(vision_has_cls_token, dtype=torch.float32)
    image_tokens, text_tokens, text_mask = random_tokens(6, CAPTION_LENGTHS, head, dtype=torch.float32)
    with torch.no_grad():
        oracle = reference_similarity(head, image_tokens, text_tokens, text_mask)
        batched = head(image_tokens, text_tokens, text_mask)
    torch.testing.assert_close(batched, oracle, atol=1e-5, rtol=0)


def test_batched_head_at_the_papers_shapes_equals_the_published_loop():
    """196 patches + [CLS], width 512, K = 98, M = 29, float32."""
    torch.manual_seed(0)
    head = KeyTokenAlignmentHead(embed_size=512, num_patches=196, vision_has_cls_token=True)
    generator = torch.Generator().manual_seed(0)
    image_tokens = torch.randn(4, 197, 512, generator=generator)
    lengths = torch.tensor([5, 11, 14, 19, 30])
    text_tokens = torch.randn(5, 32, 512, generator=generator)
    text_mask = (torch.arange(32)[None] < lengths[:, None]).long()
    with torch.no_grad():
        loop = reference_similarity_loop(head, image_tokens, text_tokens, text_mask)
        batched = head(image_tokens, text_tokens, text_mask)
    assert head.num_kept_patches == 98 and head.num_patch_slots == 29
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)


def test_gradients_equal_the_oracles():
    head = make_head()
    image_tokens, text_tokens, text_mask = random_tokens(4, [3, 6, 11, 25, 40], head)
    image_tokens.requires_grad_(True)
    text_tokens.requires_grad_(True)
    weights = torch.randn(4, 5, dtype=torch.float64)
    inputs = [image_tokens, text_tokens, *head.parameters()]

    oracle = (reference_similarity(head, image_tokens, text_tokens, text_mask) * weights).sum()
    expected = torch.autograd.grad(oracle, inputs)
    batched = (head(image_tokens, text_tokens, text_mask, image_chunk_size=3, text_chunk_size=2) * weights).sum()
    actual = torch.autograd.grad(batched, inputs)
    for name, got, want in zip(["image_tokens", "text_tokens", *dict(head.named_parameters())], actual, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8, msg=f"gradient of {name}")


def test_sharp_aggregator_is_scored_in_wider_precision_and_stays_exact():
    head = make_head(dtype=torch.float32)
    image_tokens, text_tokens, text_mask = random_tokens(3, [4, 9, 17], head, dtype=torch.float32)
    with torch.no_grad():
        head.patch_aggregator.scale.fill_(300.0)
        logits = head.patch_aggregator(image_tokens[:, 1:])
        spread = logits.amax(1) - logits.kthvalue(head.num_kept_patches, dim=1).values
        assert spread.max() > 88, "premise: exp of these logit differences overflows float32"
        expected = reference_similarity(head.double(), image_tokens.double(), text_tokens.double(), text_mask)
        head.float()
        batched = head(image_tokens, text_tokens, text_mask)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched.double(), expected, atol=1e-5, rtol=0)


def test_diverged_aggregator_is_an_error_not_nan():
    head = make_head()
    image_tokens, text_tokens, text_mask = random_tokens(2, [5, 6], head)
    with torch.no_grad():
        head.patch_aggregator.scale.fill_(1e6)
        with pytest.raises(FloatingPointError, match="has diverged"):
            head(image_tokens, text_tokens, text_mask)


# ---------------------------------------------------------------------------------------------- invariances


def test_scores_do_not_depend_on_batch_composition_padding_or_chunks():
    head = make_head(dtype=torch.float32)
    image_tokens, text_tokens, text_mask = random_tokens(7, CAPTION_LENGTHS, head, dtype=torch.float32)
    with torch.no_grad():
        full = head(image_tokens, text_tokens, text_mask)
        again = head(image_tokens, text_tokens, text_mask)
        assert torch.equal(full, again), "the same inputs must give the same scores"
        # a subset of images and captions, in another order
        images, captions = torch.tensor([5, 0, 3]), torch.tensor([9, 2, 6, 0])
        subset = head(image_tokens[images], text_tokens[captions], text_mask[captions])
        torch.testing.assert_close(subset, full[images][:, captions], atol=1e-6, rtol=0)
        # more padding
        padded_tokens = torch.cat([text_tokens, torch.randn(len(text_tokens), 9, 32)], dim=1)
        padded_mask = torch.cat([text_mask, torch.zeros(len(text_mask), 9, dtype=text_mask.dtype)], dim=1)
        torch.testing.assert_close(head(image_tokens, padded_tokens, padded_mask), full, atol=1e-6, rtol=0)
        # other block shapes
        for chunks in [(1, 1), (2, 5), (100, 100)]:
            torch.testing.assert_close(head(image_tokens, text_tokens, text_mask, *chunks), full, atol=1e-6, rtol=0)


def test_model_scores_do_not_depend_on_batch_composition():
    tester = SCTAModelTester()
    model = tester.model
    with torch.no_grad():
        full = model(tester.pixel_values, tester.input_ids, tester.attention_mask).logits_per_image
        one_pair = model(tester.pixel_values[2:], tester.input_ids[1:2, :5], tester.attention_mask[1:2, :5])
    torch.testing.assert_close(one_pair.logits_per_image[0, 0], full[2, 1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- loss


def test_loss_on_a_hand_built_matrix():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.4, 0.7]])
    # image->text, rows: [0.2+0.8-0.9, 0.2+0.1-0.9] = [0.1, 0]; [0.2+0.3-0.5, 0.2+0.6-0.5] = [0, 0.3];
    # [0.2+0.2-0.7, 0.2+0.4-0.7] = [0, 0]
    # text->image, columns: [0.2+0.3-0.9, 0.2+0.2-0.9] = [0, 0]; [0.2+0.8-0.5, 0.2+0.4-0.5] = [0.5, 0.1];
    # [0.2+0.1-0.7, 0.2+0.6-0.7] = [0, 0.1]
    assert scta_loss(scores, hardest_negative=False).item() == pytest.approx(0.1 + 0.3 + 0.5 + 0.1 + 0.1)
    assert scta_loss(scores, hardest_negative=True).item() == pytest.approx(0.1 + 0.3 + 0.0 + 0.0 + 0.5 + 0.1)
    # pairs 1 and 2 show the same image: (1, 2) and (2, 1) are positives, not negatives
    same_image = torch.tensor([7, 3, 3])
    assert scta_loss(scores, same_image, hardest_negative=False).item() == pytest.approx(0.1 + 0.5)
    assert scta_loss(scores, same_image, hardest_negative=True).item() == pytest.approx(0.1 + 0.5)
    assert scta_loss(scores, margin=0.0, hardest_negative=False).item() == pytest.approx(0.1 + 0.3)


def test_loss_one_direction_on_a_strip_matches_the_square_loss():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 6, generator=generator)
    image_ids = torch.tensor([0, 1, 1, 2, 3, 4])
    positive_mask = image_ids[:, None] == image_ids[None, :]
    # queries 2..3 against every candidate, as one process of two would compute them
    strip = hinge_loss_one_direction(scores[2:4], scores.diagonal()[2:4], positive_mask[2:4])
    rest = hinge_loss_one_direction(scores[[0, 1, 4, 5]], scores.diagonal()[[0, 1, 4, 5]], positive_mask[[0, 1, 4, 5]])
    full_rows = hinge_loss_one_direction(scores, scores.diagonal(), positive_mask)
    assert (strip + rest).item() == pytest.approx(full_rows.item())


def test_infonce_loss_is_clips_symmetric_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 5, generator=generator) * 2 - 1
    logit_scale = torch.tensor(2.0)
    logits = logit_scale.exp() * scores
    targets = torch.arange(5)
    clip = (
        torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.t(), targets)
    ) / 2
    torch.testing.assert_close(scta_loss(scores, logit_scale=logit_scale), clip)
    # margin and the hinge's phase do not enter InfoNCE
    torch.testing.assert_close(scta_loss(scores, margin=0.7, hardest_negative=False, logit_scale=logit_scale), clip)
    # the scale is clamped at log(100), as CLIP's
    torch.testing.assert_close(
        scta_loss(scores, logit_scale=torch.tensor(9.0)), scta_loss(scores, logit_scale=torch.tensor(4.6052))
    )


def test_infonce_leaves_other_positives_out_of_the_softmax():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.4, 0.7]])
    same_image = torch.tensor([7, 3, 3])  # pairs 1 and 2 show one image
    # by hand: each query's own positive against the candidates of other images only
    image_to_text = [
        -torch.log_softmax(torch.tensor([0.9, 0.8, 0.1]), 0)[0],
        -torch.log_softmax(torch.tensor([0.5, 0.3]), 0)[0],  # row 1: column 2 (same image) left out
        -torch.log_softmax(torch.tensor([0.7, 0.2]), 0)[0],
    ]
    text_to_image = [
        -torch.log_softmax(torch.tensor([0.9, 0.3, 0.2]), 0)[0],
        -torch.log_softmax(torch.tensor([0.5, 0.8]), 0)[0],
        -torch.log_softmax(torch.tensor([0.7, 0.1]), 0)[0],
    ]
    expected = (sum(image_to_text) + sum(text_to_image)) / 6
    assert scta_loss(scores, same_image, logit_scale=torch.tensor(0.0)).item() == pytest.approx(float(expected))


def test_infonce_model_holds_a_learned_temperature_and_trains_it(tmp_path):
    hinge = SCTAModelTester().model
    assert hinge.logit_scale is None and "logit_scale" not in hinge.state_dict()  # earlier checkpoints load as before
    tester = SCTAModelTester(training_loss="infonce")
    model = tester.model.train()
    assert model.logit_scale.item() == pytest.approx(2.6592)  # CLIP's log(1 / 0.07)
    outputs = tester.loss_outputs(torch.tensor([4, 4, 9]))
    expected = scta_loss(outputs.logits_per_image, torch.tensor([4, 4, 9]), logit_scale=model.logit_scale)
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0
    with torch.no_grad():
        model.logit_scale.fill_(3.25)
    model.save_pretrained(tmp_path)
    reloaded = SCTAModel.from_pretrained(tmp_path)
    assert reloaded.config.training_loss == "infonce" and reloaded.logit_scale.item() == pytest.approx(3.25)


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="training_loss='triplet' is not one of hinge, infonce"):
        SCTAModelTester(training_loss="triplet")
    with pytest.raises(ValueError, match="square"):
        scta_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"image_ids must have shape \(2,\)"):
        scta_loss(torch.zeros(2, 2), torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------------------------------- training


def test_one_backward_reaches_every_parameter():
    """...but the first-stage adapter's, which its own loss trains on detached embeddings (test_first_stage.py)."""
    tester = SCTAModelTester()
    model = tester.model.train()
    assert model.first_stage is not None
    outputs = model(
        tester.pixel_values, tester.input_ids, tester.attention_mask, return_loss=True, hardest_negative=False
    )
    assert outputs.loss.item() > 0
    outputs.loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("first_stage."):
            assert parameter.grad is None, f"the model's loss reached the adapter's {name}"
            continue
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        if name.startswith("head."):
            assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ---------------------------------------------------------------------------------------------- save / load


def test_every_parameter_is_initialised_when_missing_from_a_checkpoint(tmp_path):
    tester = SCTAModelTester()
    tester.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["head.patch_aggregator.scale"], weights["head.word_aggregator.scale"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys: head.patch_aggregator.scale, head.word_aggregator.scale"):
        SCTAModel.from_pretrained(tmp_path)
    loaded = SCTAModel.from_pretrained(tmp_path, strict=False)
    assert loaded.head.patch_aggregator.scale.item() == 1.0
    assert loaded.head.word_aggregator.scale.item() == 1.0


def test_loading_is_strict_about_unexpected_and_mismatched_keys(tmp_path):
    tester = SCTAModelTester()
    tester.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {**weights, "head.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match="unexpected_keys: head.extra.weight"):
        SCTAModel.from_pretrained(tmp_path)
    weights["head.patch_aggregator.mlp.3.weight"] = torch.zeros(3, 4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"mismatched_keys: head.patch_aggregator.mlp.3.weight \(checkpoint \(3, 4\)"):
        SCTAModel.from_pretrained(tmp_path)


def test_init_is_deterministic_under_a_seed():
    config = tiny_scta_config()
    torch.manual_seed(3)
    first = SCTAModel(config).state_dict()
    torch.manual_seed(3)
    second = SCTAModel(config).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_save_and_load_round_trip_through_auto_model(tmp_path):
    tester = SCTAModelTester()
    expected = tester.check_outputs().logits_per_image
    umask = os.umask(0o022)
    try:
        tester.model.save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / "model.safetensors").exists()
    assert {"configuration_scta.py", "modeling_scta.py"} <= set(os.listdir(tmp_path))
    # the weights are as readable as the folder's other files (transformers writes them through a 0600 temp file)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_scta.SCTAConfig",
        "AutoModel": "modeling_scta.SCTAModel",
        "AutoModelForZeroShotImageClassification": "modeling_scta.SCTAModel",
    }
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SCTAModel)
    with torch.no_grad():
        scores = loaded(tester.pixel_values, tester.input_ids, tester.attention_mask).logits_per_image
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_remote_code_load_in_a_fresh_process_without_the_project(tmp_path):
    tester = SCTAModelTester()
    model_dir, work_dir = tmp_path / "model", tmp_path / "elsewhere"
    work_dir.mkdir()
    tester.model.save_pretrained(model_dir)
    with torch.no_grad():
        expected = tester.model(tester.pixel_values, tester.input_ids, tester.attention_mask).logits_per_image
    inputs = {
        "pixel_values": tester.pixel_values,
        "input_ids": tester.input_ids,
        "attention_mask": tester.attention_mask,
    }
    save_file(inputs, tmp_path / "inputs.safetensors")
    script = f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            scores = model(**load_file({str(tmp_path / "inputs.safetensors")!r})).logits_per_image
        save_file({{"scores": scores.contiguous()}}, {str(tmp_path / "scores.safetensors")!r})
        """
    run_without_project(script, work_dir)
    scores = load_file(tmp_path / "scores.safetensors")["scores"]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_from_vision_text_pretrained_loads_local_towers(tmp_path):
    torch.manual_seed(0)
    vision, text = ViTModel(tiny_vit_config()), BertModel(tiny_bert_config())
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "text")
    model = SCTAModel.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"), embed_size=16)
    assert model.config.embed_size == 16 and model.config.num_patches == 16
    assert model.vision_model.pooler is None and model.text_model.pooler is None
    for name, weight in vision.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(model.vision_model.state_dict()[name], weight), name
    for name, weight in text.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(model.text_model.state_dict()[name], weight), name
