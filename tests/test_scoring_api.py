"""The public scoring API: encode-once caption key tokens, full-matrix and candidate scoring, global embeddings."""

import inspect

import pytest
import torch

from helpers import CAPTION_LENGTHS, SCTAModelTester, make_head, random_text_batch, random_tokens, tiny_scta_config
from modeling_scta import CaptionKeyTokens, SCTAModel, cosine_similarity_matrix, scta_loss
from scta_train.reference import caption_independent_keys, caption_independent_scores


def encoded_corpus(head, num_images=7, lengths=CAPTION_LENGTHS, dtype=torch.float32):
    image_tokens, text_tokens, text_mask = random_tokens(num_images, lengths, head, dtype=dtype)
    return image_tokens, text_tokens, text_mask, head.caption_key_tokens(text_tokens, text_mask)


@pytest.mark.parametrize("word_aggregation", [True, False])
@pytest.mark.parametrize("vision_has_cls_token", [True, False])
def test_score_and_candidates_equal_the_full_matrix(word_aggregation, vision_has_cls_token):
    head = make_head(vision_has_cls_token, word_aggregation, dtype=torch.float32)
    image_tokens, text_tokens, text_mask, captions = encoded_corpus(head)
    with torch.no_grad():
        full = head(image_tokens, text_tokens, text_mask)
        for chunks in [(1, 1), (2, 3), (100, 100)]:
            torch.testing.assert_close(head.score(image_tokens, captions, *chunks), full, atol=1e-5, rtol=0)
        # ragged candidate pairs: every image with its own captions, some images absent, one pair twice
        image_index = torch.tensor([3, 0, 3, 6, 6, 6, 1, 3, 0])
        caption_index = torch.tensor([10, 2, 0, 4, 5, 9, 7, 10, 2])
        for chunks in [(1, 1), (2, 2), (16, 128)]:
            pairs = head.score_pairs(image_tokens, captions, image_index, caption_index, *chunks)
            torch.testing.assert_close(pairs, full[image_index, caption_index], atol=1e-5, rtol=0)


@pytest.mark.parametrize("vision_has_cls_token", [True, False])
def test_slot_norms_with_and_without_the_per_image_basis_agree(vision_has_cls_token, monkeypatch):
    """Few captions per image: slot norms from the slot vectors; many: from the orthonormal basis (a QR per image).
    Both give the same scores, and candidate scoring takes each path by the captions per image of its block."""
    import modeling_scta

    head = make_head(vision_has_cls_token, True, dtype=torch.float32)
    image_tokens, text_tokens, text_mask, captions = encoded_corpus(head)
    text = captions.select(torch.arange(len(captions)))
    with torch.no_grad():
        with_basis = head.block_scores(head.image_key_state(image_tokens, with_basis=True), text)
        direct = head.block_scores(head.image_key_state(image_tokens, with_basis=False), text)
        torch.testing.assert_close(direct, with_basis, atol=1e-5, rtol=0)
        full = head(image_tokens, text_tokens, text_mask)
        image_index = torch.arange(7).repeat_interleave(len(captions))
        caption_index = torch.arange(len(captions)).repeat(7)
        for threshold in (0, 10_000):  # every block through the basis, then none
            monkeypatch.setattr(modeling_scta, "DIRECT_SLOT_NORM_CAPTIONS", threshold)
            pairs = head.score_pairs(image_tokens, captions, image_index, caption_index)
            torch.testing.assert_close(pairs, full[image_index, caption_index], atol=1e-5, rtol=0)
    assert direct.shape == (7, len(captions))


