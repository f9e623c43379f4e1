"""Retrieval over a corpus: encode images and captions once, the first (global) stage, two-stage ranking."""

import logging

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from modeling_scta import CaptionKeyTokens, SCTAModel
from scta_train.processing import RetrievalCollator


logger = logging.getLogger(__name__)


# SCTA scores lie in [-0.2, 2] (two means of leaky-ReLU cosines); cosine - 3 lies in [-4, -2]. Non-candidates
# of a two-stage ranking get that value: below every re-ranked candidate, in first-stage order among themselves.
NON_CANDIDATE_OFFSET = 3.0


@torch.no_grad()
def encode_image_corpus(model: SCTAModel, images, batch_size: int, device, num_workers: int = 0, show: bool = False):
    """
    Image side of a corpus, once per image: `(n, T_img, C)` projected tokens and `(n, C)` global embeddings, on
    `device`. `images` is a dataset of `{"pixel_values": (3, S, S)}` items (e.g. `RetrievalEvalImages`).
    """
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=RetrievalCollator(0))
    tokens, global_embeds = [], []
    for batch in tqdm(loader, desc="Encoding images", disable=not show):
        features = model.get_image_features(batch["pixel_values"].to(device))
        tokens.append(features.last_hidden_state)
        global_embeds.append(features.pooler_output)
    width = model.config.embed_size
    if not tokens:
        return torch.zeros(0, model.config.num_patches + int(model.config.vision_has_cls_token), width), torch.zeros(
            0, width
        )
    return torch.cat(tokens), torch.cat(global_embeds)


@torch.no_grad()
def encode_caption_corpus(
    model: SCTAModel, captions, batch_size: int, device, pad_token_id: int, show: bool = False
) -> tuple[CaptionKeyTokens, torch.Tensor]:
    """
    Caption side of a corpus, once per caption: its `CaptionKeyTokens` and `(n, C)` global embeddings, in the
    captions' order. `captions` is a dataset of `{"input_ids": list[int]}` items (e.g. `RetrievalEvalCaptions`);
    they are encoded in batches of similar length, so that little of a batch is padding.
    """
    order = sorted(range(len(captions)), key=lambda index: len(captions[index]["input_ids"]))
    loader = DataLoader(Subset(captions, order), batch_size=batch_size, collate_fn=RetrievalCollator(pad_token_id))
    parts, global_embeds = [], []
    for batch in tqdm(loader, desc="Encoding captions", disable=not show):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        features = model.get_text_features(input_ids, attention_mask)
        parts.append(model.caption_key_tokens(features.last_hidden_state, attention_mask))
        global_embeds.append(features.pooler_output)
    restore = torch.tensor(order).argsort()  # sorted position of every caption
    return CaptionKeyTokens.cat(parts).subset(restore), torch.cat(global_embeds)[restore.to(device)]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One ranking matrix per direction, `(n_img, n_cap)` each: a query's candidates hold their exact head scores,
    every other entry its first-stage score minus `NON_CANDIDATE_OFFSET` (below every head score). Consumes
    `global_scores`.
    """
    split = top_captions.numel()
    image_to_text_exact = pair_scores[inverse[:split]].view(top_captions.shape).to(global_scores.dtype)
    text_to_image_exact = pair_scores[inverse[split:]].view(top_images.shape).to(global_scores.dtype)
    text_to_image = global_scores.clone().sub_(NON_CANDIDATE_OFFSET)
    text_to_image.t().scatter_(1, top_images, text_to_image_exact)
    image_to_text = global_scores.sub_(NON_CANDIDATE_OFFSET).scatter_(1, top_captions, image_to_text_exact)
    return image_to_text, text_to_image


def two_stage_rank(
    global_scores: torch.Tensor,
    caption_to_image: torch.Tensor,
    top_k: int,
    score_exact,
    middle_top_n: int = 0,
    score_middle=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    Two-stage (or three-stage) retrieval over a whole split, both directions.

    1. `global_scores` `(n_img, n_cap)` (the global embeddings' cosine) rank every query's candidates;
    2. with `middle_top_n`, the top N of every query are re-ranked by `score_middle` (the caption-independent head);
    3. the top `top_k` of every query are scored by `score_exact` (the SCTA head).
    `score_*(image_index (P,), caption_index (P,)) -> (P,)` score distinct pairs, each once for both directions.

    Returns the image->text and text->image ranking matrices (`two_stage_score_matrices`) and statistics:
    candidate recall of the final k candidates (%), head pairs, middle-stage pairs. Consumes `global_scores`.
    """
    num_captions = global_scores.shape[1]

    def scored(top_captions, top_images, score):
        pair_keys, inverse = two_stage_pairs(top_captions, top_images)
        return pair_keys, inverse, score(pair_keys // num_captions, pair_keys % num_captions)

    stats = {}
    image_to_text_stage = text_to_image_stage = global_scores
    if middle_top_n:
        top_captions, top_images = first_stage_candidates(global_scores, middle_top_n)
        pair_keys, inverse, middle_scores = scored(top_captions, top_images, score_middle)
        # middle scores lie in [-0.2, 2] like the head's; shifted, they rank above every cosine (<= 1)
        image_to_text_stage, text_to_image_stage = two_stage_score_matrices(
            global_scores.clone(), top_captions, top_images, middle_scores + NON_CANDIDATE_OFFSET, inverse
        )
        stats["middle_pairs"] = len(pair_keys)
    top_captions = first_stage_candidates(image_to_text_stage, top_k)[0]
    top_images = first_stage_candidates(text_to_image_stage, top_k)[1]
    del image_to_text_stage, text_to_image_stage
    stats["candidate_recall_i2t"], stats["candidate_recall_t2i"] = candidate_recall(
        top_captions, top_images, caption_to_image
    )
    pair_keys, inverse, exact_scores = scored(top_captions, top_images, score_exact)
    stats["head_pairs"] = len(pair_keys)
    image_to_text, text_to_image = two_stage_score_matrices(
        global_scores, top_captions, top_images, exact_scores, inverse
    )
    return image_to_text, text_to_image, stats
