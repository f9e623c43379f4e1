"""The methods of the ablation study: the global dual-encoder baseline and SCTA without text-guided selection."""

import pytest
import torch

from configuration_scta import SCTAConfig
from helpers import SCTAModelTester, make_head, random_text_batch, random_tokens, tiny_scta_config
from modeling_scta import SCTAModel, cosine_similarity_matrix, scta_loss
from scta_train.reference import caption_independent_keys, caption_independent_scores


def global_tester() -> SCTAModelTester:
    return SCTAModelTester(scoring_head="global")


def test_global_head_scores_pairs_by_the_cosine_of_global_embeddings():
    tester = global_tester()
    with torch.no_grad():
        outputs = tester.check_outputs()
        expected = cosine_similarity_matrix(outputs.image_global_embeds, outputs.text_global_embeds)
        torch.testing.assert_close(outputs.logits_per_image, expected)
        # a global score is a cosine: in [-1, 1], and mean pooling of the real tokens only
        assert outputs.logits_per_image.abs().max() <= 1 + 1e-6
        mask = tester.attention_mask[..., None].float()
        text_mean = (outputs.text_embeds * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(outputs.text_global_embeds, text_mean)


def test_global_head_corpus_scoring_equals_the_matrix_and_candidates():
    tester = global_tester()
    model = tester.model
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(5, 3, 32, 32, generator=generator)
    input_ids, attention_mask = random_text_batch([4, 9, 5, 12, 7, 6, 3], generator=generator)
    with torch.no_grad():
        images = model.get_image_features(pixel_values)
        texts = model.get_text_features(input_ids, attention_mask)
        full = model.similarity(images.last_hidden_state, texts.last_hidden_state, attention_mask)
        torch.testing.assert_close(full, model.global_similarity(images.pooler_output, texts.pooler_output))
        captions = model.caption_key_tokens(texts.last_hidden_state, attention_mask)
        torch.testing.assert_close(model.score(images.last_hidden_state, captions), full, atol=1e-6, rtol=0)
        image_index = torch.tensor([[0], [3], [4]])
        caption_index = torch.tensor([[6, 0, 2], [1, 1, 5], [3, 4, 0]])
        candidates = model.score_candidates(images.last_hidden_state, captions, image_index, caption_index)
        assert candidates.shape == (3, 3)
        torch.testing.assert_close(candidates, full[image_index, caption_index], atol=1e-6, rtol=0)
        # stored in float16 (an index) and scored in the captions' dtype
        half = model.score(images.last_hidden_state.half(), captions)
        torch.testing.assert_close(half, full, atol=2e-3, rtol=0)


def test_global_head_loss_is_the_hinge_on_the_global_cosine_and_trains_the_towers():
    tester = global_tester()
    model = tester.model.train()
    outputs = model(
        pixel_values=tester.pixel_values,
        input_ids=tester.input_ids,
        attention_mask=tester.attention_mask,
        return_loss=True,
    )
    expected = scta_loss(
        cosine_similarity_matrix(outputs.image_global_embeds, outputs.text_global_embeds), margin=model.config.margin
    )
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert model.vision_model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert not list(model.head.parameters())  # a global-only model builds no key-token head


def test_global_head_refuses_the_auxiliary_loss():
    with pytest.raises(ValueError, match="global_loss_weight"):
        tiny_scta_config(scoring_head="global", global_loss_weight=0.1)
    with pytest.raises(ValueError, match="scoring_head='cosine' is not one of key_tokens, global"):
        tiny_scta_config(scoring_head="cosine")


def test_scoring_head_round_trips_and_can_be_switched_on_a_saved_model(tmp_path):
    model = global_tester().model
    model.save_pretrained(tmp_path)
    loaded = SCTAModel.from_pretrained(tmp_path)
    assert loaded.config.scoring_head == "global" and not list(loaded.head.parameters())
    # a global-only checkpoint has no key-token head: switching initialises one, and says so unless asked
    with pytest.raises(ValueError, match="missing_keys: head.*strict=False"):
        SCTAModel.from_pretrained(tmp_path, scoring_head="key_tokens")
    switched = SCTAModel.from_pretrained(tmp_path, scoring_head="key_tokens", strict=False)
    assert switched.config.scoring_head == "key_tokens" and list(switched.head.parameters())


def test_a_global_checkpoint_of_an_earlier_release_with_its_unused_head_still_loads(tmp_path):
    import json

    key_tokens = SCTAModelTester().model  # earlier releases built the key-token head for global models too
    key_tokens.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scoring_head": "global"}))
    loaded = SCTAModel.from_pretrained(tmp_path)  # strict: only the unused head weights are ignored
    assert loaded.config.scoring_head == "global"
    for name, weight in key_tokens.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(loaded.state_dict()[name], weight), name


@pytest.mark.parametrize("vision_has_cls_token", [True, False])
@pytest.mark.parametrize("word_aggregation", [True, False])
def test_selection_without_s_text_equals_the_caption_independent_head(vision_has_cls_token, word_aggregation):
    guided = make_head(vision_has_cls_token, word_aggregation)
    blind = make_head(vision_has_cls_token, word_aggregation, text_guided_selection=False)
    image_tokens, text_tokens, text_mask = random_tokens(5, [3, 6, 9, 14, 20], blind)
    with torch.no_grad():
        scores = blind(image_tokens, text_tokens, text_mask)
        captions = blind.caption_key_tokens(text_tokens, text_mask)
        keys = caption_independent_keys(blind, image_tokens)
        expected = caption_independent_scores(blind, keys, captions.select(torch.arange(len(captions))))
        torch.testing.assert_close(scores, expected, atol=1e-10, rtol=0)
        # and it is a different score from the paper's, which the caption steers
        assert (guided(image_tokens, text_tokens, text_mask) - scores).abs().max() > 1e-4


def test_text_guided_selection_reaches_the_model_head():
    assert SCTAModelTester(text_guided_selection=False).model.head.text_guided_selection is False
    assert SCTAConfig().text_guided_selection is True and SCTAConfig().scoring_head == "key_tokens"
