"""Retrieval over a corpus: encode images and captions once, the first (global) stage, two-stage ranking."""

import logging

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from modeling_scta import CaptionKeyTokens, SCTAModel
from scta_train.metrics import retrieval_ranks
from scta_train.processing import RetrievalCollator


logger = logging.getLogger(__name__)


# SCTA scores lie in [-0.2, 2] (two means of leaky-ReLU cosines); cosine - 3 lies in [-4, -2]. Non-candidates
# of a two-stage ranking get that value: below every re-ranked candidate, in first-stage order among themselves.
# A fused score (head + lambda x cosine) lies in [-0.2 - lambda, 2 + lambda]: its offset is 3 + lambda.
NON_CANDIDATE_OFFSET = 3.0
# The fusion weights tried on the dev split (`choose_fusion_weight_on`).
FUSION_WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def encode_image_corpus(
    model: SCTAModel, images, batch_size: int, device, num_workers: int = 0, show: bool = False, keep_tokens=True
):
    """
    Image side of a corpus, once per image (`SCTAModel.encode_image_batches`): `(n, T_img, C)` projected tokens
    (None with `keep_tokens=False`, when only the first stage is needed) and `(n, C)` global embeddings, on the
    model's device (`device`, where the caller placed it). `images` is a dataset of `{"pixel_values": (3, S, S)}`
    items (e.g. `RetrievalEvalImages`).
    """
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=RetrievalCollator(0))
    batches = (batch["pixel_values"] for batch in tqdm(loader, desc="Encoding images", disable=not show))
    tokens, global_embeds = [], []
    for batch_tokens, batch_global in model.encode_image_batches(batches, keep_tokens):
        tokens.append(batch_tokens)
        global_embeds.append(batch_global)
    width = model.config.embed_size
    if not global_embeds:  # an empty corpus (e.g. a process without images)
        token_count = model.config.num_patches + int(model.config.vision_has_cls_token)
        tokens, global_embeds = (
            [torch.zeros(0, token_count, width, device=device)],
            [torch.zeros(0, width, device=device)],
        )
    return (torch.cat(tokens) if keep_tokens else None), torch.cat(global_embeds)


@torch.no_grad()
def encode_caption_corpus(
    model: SCTAModel, captions, batch_size: int, device, pad_token_id: int, show: bool = False, keep_key_tokens=True
) -> tuple[CaptionKeyTokens | None, torch.Tensor]:
    """
    Caption side of a corpus, once per caption: its `CaptionKeyTokens` (None with `keep_key_tokens=False`) and
    `(n, C)` global embeddings, in the captions' order. `captions` is a dataset of `{"input_ids": list[int]}` items
    (e.g. `RetrievalEvalCaptions`); they are encoded in batches of similar length, so that little of a batch is
    padding.
    """
    order = sorted(range(len(captions)), key=lambda index: len(captions[index]["input_ids"]))
    loader = DataLoader(Subset(captions, order), batch_size=batch_size, collate_fn=RetrievalCollator(pad_token_id))
    parts, global_embeds = [], []
    for batch in tqdm(loader, desc="Encoding captions", disable=not show):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        features = model.get_text_features(input_ids, attention_mask)
        if keep_key_tokens:
            parts.append(model.caption_key_tokens(features.last_hidden_state, attention_mask))
        global_embeds.append(features.pooler_output)
    restore = torch.tensor(order).argsort()  # sorted position of every caption
    global_embeds = torch.cat(global_embeds)[restore.to(device)]
    return (CaptionKeyTokens.cat(parts).subset(restore) if keep_key_tokens else None), global_embeds


