"""The first-stage adapter: its loss, fused scores, the fusion weight chosen on dev, training beside the model without
changing it (bit for bit), old checkpoints, metric names, and fitting it after the fact."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import SCTAModelTester, run_main, tiny_run_config, tiny_scta_config, write_config
from modeling_scta import SCTAModel
from scta_train.loss import LOGIT_SCALE_MAX, first_stage_loss
from scta_train.retrieval import FUSION_WEIGHT_GRID, choose_fusion_weight_on


def test_untrained_adapter_is_the_identity():
    """Before training, the adapter's first stage ranks exactly as the global embeddings' cosine."""
    model = SCTAModel(tiny_scta_config(first_stage_adapter="mlp")).eval()
    images, captions = torch.randn(5, 24), torch.randn(7, 24)
    expected = F.normalize(images, dim=-1) @ F.normalize(captions, dim=-1).t()
    torch.testing.assert_close(model.first_stage_similarity(images, captions), expected)
    assert model.first_stage.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_first_stage_loss_is_symmetric_infonce_on_detached_inputs():
    model = SCTAModel(tiny_scta_config())
    adapter = model.first_stage
    with torch.no_grad():
        adapter.image_map.weight.add_(0.1 * torch.randn(24, 24))
        adapter.logit_scale.fill_(2.0)
    images = torch.randn(4, 24, requires_grad=True)
    captions = torch.randn(4, 24, requires_grad=True)
    image_ids = torch.tensor([0, 1, 1, 2])  # pairs 1 and 2 show the same image
    loss = first_stage_loss(adapter, images, captions, image_ids)

    logits = math.exp(2.0) * adapter.image(images) @ adapter.text(captions).t()
    expected = 0.0
    for scores in (logits, logits.t()):  # each row: its positive against the pairs of other images
        for row in range(4):
            keep = [column for column in range(4) if column == row or image_ids[column] != image_ids[row]]
            expected = expected - torch.log_softmax(scores[row, keep], 0)[keep.index(row)] / 8
    torch.testing.assert_close(loss, expected)

    loss.backward()
    assert images.grad is None and captions.grad is None  # detached: nothing flows back to the towers
    assert adapter.logit_scale.grad is not None and adapter.image_map.weight.grad.abs().sum() > 0
    with torch.no_grad():
        adapter.logit_scale.fill_(10.0)
    capped = first_stage_loss(adapter, images, captions)
    logits = math.exp(LOGIT_SCALE_MAX) * adapter.image(images) @ adapter.text(captions).t()
    target = torch.arange(4)
    torch.testing.assert_close(capped, (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2)


def test_fused_scores_add_the_weighted_first_stage():
    tester = SCTAModelTester()
    model = tester.model.eval()
    with torch.no_grad():
        model.first_stage.text_map.weight.add_(0.2 * torch.randn_like(model.first_stage.text_map.weight))
        images = model.get_image_features(tester.pixel_values)
        texts = model.get_text_features(tester.input_ids, tester.attention_mask)
        captions = model.caption_key_tokens(texts.last_hidden_state, tester.attention_mask)
        head = model.score(images.last_hidden_state, captions)
        first = model.first_stage_similarity(images.pooler_output, texts.pooler_output)
        fused = model.score(images.last_hidden_state, captions, fusion_weight=2.5)
        torch.testing.assert_close(fused, head + 2.5 * first)
        image_index = torch.tensor([0, 2, 1])
        caption_index = torch.tensor([1, 0, 2])
        pairs = model.score_candidates(
            images.last_hidden_state, captions, image_index, caption_index, fusion_weight=2.5
        )
        torch.testing.assert_close(pairs, fused[image_index, caption_index])
        head_only_captions = model.head.caption_key_tokens(texts.last_hidden_state, tester.attention_mask)
        with pytest.raises(ValueError, match="global embeddings"):
            model.score(images.last_hidden_state, head_only_captions, fusion_weight=1.0)


def test_fusion_weight_is_chosen_by_dev_rsum():
    """Two images with one caption each. The head alone gets 3 of the 4 queries wrong; the first stage turns both
    images' queries right above weight 0.5 (0.5 itself ties, and ties count against) and caption 1's above 1.5:
    2 is the smallest weight of the grid with every query right, and the larger ones, as good, are not chosen."""
    caption_to_image = torch.tensor([0, 1])
    head = torch.tensor([[0.5, 0.6], [0.4, 0.3]])
    first = torch.tensor([[0.1, -0.1], [-0.1, 0.1]])
    assert choose_fusion_weight_on(head, first, caption_to_image) == 2.0
    assert choose_fusion_weight_on(head, torch.zeros_like(head), caption_to_image) == FUSION_WEIGHT_GRID[0] == 0.0


def test_checkpoint_without_adapter_loads(tmp_path, caplog):
    """A checkpoint saved before adapters (no first_stage_adapter in its config, no adapter weights) loads strictly,
    with the plain cosine as its first stage and a warning saying how to fit one."""
    model = SCTAModel(tiny_scta_config(first_stage_adapter="none"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("first_stage_adapter", "fusion_weight"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        loaded = SCTAModel.from_pretrained(tmp_path)
    assert loaded.first_stage is None and loaded.config.first_stage_adapter == "none"
    assert "fit_first_stage" in caplog.text
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    # an adapter that is there loads as saved
    model = SCTAModel(tiny_scta_config(first_stage_adapter="mlp"))
    with torch.no_grad():
        model.first_stage.image_map.hidden_bias.fill_(0.5)
    model.save_pretrained(tmp_path / "mlp")
    loaded = SCTAModel.from_pretrained(tmp_path / "mlp")
    assert torch.equal(loaded.first_stage.image_map.hidden_bias, model.first_stage.image_map.hidden_bias)


@pytest.mark.slow
def test_training_with_the_adapter_leaves_the_model_bit_identical(synthetic_dir, tmp_path):
    """Same seed, with and without the adapter: every weight of the towers and the head is bit-identical after
    training (clipping active, token dropout and dropout drawing from the same random stream), the adapter itself
    learnt, and the metrics carry head-only, first-stage and fused keys with the configured headline."""
    runs = {}
    for kind in ("none", "linear"):
        output = tmp_path / kind
        config = tiny_run_config(
            synthetic_dir,
            str(output),
            first_stage_adapter=kind,
            max_steps=6,
            max_grad_norm=0.05,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            logging_steps=2,
        )
        runs[kind] = (
            run_main([write_config(tmp_path / f"{kind}.json", config)]),
            load_file(output / "model.safetensors"),
        )
    (without, weights_without), (with_adapter, weights_with) = runs["none"], runs["linear"]
    adapter_keys = {key for key in weights_with if key.startswith("first_stage.")}
    assert adapter_keys and set(weights_with) - adapter_keys == set(weights_without)
    for key, value in weights_without.items():
        assert torch.equal(value, weights_with[key]), f"{key} changed when the adapter trained beside it"
    assert not torch.equal(weights_with["first_stage.image_map.weight"], torch.eye(32))  # it learnt
    for name in ("head_only_r1_i2t", "first_stage_r1_i2t", "fused_r1_i2t", "fusion_weight"):
        assert f"test_{name}" in with_adapter
    # the head alone is the same model either way: identical head-only numbers
    for column in ("r1_i2t", "r5_t2i", "rsum"):
        assert with_adapter[f"test_head_only_{column}"] == without[f"test_head_only_{column}"]
    assert with_adapter["test_rsum"] == with_adapter["test_fused_rsum"]  # --ranking fused is the default headline
    saved = json.loads((tmp_path / "linear" / "config.json").read_text())
    assert saved["fusion_weight"] == with_adapter["eval_fusion_weight"] in FUSION_WEIGHT_GRID
    state = json.loads((tmp_path / "linear" / "trainer_state.json").read_text())
    assert any("first_stage_loss" in entry for entry in state["log_history"])
    training_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert training_logs and all(0 <= entry["batch_r1"] <= 100 for entry in training_logs)  # in-batch R@1, %


@pytest.mark.slow
def test_fit_first_stage_after_the_fact(synthetic_dir, tmp_path):
    """A model trained without an adapter gets one, fitted on frozen embeddings; its other weights are unchanged, the
    fusion weight is chosen on dev and saved, and head-only recall is the model's own."""
    from scta_train.fit_first_stage import main as fit_main

    base = tmp_path / "base"
    config = tiny_run_config(
        synthetic_dir,
        str(base),
        first_stage_adapter="none",
        ranking="head",
        max_steps=4,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    trained = run_main([write_config(tmp_path / "base.json", config)])
    fitted_dir = tmp_path / "fitted"
    results = fit_main(
        [
            "--model_name_or_path", str(base), "--dataset_dir", synthetic_dir, "--output_dir", str(fitted_dir),
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--first_stage_epochs", "3",
            "--first_stage_batch_size", "32", "--rerank_top_k", "4", "--per_device_eval_batch_size", "16",
        ]
    )  # fmt: skip
    before, after = load_file(base / "model.safetensors"), load_file(fitted_dir / "model.safetensors")
    assert {key for key in after if key.startswith("first_stage.")}
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert results["test_head_only_rsum"] == trained["test_rsum"]  # the paper's protocol: the model's own numbers
    assert results["test_rsum"] == results["test_two_stage_rsum"]  # --rerank_top_k: two-stage fused is the headline
    assert "test_two_stage_candidate_recall_i2t" in results
    saved = json.loads((fitted_dir / "config.json").read_text())
    assert saved["first_stage_adapter"] == "linear" and saved["fusion_weight"] == results["eval_fusion_weight"]
    reloaded = SCTAModel.from_pretrained(fitted_dir)
    assert reloaded.config.fusion_weight == results["eval_fusion_weight"]
