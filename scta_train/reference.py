"""Plain-loop versions of the SCTA head, written from docs/METHOD.md: the oracles the batched head is tested against.

`reference_pair_score` follows the specification literally for one (image, caption) pair.
`reference_similarity_loop` has the published code's structure: a Python loop over captions, each caption
scored against all images at once (gathering the kept patches and running the patch aggregator on them
per caption). The benchmark `bench/bench_similarity.py` times it as the baseline.
`caption_independent_keys` / `caption_independent_scores` compute the head without `s_text` another way: the
selection then depends on the image alone, so each image's key tokens are built once and aligned with any caption.
"""

import math

import torch
import torch.nn.functional as F


def reference_pair_score(
    head, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_alignment: bool = False
) -> torch.Tensor:
    """
    Score of one pair, docs/METHOD.md steps 1-6.

    Args:
        head: a `KeyTokenAlignmentHead` (its aggregators' weights and settings are used).
        image_tokens: `(T_img, C)` projected image tokens ([CLS] first if the tower has one).
        text_tokens: `(n, C)` the n real projected caption tokens, [CLS] first and [SEP] last.
        text_alignment: return each text key token's best alignment `max_v S[u, v]` instead of the score.
    """
    if head.vision_has_cls_token:
        cls, patches = image_tokens[0], image_tokens[1:]
    else:
        cls, patches = None, image_tokens
    num_patches = patches.shape[0]
    num_kept = head.num_kept_patches

    # 1. patch scores, no gradient
    with torch.no_grad():
        directions = F.normalize(patches, dim=-1)
        self_scores = directions @ F.normalize(patches.mean(0), dim=0)
        text_scores = directions @ F.normalize(text_tokens.mean(0), dim=0)
        scores = self_scores + text_scores
        kept_index = scores.topk(num_kept).indices
        dropped = torch.ones(num_patches, dtype=torch.bool)
        dropped[kept_index] = False
    # 2. kept patches and the fused token of the dropped ones
    kept = patches[kept_index]
    fused = (F.softmax(scores[dropped], dim=0)[:, None] * patches[dropped]).sum(0)
    # 3. patch aggregation: softmax over the kept patches for every slot
    slot_logits = head.patch_aggregator(kept)  # (K, M)
    slots = F.softmax(slot_logits, dim=0).t() @ kept  # (M, C)
    # 4. image key tokens
    image_keys = [slots, fused[None]]
    if cls is not None:
        image_keys.insert(0, cls[None])
    image_keys = F.normalize(torch.cat(image_keys), dim=-1)
    # 5. text key tokens
    if head.word_aggregator is None:
        text_keys = F.normalize(text_tokens, dim=-1)
    else:
        n = text_tokens.shape[0]
        words = text_tokens[1:]
        k = max(head.min_word_slots, min(head.max_word_slots, math.floor(head.word_keep_ratio * (n - 1))))
        word_logits = head.word_aggregator(words)[:, :k]  # (n - 1, k)
        word_slots = F.softmax(word_logits, dim=0).t() @ words  # (k, C)
        text_keys = F.normalize(torch.cat([text_tokens[:1], word_slots]), dim=-1)
    # 6. alignment
    similarities = F.leaky_relu(text_keys @ image_keys.t(), head.negative_slope)
    if text_alignment:
        return similarities.max(dim=1).values
    return similarities.max(dim=1).values.mean() + similarities.max(dim=0).values.mean()


def reference_similarity(head, image_tokens, text_tokens, text_attention_mask) -> torch.Tensor:
    """`(B_img, B_txt)` scores, one `reference_pair_score` call per pair."""
    lengths = text_attention_mask.sum(-1).tolist()
    rows = []
    for image in image_tokens:
        rows.append(torch.stack([reference_pair_score(head, image, text[:n]) for text, n in zip(text_tokens, lengths)]))
    return torch.stack(rows)