def test_model_score_candidates_broadcasts_query_by_k_layouts():
    tester = SCTAModelTester()
    model = tester.model
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(6, 3, 32, 32, generator=generator)
    input_ids, attention_mask = random_text_batch([4, 9, 5, 12, 7, 6, 3, 10], generator=generator)
    with torch.no_grad():
        images = model.get_image_features(pixel_values).last_hidden_state
        texts = model.get_text_features(input_ids, attention_mask).last_hidden_state
        captions = model.caption_key_tokens(texts, attention_mask)
        full = model.similarity(images, texts, attention_mask)
        torch.testing.assert_close(model.score(images, captions), full, atol=1e-5, rtol=0)
        # image -> text: 3 candidate captions for each of the 6 images
        top_captions = full.topk(3, dim=1).indices  # (6, 3)
        i2t = model.score_candidates(images, captions, torch.arange(6)[:, None], top_captions)
        torch.testing.assert_close(i2t, full.gather(1, top_captions), atol=1e-5, rtol=0)
        # text -> image: 2 candidate images for each of the 8 captions
        top_images = full.t().topk(2, dim=1).indices  # (8, 2)
        t2i = model.score_candidates(images, captions, top_images, torch.arange(8)[:, None])
        torch.testing.assert_close(t2i, full.t().gather(1, top_images), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"caption_index has entries outside \[0, 8\)"):
            model.score_candidates(images, captions, torch.tensor([0]), torch.tensor([8]))


def test_caption_key_tokens_are_reused_across_calls_batches_and_devices_of_storage():
    head = make_head(dtype=torch.float32)
    image_tokens, text_tokens, text_mask, captions = encoded_corpus(head)
    with torch.no_grad():
        expected = head(image_tokens, text_tokens, text_mask)
        # encoded in two batches of different padded length, then joined
        first = head.caption_key_tokens(text_tokens[:4, :10], text_mask[:4, :10])
        second = head.caption_key_tokens(text_tokens[4:], text_mask[4:])
        joined = CaptionKeyTokens.cat([first, second])
        assert len(joined) == len(CAPTION_LENGTHS)
        assert torch.equal(joined.key_counts, captions.key_counts)
        # the same object scores any image set, any number of times, with the same results
        for _ in range(2):
            torch.testing.assert_close(head.score(image_tokens, joined), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(head.score(image_tokens[[5, 2]], captions), expected[[5, 2]], atol=1e-5, rtol=0)
        # image tokens stored in float16 (as in an index) are scored in the head's dtype
        stored = image_tokens.half()
        torch.testing.assert_close(
            head.score(stored, captions), head.score(stored.float(), captions), atol=1e-6, rtol=0
        )


def test_gradients_through_the_encoded_captions_equal_the_direct_path():
    head = make_head()
    image_tokens, text_tokens, text_mask = random_tokens(3, [3, 6, 11, 25], head)
    text_tokens.requires_grad_(True)
    weights = torch.randn(3, 4, dtype=torch.float64)
    direct = torch.autograd.grad((head(image_tokens, text_tokens, text_mask) * weights).sum(), text_tokens)[0]
    captions = head.caption_key_tokens(text_tokens, text_mask)
    indirect = torch.autograd.grad((head.score(image_tokens, captions, 2, 2) * weights).sum(), text_tokens)[0]
    torch.testing.assert_close(indirect, direct, atol=1e-10, rtol=0)


def test_features_follow_the_transformers_convention_including_return_dict_false():
    tester = SCTAModelTester()
    model = tester.model
    with torch.no_grad():
        image = model.get_image_features(tester.pixel_values, output_hidden_states=True)
        as_tuple = model.get_image_features(tester.pixel_values, return_dict=False)
        text = model.get_text_features(tester.input_ids, tester.attention_mask)
        text_tuple = model.get_text_features(tester.input_ids, tester.attention_mask, return_dict=False)
    assert len(image.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], image.last_hidden_state)
    assert torch.equal(as_tuple[1], image.pooler_output)
    assert isinstance(text_tuple, tuple) and torch.equal(text_tuple[1], text.pooler_output)