def first_stage_candidates(global_scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The top-k of every query by first-stage score: `(n_img, k)` caption indices of every image and `(n_cap, k)`
    image indices of every caption (k capped at the number of candidates).
    """
    num_images, num_captions = global_scores.shape
    top_captions = global_scores.topk(min(top_k, num_captions), dim=1).indices
    top_images = global_scores.topk(min(top_k, num_images), dim=0).indices.t()
    return top_captions, top_images


def candidate_recall(
    top_captions: torch.Tensor, top_images: torch.Tensor, caption_to_image: torch.Tensor
) -> tuple[float, float]:
    """
    % of queries whose positive is among their candidates: an image with at least one of its captions, a
    caption with its image. Two-stage retrieval can only lose a hit whose positive is not a candidate.
    """
    caption_to_image = caption_to_image.to(top_captions.device)
    image_hit = caption_to_image[top_captions] == torch.arange(len(top_captions), device=top_captions.device)[:, None]
    caption_hit = top_images == caption_to_image[:, None]
    return 100.0 * float(image_hit.any(1).float().mean()), 100.0 * float(caption_hit.any(1).float().mean())


def two_stage_pairs(top_captions: torch.Tensor, top_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The distinct (image, caption) pairs among both directions' candidates, each scored once by the head:
    `(pair_keys (P,), inverse)` with `pair_key = image * n_cap + caption` and `inverse` mapping the flattened
    image->text candidates, then the text->image ones, to their pair.
    """
    num_images, num_captions = len(top_captions), len(top_images)
    device = top_captions.device
    image_to_text_keys = torch.arange(num_images, device=device)[:, None] * num_captions + top_captions
    text_to_image_keys = top_images * num_captions + torch.arange(num_captions, device=device)[:, None]
    keys = torch.cat([image_to_text_keys.reshape(-1), text_to_image_keys.reshape(-1)])
    return torch.unique(keys, return_inverse=True)


def two_stage_score_matrices(
    global_scores: torch.Tensor,
    top_captions: torch.Tensor,
    top_images: torch.Tensor,
    pair_scores: torch.Tensor,
    inverse: torch.Tensor,
    non_candidate_offset: float = NON_CANDIDATE_OFFSET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One ranking matrix per direction, `(n_img, n_cap)` each: a query's candidates hold their exact scores, every
    other entry its first-stage score minus `non_candidate_offset` (below every exact score). Consumes
    `global_scores`.
    """
    split = top_captions.numel()
    image_to_text_exact = pair_scores[inverse[:split]].view(top_captions.shape).to(global_scores.dtype)
    text_to_image_exact = pair_scores[inverse[split:]].view(top_images.shape).to(global_scores.dtype)
    text_to_image = global_scores.clone().sub_(non_candidate_offset)
    text_to_image.t().scatter_(1, top_images, text_to_image_exact)
    image_to_text = global_scores.sub_(non_candidate_offset).scatter_(1, top_captions, image_to_text_exact)
    return image_to_text, text_to_image


def two_stage_rank(
    first_stage_scores: torch.Tensor,
    caption_to_image: torch.Tensor,
    top_k: int,
    score_exact,
    non_candidate_offset: float = NON_CANDIDATE_OFFSET,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    Two-stage retrieval over a whole split, both directions: `first_stage_scores` `(n_img, n_cap)` (the adapter's or
    the global embeddings' cosine, in [-1, 1]) propose the top `top_k` candidates of every query, and
    `score_exact(image_index (P,), caption_index (P,)) -> (P,)` (the SCTA head, or the fused score) scores the
    distinct candidate pairs, each once for both directions. `non_candidate_offset` must put non-candidates below the
    lowest exact score (`NON_CANDIDATE_OFFSET` for the head alone, plus the fusion weight for the fused score).

    Returns the image->text and text->image ranking matrices (`two_stage_score_matrices`) and statistics: candidate
    recall (%) and head pairs. Consumes `first_stage_scores`.
    """
    num_captions = first_stage_scores.shape[1]
    top_captions, top_images = first_stage_candidates(first_stage_scores, top_k)
    stats = {}
    stats["candidate_recall_i2t"], stats["candidate_recall_t2i"] = candidate_recall(
        top_captions, top_images, caption_to_image
    )
    pair_keys, inverse = two_stage_pairs(top_captions, top_images)
    exact_scores = score_exact(pair_keys // num_captions, pair_keys % num_captions)
    stats["head_pairs"] = len(pair_keys)
    image_to_text, text_to_image = two_stage_score_matrices(
        first_stage_scores, top_captions, top_images, exact_scores, inverse, non_candidate_offset
    )
    return image_to_text, text_to_image, stats


def choose_fusion_weight_on(
    head_scores: torch.Tensor, first_stage_scores: torch.Tensor, caption_to_image: torch.Tensor
) -> float:
    """
    The weight `lambda` of `FUSION_WEIGHT_GRID` whose fused score `head + lambda * first stage` has the highest rsum
    (R@1 + R@5 + R@10, both directions) on these `(n_img, n_cap)` matrices of a dev split; the smallest on ties.
    """
    best_weight, best_rsum = 0.0, -1.0
    for weight in FUSION_WEIGHT_GRID:
        image_ranks, caption_ranks = retrieval_ranks(head_scores + weight * first_stage_scores, caption_to_image)
        rsum = sum(
            100.0 * float((ranks < k).float().mean()) for ranks in (image_ranks, caption_ranks) for k in (1, 5, 10)
        )
        if rsum > best_rsum + 1e-9:
            best_weight, best_rsum = weight, rsum
    return best_weight