def reference_similarity_loop(head, image_tokens, text_tokens, text_attention_mask) -> torch.Tensor:
    """
    `(B_img, B_txt)` scores, computed like the published code: for each caption, all images at once.
    """
    if head.vision_has_cls_token:
        cls, patches = image_tokens[:, :1], image_tokens[:, 1:]
    else:
        cls, patches = None, image_tokens
    num_images, num_patches, width = patches.shape
    num_kept = head.num_kept_patches
    with torch.no_grad():
        directions = F.normalize(patches, dim=-1)
        image_query = F.normalize(patches.mean(dim=1, keepdim=True), dim=-1)
        self_scores = (image_query * directions).sum(dim=-1)  # (B_img, N)

    columns = []
    for caption, n in zip(text_tokens, text_attention_mask.sum(-1).tolist()):
        caption = caption[:n]
        with torch.no_grad():
            caption_query = F.normalize(caption.mean(0, keepdim=True).unsqueeze(0), dim=-1)
            scores = self_scores + (caption_query * directions).sum(dim=-1)  # (B_img, N)
            order = scores.argsort(dim=1, descending=True)
            kept_index, dropped_index = order[:, :num_kept], order[:, num_kept:]
        kept = torch.gather(patches, 1, kept_index[..., None].expand(-1, -1, width))
        dropped = torch.gather(patches, 1, dropped_index[..., None].expand(-1, -1, width))
        dropped_weights = F.softmax(torch.gather(scores, 1, dropped_index), dim=1)
        fused = (dropped_weights[..., None] * dropped).sum(dim=1, keepdim=True)  # (B_img, 1, C)
        slot_weights = F.softmax(head.patch_aggregator(kept).transpose(1, 2), dim=2)  # (B_img, M, K)
        slots = torch.bmm(slot_weights, kept)  # (B_img, M, C)
        image_keys = [slots, fused] if cls is None else [cls, slots, fused]
        image_keys = F.normalize(torch.cat(image_keys, dim=1), dim=-1)

        if head.word_aggregator is None:
            text_keys = F.normalize(caption, dim=-1)
        else:
            words = caption[1:]
            k = max(head.min_word_slots, min(head.max_word_slots, math.floor(head.word_keep_ratio * (n - 1))))
            word_weights = F.softmax(head.word_aggregator(words)[:, :k].t(), dim=1)  # (k, n - 1)
            text_keys = F.normalize(torch.cat([caption[:1], word_weights @ words]), dim=-1)
        text_keys = text_keys.unsqueeze(0).repeat(num_images, 1, 1)  # (B_img, J, C), as cap_i_expand

        similarities = F.leaky_relu(torch.bmm(text_keys, image_keys.transpose(1, 2)), head.negative_slope)
        columns.append(similarities.max(dim=2).values.mean(dim=1) + similarities.max(dim=1).values.mean(dim=1))
    return torch.stack(columns, dim=1)


def caption_independent_keys(head, image_tokens: torch.Tensor) -> torch.Tensor:
    """
    Image key tokens `V = norm([c_v; A_v; f])` `(I, M + 1 [+ 1], C)` with the patch selection by `s_self` alone
    (docs/METHOD.md step 1 without `s_text`): softmax slot weights over the kept patches, the fused token a softmax
    over the dropped ones. The head with `text_guided_selection=False` (or a zero text query) must equal aligning
    these with the caption's key tokens (`caption_independent_scores`).
    """
    cls, patches = head.split_image_tokens(image_tokens)  # (I, C) or None, (I, N, C)
    self_scores = torch.einsum("inc,ic->in", F.normalize(patches, dim=-1), F.normalize(patches.mean(1), dim=-1))
    kept_index = self_scores.topk(head.num_kept_patches, dim=-1).indices  # (I, K)
    keep = torch.zeros_like(self_scores).scatter_(-1, kept_index, 1.0).bool()  # (I, N)
    slot_weights = head.patch_aggregator(patches).masked_fill(~keep[..., None], -math.inf).softmax(dim=1)  # (I, N, M)
    slots = torch.einsum("inm,inc->imc", slot_weights, patches)  # (I, M, C)
    fused = torch.einsum("in,inc->ic", self_scores.masked_fill(keep, -math.inf).softmax(-1), patches)  # (I, C)
    keys = [slots, fused[:, None]]
    if cls is not None:
        keys.insert(0, cls[:, None])
    return F.normalize(torch.cat(keys, dim=1), dim=-1)


def caption_independent_scores(head, image_keys: torch.Tensor, text) -> torch.Tensor:
    """Max-mean alignment of `caption_independent_keys` `(I, V, C)` with text key tokens (`TextKeyTokens` of `(T, J,
    C)`) -> `(I, T)`."""
    from modeling_scta import max_mean_alignment

    similarities = torch.einsum("tjc,ivc->itjv", text.tokens.to(image_keys.dtype), image_keys)
    return max_mean_alignment(similarities, text.mask, head.negative_slope)