def test_global_embeddings_are_the_pooled_tokens_of_the_chosen_pooling():
    tester = SCTAModelTester()
    model = tester.model
    with torch.no_grad():
        image = model.get_image_features(tester.pixel_values)
        text = model.get_text_features(tester.input_ids, tester.attention_mask)
    mask = tester.attention_mask.bool()
    expected_text = torch.stack([text.last_hidden_state[i][mask[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(text.pooler_output, expected_text, atol=1e-6, rtol=0)
    torch.testing.assert_close(image.pooler_output, image.last_hidden_state[:, 1:].mean(1), atol=1e-6, rtol=0)
    # the global embeddings' directions are the head's patch-selection queries
    captions = model.caption_key_tokens(text.last_hidden_state, tester.attention_mask)
    torch.testing.assert_close(captions.query, torch.nn.functional.normalize(expected_text, dim=-1), atol=1e-6, rtol=0)

    cls_model = SCTAModelTester(global_pooling="cls").model
    with torch.no_grad():
        image = cls_model.get_image_features(tester.pixel_values)
        text = cls_model.get_text_features(tester.input_ids, tester.attention_mask)
    assert torch.equal(image.pooler_output, image.last_hidden_state[:, 0])
    assert torch.equal(text.pooler_output, text.last_hidden_state[:, 0])
    with pytest.raises(ValueError, match="global_pooling='max' is not one of mean, cls"):
        tiny_scta_config(global_pooling="max")


def test_auxiliary_global_objective_is_added_with_its_weight_and_trains_the_towers():
    tester = SCTAModelTester()
    inputs = dict(
        pixel_values=tester.pixel_values,
        input_ids=tester.input_ids,
        attention_mask=tester.attention_mask,
        return_loss=True,
        hardest_negative=False,
    )
    base = SCTAModelTester().model.train()
    weighted = SCTAModelTester(global_loss_weight=2.0).model.train()
    weighted.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    out = base(**inputs)
    torch.manual_seed(0)
    out_weighted = weighted(**inputs)
    global_scores = cosine_similarity_matrix(out_weighted.image_global_embeds, out_weighted.text_global_embeds)
    global_loss = scta_loss(global_scores, hardest_negative=False)
    assert global_loss.item() > 0
    torch.testing.assert_close(out_weighted.loss, out.loss + 2.0 * global_loss, atol=1e-5, rtol=0)

    # the global term alone reaches both towers and their projections
    weighted.zero_grad()
    global_loss.backward()
    for prefix in ("vision_model.", "text_model.", "vision_projection.", "text_projection."):
        grads = [p.grad for name, p in weighted.named_parameters() if name.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert sum(float(g.abs().sum()) for g in grads) > 0, prefix
    assert all(p.grad is None for name, p in weighted.named_parameters() if name.startswith("head."))


def test_similarity_with_no_images_or_no_captions_is_empty():
    tester = SCTAModelTester()
    model = tester.model
    images = torch.randn(3, 17, 24)
    texts, mask = torch.randn(4, 6, 24), torch.ones(4, 6, dtype=torch.long)
    assert model.similarity(images[:0], texts, mask).shape == (0, 4)
    assert model.similarity(images, texts[:0], mask[:0]).shape == (3, 0)
    captions = model.caption_key_tokens(texts, mask)
    assert model.score(images[:0], captions).shape == (0, 4)
    assert model.score_candidates(
        images, captions, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    ).shape == (0,)


@pytest.mark.parametrize("vision_has_cls_token", [True, False])
def test_the_head_with_a_zero_text_query_equals_caption_independent_keys(vision_has_cls_token):
    """Without `s_text` the selection depends on the image alone: the head then equals aligning key tokens built
    once per image (the oracle of scta_train.reference)."""
    head = make_head(vision_has_cls_token)
    image_tokens, text_tokens, text_mask, captions = encoded_corpus(head, num_images=4, dtype=torch.float64)
    with torch.no_grad():
        all_captions = captions.select(torch.arange(len(captions)))
        blind = type(all_captions)(all_captions.tokens, all_captions.mask, torch.zeros_like(all_captions.query))
        scores = head.block_scores(head.image_key_state(image_tokens), blind)  # s_text = 0: selection by s_self
        keys = caption_independent_keys(head, image_tokens)
        assert keys.shape == (4, head.num_patch_slots + 1 + int(vision_has_cls_token), 32)
        torch.testing.assert_close(caption_independent_scores(head, keys, all_captions), scores, atol=1e-10, rtol=0)


def test_caption_subsets_keep_their_key_tokens():
    head = make_head(dtype=torch.float32)
    image_tokens, _, _, captions = encoded_corpus(head, num_images=3)
    order = torch.tensor([4, 0, 9, 9, 2])
    subset = captions.subset(order)
    assert torch.equal(subset.key_counts, captions.key_counts[order])
    with torch.no_grad():
        torch.testing.assert_close(head.score(image_tokens, subset), head.score(image_tokens, captions)[:, order])


def test_forward_follows_transformers_conventions_and_rejects_unknown_arguments():
    tester = SCTAModelTester()
    model = tester.model
    inputs = dict(pixel_values=tester.pixel_values, input_ids=tester.input_ids, attention_mask=tester.attention_mask)
    with torch.no_grad():
        outputs = model(**inputs, return_loss=True)
        loss, logits_per_image, *_ = model(**inputs, return_loss=True, return_dict=False)
        model.config.return_dict = False
        as_config = model(**inputs)
        model.config.return_dict = True
        with_towers = model(
            **inputs,
            token_type_ids=torch.zeros_like(tester.input_ids),
            output_hidden_states=True,
            output_attentions=True,
        )
    assert torch.equal(loss, outputs.loss) and torch.equal(logits_per_image, outputs.logits_per_image)
    assert isinstance(as_config, tuple) and torch.equal(as_config[0], outputs.logits_per_image)  # no loss: logits first
    # one layer: embeddings + layer output (attentions follow the towers' attention implementation, as in CLIP)
    assert len(with_towers.vision_model_output.hidden_states) == 2 == len(with_towers.text_model_output.hidden_states)
    torch.testing.assert_close(with_towers.logits_per_image, outputs.logits_per_image)  # token type 0 is BERT's default
    with pytest.raises(TypeError, match="atention_mask"):
        model(pixel_values=tester.pixel_values, input_ids=tester.input_ids, atention_mask=tester.attention_mask)
    assert model.main_input_name == "pixel_values" == next(iter(inspect.signature(model.forward).parameters))


def test_resizing_the_text_towers_embeddings_after_adding_tokens(tmp_path):
    tester = SCTAModelTester()
    model = tester.model
    assert model.get_input_embeddings() is model.text_model.embeddings.word_embeddings
    model.resize_token_embeddings(102)
    assert model.config.text_config.vocab_size == 102 == model.get_input_embeddings().num_embeddings
    input_ids = tester.input_ids.clone()
    input_ids[0, 1] = 101  # a new token
    with torch.no_grad():
        scores = model(tester.pixel_values, input_ids, tester.attention_mask).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = SCTAModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(tester.pixel_values, input_ids, tester.attention_mask).logits_per_image, scores
        )


def test_image_batches_are_encoded_in_eval_mode_without_gradient_and_the_mode_restored():
    tester = SCTAModelTester()
    model = tester.model.train()
    batches = [tester.pixel_values[:2], tester.pixel_values[2:]]
    encoded = list(model.encode_image_batches(batches))
    assert model.training  # the caller's mode, back
    model.eval()
    with torch.no_grad():
        expected = model.get_image_features(tester.pixel_values)
    tokens = torch.cat([batch_tokens for batch_tokens, _ in encoded])
    global_embeds = torch.cat([batch_global for _, batch_global in encoded])
    torch.testing.assert_close(tokens, expected.last_hidden_state)
    torch.testing.assert_close(global_embeds, expected.pooler_output)
    assert not tokens.requires_grad and torch.is_grad_enabled()
    # only the global embeddings; an abandoned iteration restores the mode too
    model.train()
    iterator = model.encode_image_batches(batches, keep_tokens=False)
    first_tokens, first_global = next(iterator)
    assert first_tokens is None and first_global.shape == (2, model.config.embed_size) and not model.training
    assert torch.is_grad_enabled()  # no no_grad state leaks to the caller between batches
    iterator.close()
    assert model.training
