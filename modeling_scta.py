"""SCTA: an image tower, a text tower and a key-token alignment head for fine-grained image-text retrieval.

Reads top to bottom: small helpers, the output dataclass, the blocks (token aggregator, key-token alignment
head, loss), `SCTAPreTrainedModel` and `SCTAModel`. The head is the specification of `METHOD.md` computed
batched over (image, caption) pairs; `tests/reference_scta.py` holds the literal per-caption loop it is
tested against.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging


try:
    from .configuration_scta import SCTAConfig
except ImportError:
    from configuration_scta import SCTAConfig


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def text_lengths(text_attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of real tokens per caption, `(B_txt,)`, after checking the mask is right-padded."""
    if text_attention_mask.dim() != 2:
        raise ValueError(f"text_attention_mask must be (batch, length), got shape {tuple(text_attention_mask.shape)}.")
    mask = text_attention_mask.bool()
    lengths = mask.sum(-1)
    # The head reads [CLS] at position 0 and the words after it, so padding must come last.
    right_padded = mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])
    if not bool(right_padded.all()):
        bad = int((~right_padded.all(-1)).nonzero()[0])
        raise ValueError(
            f"text_attention_mask of caption {bad} is not right-padded ({mask[bad].int().tolist()}); SCTA needs the "
            "real tokens first. Tokenize with padding_side='right'."
        )
    if bool((lengths < 2).any()):
        bad = int((lengths < 2).nonzero()[0])
        raise ValueError(
            f"caption {bad} has {int(lengths[bad])} real token(s); SCTA needs at least [CLS] and one more token. "
            "Remove empty captions."
        )
    return lengths


def _spans(total: int, size: int):
    """Consecutive `slice`s of at most `size` covering `range(total)`."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _overflow_free_exponent(dtype: torch.dtype, token_norm: float, num_terms: int) -> float:
    """Largest `x` such that sums of `num_terms` tokens weighted by up to `exp(x)` can still be squared in `dtype`."""
    return 0.5 * math.log(torch.finfo(dtype).max) - math.log(max(token_norm, 1.0) * num_terms) - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class SCTAOutput(ModelOutput):
    """
    Output of [`SCTAModel.forward`]; the same fields in training and evaluation.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            Hinge ranking loss of the batch (sum over images and captions, METHOD.md "Training objective").
        logits_per_image (`torch.FloatTensor` of shape `(B_img, B_txt)`):
            SCTA score of every image against every caption.
        logits_per_text (`torch.FloatTensor` of shape `(B_txt, B_img)`):
            `logits_per_image.t()`.
        image_embeds (`torch.FloatTensor` of shape `(B_img, T_img, embed_size)`):
            Projected image tokens ([CLS] first where the tower has one, then the `N` patches).
        text_embeds (`torch.FloatTensor` of shape `(B_txt, L, embed_size)`):
            Projected caption tokens; positions where `attention_mask` is 0 are padding.
        kept_patch_fraction (`torch.FloatTensor` of shape `()`):
            Share of patch tokens the selection keeps, `K / N`. The published "ratio loss"
            `(kept_patch_fraction - patch_keep_ratio) ** 2` is built from this hard count, so it is a constant
            without gradient; it is reported as a statistic, never trained on.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    kept_patch_fraction: torch.FloatTensor | None = None


@dataclass
class TextKeyTokens:
    """Caption-side inputs of the head, computed once per caption."""

    tokens: torch.Tensor  # (B_txt, J, C) L2-normalised text key tokens U
    mask: torch.Tensor  # (B_txt, J) bool, True for real key tokens
    query: torch.Tensor  # (B_txt, C) norm(mean of the real caption tokens), no gradient; drives patch selection

    def __getitem__(self, index) -> "TextKeyTokens":
        """Select captions."""
        return TextKeyTokens(self.tokens[index], self.mask[index], self.query[index])

    def trimmed(self) -> "TextKeyTokens":
        """Drop the key-token positions that are padding for every caption here."""
        num_keys = int(self.mask.sum(-1).max())
        return TextKeyTokens(self.tokens[:, :num_keys], self.mask[:, :num_keys], self.query)


@dataclass
class ImageKeyState:
    """Image-side inputs of the head for a chunk of images, computed once per image."""

    patches: torch.Tensor  # (I, N, C) raw projected patch tokens P
    patch_directions: torch.Tensor  # (I, N, C) norm(P), no gradient
    self_scores: torch.Tensor  # (I, N) s_self = norm(P) . norm(mean(P)), no gradient
    cls: torch.Tensor | None  # (I, C) norm(c_v), None for towers without [CLS]
    slot_weights: torch.Tensor  # (I, N, M) exp(patch-slot logits - per-image shift), unnormalised softmax numerators
    # (I, N, M * N): slot_weights[i, k, m] * coordinates of P_k in an orthonormal basis of the image's patches
    weighted_coordinates: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class TokenAggregator(nn.Module):
    """
    Token-wise `LayerNorm -> Linear -> GELU -> Linear` giving, for every token, one logit per slot, times a learned
    scale (METHOD.md steps 3 and 5). A slot is the softmax-weighted sum of tokens under its logits.

    The last Linear has no bias: the softmax runs over tokens, so a per-slot constant cancels and a bias there
    would never receive a gradient.
    """

    def __init__(self, dim: int, num_slots: int, hidden_ratio: float):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_slots, bias=False)
        )
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(..., T, dim)` tokens -> `(..., T, num_slots)` scaled slot logits."""
        return self.mlp(tokens) * self.scale


class KeyTokenAlignmentHead(nn.Module):
    """
    The SCTA head: scores every image against every caption by aligning a few key tokens on each side
    (METHOD.md "The key-token head"). Batched over (image, caption) pairs in blocks of
    `image_chunk_size x text_chunk_size` pairs, which bounds memory; no per-caption loop.

    How the pair-dependent part stays cheap (METHOD.md "Performance notes"):
    - the patch aggregator is token-wise, so its logits are computed once per image;
    - key tokens are L2-normalised, so softmax normalisers cancel: a slot is `norm(sum_k keep_k e_km P_k)` with
      `e_km = exp(logit_km - shift_m)` for any per-image shift;
    - a slot's dot product with a text key token u is `sum_k keep_k e_km (u . P_k)`: all u . P_k of a block
      come from one matmul;
    - a slot's norm only needs P_k inside the span of the image's patches, where an orthonormal basis gives
      N-dimensional coordinates instead of C-dimensional ones (N = 196 < C = 512), and the kept-set sum becomes
      one matmul with the 0/1 keep matrix. The basis is treated as a constant: the norm's gradient lies in
      that span, so autograd still gives the exact gradient.
    """

    def __init__(
        self,
        embed_size: int,
        num_patches: int,
        vision_has_cls_token: bool,
        patch_keep_ratio: float = 0.5,
        patch_aggr_ratio: float = 0.3,
        word_keep_ratio: float = 0.75,
        min_word_slots: int = 4,
        max_word_slots: int = 100,
        aggregator_hidden_ratio: float = 0.2,
        word_aggregation: bool = True,
        negative_slope: float = 0.1,
    ):
        super().__init__()
        self.num_patches = num_patches
        self.vision_has_cls_token = vision_has_cls_token
        self.num_kept_patches = math.ceil(num_patches * patch_keep_ratio)
        self.num_patch_slots = int(num_patches * patch_keep_ratio * patch_aggr_ratio)
        self.word_keep_ratio = word_keep_ratio
        self.min_word_slots = min_word_slots
        self.max_word_slots = max_word_slots
        self.negative_slope = negative_slope
        self.patch_aggregator = TokenAggregator(embed_size, self.num_patch_slots, aggregator_hidden_ratio)
        # One learned layer for every caption; a caption with k slots uses its first k outputs (METHOD.md oddity 1).
        self.word_aggregator = (
            TokenAggregator(embed_size, max_word_slots, aggregator_hidden_ratio) if word_aggregation else None
        )

    # -- caption side ------------------------------------------------------------------------------------------

    def word_slot_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """`k = clamp(floor(word_keep_ratio * (n - 1)), min_word_slots, max_word_slots)` per caption of n tokens."""
        return (
            torch.floor(self.word_keep_ratio * (lengths - 1).double())
            .long()
            .clamp(self.min_word_slots, self.max_word_slots)
        )

    def text_key_tokens(self, text_tokens: torch.Tensor, text_attention_mask: torch.Tensor) -> TextKeyTokens:
        """Text key tokens `U = norm([T_0; word slots])` (or `norm(T)` without word aggregation), step 5."""
        lengths = text_lengths(text_attention_mask)
        token_mask = text_attention_mask.bool()  # (B_txt, L)
        with torch.no_grad():
            token_sum = (text_tokens * token_mask[..., None]).sum(1)  # (B_txt, C)
            query = F.normalize(token_sum / lengths[:, None].to(text_tokens.dtype), dim=-1)

        if self.word_aggregator is None:  # LAPS: every real caption token is a key token
            return TextKeyTokens(F.normalize(text_tokens, dim=-1), token_mask, query)

        slot_counts = self.word_slot_counts(lengths)  # (B_txt,)
        max_slots = int(slot_counts.max())
        words, word_mask = text_tokens[:, 1:], token_mask[:, 1:]  # the n - 1 tokens after [CLS], [SEP] included
        logits = self.word_aggregator(words)[..., :max_slots]  # (B_txt, L - 1, max_slots)
        logits = logits.masked_fill(~word_mask[..., None], torch.finfo(logits.dtype).min)
        slots = torch.einsum("bls,blc->bsc", logits.softmax(dim=1), words)  # (B_txt, max_slots, C)
        key_tokens = F.normalize(torch.cat([text_tokens[:, :1], slots], dim=1), dim=-1)  # (B_txt, 1 + max_slots, C)
        key_mask = torch.arange(1 + max_slots, device=lengths.device) < (1 + slot_counts)[:, None]
        return TextKeyTokens(key_tokens, key_mask, query)

    # -- image side --------------------------------------------------------------------------------------------

    def split_image_tokens(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(B, T_img, C)` -> ([CLS] `(B, C)` or None, patches `(B, N, C)`)."""
        expected = self.num_patches + int(self.vision_has_cls_token)
        if image_tokens.dim() != 3 or image_tokens.shape[1] != expected:
            raise ValueError(
                f"image tokens must be (batch, {expected}, embed_size) for this image tower "
                f"({'[CLS] + ' if self.vision_has_cls_token else ''}{self.num_patches} patches), "
                f"got shape {tuple(image_tokens.shape)}. Were they made by get_image_features of this model?"
            )
        if self.vision_has_cls_token:
            return image_tokens[:, 0], image_tokens[:, 1:]
        return None, image_tokens

    def image_key_state(self, image_tokens: torch.Tensor) -> ImageKeyState:
        """Everything of steps 1-4 that depends on the image alone."""
        cls, patches = self.split_image_tokens(image_tokens)  # (I, C), (I, N, C)
        logits = self.patch_aggregator(patches)  # (I, N, M), token-wise: once per image, not per pair
        with torch.no_grad():
            patch_directions = F.normalize(patches, dim=-1)
            image_query = F.normalize(patches.mean(1), dim=-1)  # (I, C), mean of the raw tokens
            self_scores = torch.einsum("inc,ic->in", patch_directions, image_query)  # (I, N)
            qr_input = patches.float() if patches.dtype in (torch.float16, torch.bfloat16) else patches
            basis = torch.linalg.qr(qr_input.transpose(1, 2)).Q.to(patches.dtype)  # (I, C, N)
            # Any K kept patches include one whose logit is >= the K-th smallest, so with this shift the
            # largest softmax numerator of every slot is >= 1 and never underflows.
            shift = logits.kthvalue(self.num_kept_patches, dim=1, keepdim=True).values  # (I, 1, M)
            exponent_range = float((logits.amax(1, keepdim=True) - shift).max())
            token_norm = float(patches.norm(dim=-1).max())
        coordinates = patches @ basis  # (I, N, N)

        work_dtype = patches.dtype
        limit = _overflow_free_exponent(work_dtype, token_norm, self.num_patches)
        if exponent_range > limit:
            # Rare: a very sharp aggregator. Widen the chunk's arithmetic rather than lose the numerators.
            work_dtype = torch.float64 if patches.dtype == torch.float32 else torch.float32
            limit = _overflow_free_exponent(work_dtype, token_norm, self.num_patches)
            if exponent_range > limit:
                raise FloatingPointError(
                    f"patch aggregator logits span {exponent_range:.1f} within an image, beyond what "
                    f"{work_dtype} can weight ({limit:.1f}); patch_aggregator.scale="
                    f"{float(self.patch_aggregator.scale):.3g} has diverged. Lower the learning rate."
                )
            logger.debug("patch slot logits span %.1f: scoring this image chunk in %s", exponent_range, work_dtype)
        slot_weights = torch.exp(logits.to(work_dtype) - shift.to(work_dtype))  # (I, N, M)
        weighted_coordinates = slot_weights[..., None] * coordinates.to(work_dtype)[:, :, None, :]  # (I, N, M, N)
        return ImageKeyState(
            patches=patches.to(work_dtype),
            patch_directions=patch_directions.to(work_dtype),
            self_scores=self_scores.to(work_dtype),
            cls=None if cls is None else F.normalize(cls, dim=-1).to(work_dtype),
            slot_weights=slot_weights,
            weighted_coordinates=weighted_coordinates.flatten(2),
        )

    # -- pairs -------------------------------------------------------------------------------------------------

    def block_scores(self, image: ImageKeyState, text: TextKeyTokens) -> torch.Tensor:
        """Scores `(I, T)` of a block of I images against T captions (steps 1-6 for every pair)."""
        patches, slot_weights = image.patches, image.slot_weights  # (I, N, C), (I, N, M)
        num_images, num_patches, width = patches.shape
        num_slots = slot_weights.shape[-1]
        key_tokens = text.tokens.to(patches.dtype)  # (T, J, C)
        num_texts, num_keys, _ = key_tokens.shape

        with torch.no_grad():  # steps 1-2: selection scores carry no gradient
            text_scores = torch.einsum("inc,tc->itn", image.patch_directions, text.query.to(patches.dtype))
            patch_scores = image.self_scores[:, None, :] + text_scores  # (I, T, N)
            kept_index = patch_scores.topk(self.num_kept_patches, dim=-1, sorted=False).indices  # (I, T, K)
            keep = torch.zeros_like(patch_scores).scatter_(-1, kept_index, 1.0)  # (I, T, N) 0/1
            # softmax over the dropped patches, unnormalised: the fused token is normalised anyway
            fuse_weights = patch_scores.exp_().mul_(1.0 - keep)  # (I, T, N)

        # step 2: fused token of the dropped patches against every text key token
        fused = F.normalize(torch.bmm(fuse_weights, patches), dim=-1)  # (I, T, C)
        fused_sim = torch.einsum("itc,tjc->itj", fused, key_tokens)  # (I, T, J)

        # step 3: aggregated slots. Numerators u_j . sum_k keep_k e_km P_k from all u . P_k at once
        word_patch = torch.matmul(patches, key_tokens.reshape(num_texts * num_keys, width).t())  # (I, N, T*J)
        word_patch = word_patch.view(num_images, num_patches, num_texts, num_keys) * keep.transpose(1, 2)[..., None]
        numerators = torch.bmm(word_patch.view(num_images, num_patches, -1).transpose(1, 2), slot_weights)
        numerators = numerators.view(num_images, num_texts, num_keys, num_slots)  # (I, T, J, M)
        # ... and norms ||sum_k keep_k e_km P_k|| from the N-dimensional coordinates of the patches
        slot_coordinates = torch.bmm(keep, image.weighted_coordinates)  # (I, T, M*N)
        slot_norms = torch.linalg.vector_norm(slot_coordinates.view(num_images, num_texts, num_slots, -1), dim=-1)
        slot_sim = numerators / slot_norms.clamp_min(1e-12)[:, :, None, :]  # (I, T, J, M)

        # step 4: image key tokens [c_v; A_v; f]
        columns = [slot_sim, fused_sim[..., None]]
        if image.cls is not None:
            columns.insert(0, torch.einsum("tjc,ic->itj", key_tokens, image.cls)[..., None])
        similarities = torch.cat(columns, dim=-1)  # (I, T, J, M + 1 [+ 1])
        return max_mean_alignment(similarities, text.mask, self.negative_slope)

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Scores `(B_img, B_txt)` of every image against every caption."""
        if image_tokens.shape[-1] != text_tokens.shape[-1]:
            raise ValueError(
                f"image tokens have width {image_tokens.shape[-1]} but text tokens {text_tokens.shape[-1]}; "
                "both must be projected to embed_size."
            )
        if text_attention_mask.shape != text_tokens.shape[:2]:
            raise ValueError(
                f"text_attention_mask has shape {tuple(text_attention_mask.shape)}, text tokens "
                f"{tuple(text_tokens.shape)}; they must agree on (batch, length)."
            )
        default_images, default_texts = default_chunk_sizes(image_tokens.device)
        image_chunk_size = image_chunk_size or default_images
        text_chunk_size = text_chunk_size or default_texts
        if image_chunk_size < 1 or text_chunk_size < 1:
            raise ValueError(f"chunk sizes must be >= 1, got ({image_chunk_size}, {text_chunk_size}).")

        text_blocks, order = self.text_key_blocks(text_tokens, text_attention_mask, text_chunk_size)
        sorted_scores = self.score_text_blocks(image_tokens, text_blocks, image_chunk_size)
        return sorted_scores.index_select(1, order.argsort())  # (B_img, B_txt), captions back in input order

    def text_key_blocks(
        self, text_tokens: torch.Tensor, text_attention_mask: torch.Tensor, text_chunk_size: int
    ) -> tuple[list[TextKeyTokens], torch.Tensor]:
        """
        Text key tokens in blocks of at most `text_chunk_size` captions, sorted by key-token count so that little
        of a block is padding.

        Returns:
            the blocks, and `order` `(B_txt,)`: block captions, concatenated, are `order` of the input's.
        """
        text = self.text_key_tokens(text_tokens, text_attention_mask)
        order = text.mask.sum(-1).argsort(stable=True)
        text = text[order]
        return [text[span].trimmed() for span in _spans(len(order), text_chunk_size)], order

    def score_text_blocks(
        self, image_tokens: torch.Tensor, text_blocks: list[TextKeyTokens], image_chunk_size: int
    ) -> torch.Tensor:
        """Scores `(B_img, sum of block sizes)` of every image against the captions of `text_blocks`, in order."""
        recompute = torch.is_grad_enabled()  # keep memory to one block during training
        rows = []
        for image_span in _spans(image_tokens.shape[0], image_chunk_size):
            if recompute:
                row = [
                    checkpoint(self._score_tokens, image_tokens[image_span], b.tokens, b.mask, b.query, use_reentrant=False)
                    for b in text_blocks
                ]
            else:
                image = self.image_key_state(image_tokens[image_span])  # once per image, for every block
                row = [self.block_scores(image, b) for b in text_blocks]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0).to(image_tokens.dtype)

    def _score_tokens(self, image_tokens, text_key_tokens, text_key_mask, text_query) -> torch.Tensor:
        return self.block_scores(
            self.image_key_state(image_tokens), TextKeyTokens(text_key_tokens, text_key_mask, text_query)
        )


def default_chunk_sizes(device: torch.device) -> tuple[int, int]:
    """(images, captions) per block of pairs; chosen with `bench/bench_similarity.py` (see bench/RESULTS.md)."""
    if device.type == "cuda":
        return 64, 1024
    return 16, 128


def max_mean_alignment(similarities: torch.Tensor, key_mask: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """
    Step 6: `S = leaky_relu(U V^T)`; score = mean over text keys of the max over image keys + mean over image keys
    of the max over (real) text keys.

    Args:
        similarities: `(..., T, J, V)` cosine similarities of J text key tokens and V image key tokens.
        key_mask: `(T, J)` bool, True for real text key tokens.
    Returns:
        `(..., T)` scores.
    """
    # leaky_relu is increasing, so it commutes with max: apply it to the maxima only.
    text_best = F.leaky_relu(similarities.max(-1).values, negative_slope)  # (..., T, J)
    text_part = (text_best * key_mask).sum(-1) / key_mask.sum(-1)
    masked = similarities.masked_fill(~key_mask[..., None], torch.finfo(similarities.dtype).min)
    image_part = F.leaky_relu(masked.max(-2).values, negative_slope).mean(-1)  # (..., T)
    return text_part + image_part


def hinge_loss_one_direction(
    scores: torch.Tensor,
    positive_scores: torch.Tensor,
    positive_mask: torch.Tensor,
    margin: float = 0.2,
    hardest_negative: bool = True,
) -> torch.Tensor:
    """
    Hinge ranking loss of queries (rows) against candidates (columns).

    Args:
        scores: `(Q, D)` score of every query against every candidate.
        positive_scores: `(Q,)` score of each query with its own positive.
        positive_mask: `(Q, D)` bool, True where the candidate is a positive of the query (never a negative).
        margin: hinge margin.
        hardest_negative: True: only the hardest negative per query (VSE++); False: sum over all negatives.
    Returns:
        `()` summed loss.
    """
    cost = (margin + scores - positive_scores[:, None]).clamp_min(0).masked_fill(positive_mask, 0.0)
    return cost.max(dim=1).values.sum() if hardest_negative else cost.sum()


def scta_loss(
    logits_per_image: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    hardest_negative: bool = True,
) -> torch.Tensor:
    """
    SCTA's training objective on a batch of B (image, caption) pairs (METHOD.md "Training objective").

    Args:
        logits_per_image: `(B, B)` scores, row i the image of pair i, column j the caption of pair j.
        image_ids: `(B,)` image id of each pair; pairs that share an image are positives of each other and never
            count as negatives. Default: every pair has its own image.
        margin: hinge margin (0.2).
        hardest_negative: hardest negative only (after the warm-up epochs) or sum over all negatives.
    Returns:
        `()` image-to-text plus text-to-image loss.
    """
    batch = logits_per_image.shape[0]
    if logits_per_image.dim() != 2 or logits_per_image.shape[1] != batch:
        raise ValueError(
            f"the loss needs a square (pairs x pairs) score matrix, got shape {tuple(logits_per_image.shape)}."
        )
    if image_ids is None:
        image_ids = torch.arange(batch, device=logits_per_image.device)
    elif image_ids.shape != (batch,):
        raise ValueError(f"image_ids must have shape ({batch},) to match the scores, got {tuple(image_ids.shape)}.")
    positive_mask = image_ids[:, None] == image_ids[None, :]
    positives = logits_per_image.diagonal()
    image_to_text = hinge_loss_one_direction(logits_per_image, positives, positive_mask, margin, hardest_negative)
    text_to_image = hinge_loss_one_direction(logits_per_image.t(), positives, positive_mask, margin, hardest_negative)
    return image_to_text + text_to_image


# ----------------------------------------------------------------------------------------------------------------
# Models


class SCTAPreTrainedModel(PreTrainedModel):
    config: SCTAConfig
    config_class = SCTAConfig
    base_model_prefix = "scta"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, strict by default: a checkpoint key that is missing, unexpected or of
        another shape is an error that names it, instead of a warning and a randomly initialised weight. Pass
        `strict=False` to load partially (missing weights are then initialised by `_init_weights`), and
        `ignore_mismatched_sizes=True` to re-initialise weights whose shape differs.
        """
        return_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        problems = {}
        if strict:
            problems.update({kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys")})
        if not allow_mismatch:
            problems["mismatched_keys"] = sorted(
                f"{key} (checkpoint {tuple(saved)}, model {tuple(expected)})"
                for key, saved, expected in info.get("mismatched_keys") or ()
            )
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            details = "; ".join(f"{kind}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}" for kind, keys in problems.items())
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(
                f"The checkpoint {source} does not match {cls.__name__} ({details}). Was it saved by another version "
                "or configuration? strict=False loads it without the missing or unexpected keys."
            )
        return (model, info) if return_info else model

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            # PyTorch's default, as in the published head
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, TokenAggregator):
            init.ones_(module.scale)
        elif isinstance(module, SCTAModel):
            # Xavier projections, as in the published encoders
            for projection in (module.vision_projection, module.text_projection):
                if isinstance(projection, nn.Linear):
                    init.xavier_uniform_(projection.weight)
                    init.zeros_(projection.bias)


def _tower_from_config(config) -> PreTrainedModel:
    model_class = AutoModel._model_mapping[type(config)]
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}
    return AutoModel.from_config(config, **kwargs)


class SCTAModel(SCTAPreTrainedModel):
    """
    SCTA: image and text towers, linear projections to `embed_size`, and the key-token alignment head.

    Example:

    ```python
    >>> model = SCTAModel.from_vision_text_pretrained("google/vit-base-patch16-224-in21k", "bert-base-uncased")
    >>> outputs = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    >>> outputs.logits_per_image.shape  # (images, captions)
    ```
    """

    def __init__(
        self,
        config: SCTAConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        config.check_settings()
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else _tower_from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else _tower_from_config(config.text_config)
        # the towers read the composite config, so that edits to it reach them
        self.vision_model.config = config.vision_config
        self.text_model.config = config.text_config

        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        embed_size = config.embed_size
        self.vision_projection = nn.Linear(vision_width, embed_size) if vision_width != embed_size else nn.Identity()
        self.text_projection = nn.Linear(text_width, embed_size) if text_width != embed_size else nn.Identity()
        self.head = KeyTokenAlignmentHead(
            embed_size=embed_size,
            num_patches=config.num_patches,
            vision_has_cls_token=config.vision_has_cls_token,
            patch_keep_ratio=config.patch_keep_ratio,
            patch_aggr_ratio=config.patch_aggr_ratio,
            word_keep_ratio=config.word_keep_ratio,
            min_word_slots=config.min_word_slots,
            max_word_slots=config.max_word_slots,
            aggregator_hidden_ratio=config.aggregator_hidden_ratio,
            word_aggregation=config.word_aggregation,
            negative_slope=config.alignment_negative_slope,
        )
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` pixels -> projected image tokens `(B, T_img, embed_size)` (all tokens, no pooler)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got {tuple(pixel_values.shape)}.")
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.vision_projection(hidden)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(B, L)` token ids -> projected caption tokens `(B, L, embed_size)` (padding positions included)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (batch, length), got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}."
            )
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(hidden)

    def similarity(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """
        SCTA score of every image against every caption.

        Args:
            image_embeds: `(B_img, T_img, C)` from `get_image_features`.
            text_embeds: `(B_txt, L, C)` from `get_text_features`.
            text_attention_mask: `(B_txt, L)`, right-padded.
            image_chunk_size, text_chunk_size: pairs are scored in blocks of this many images x captions, which
                bounds memory (default: `default_chunk_sizes(device)`). Results do not depend on them.
        Returns:
            `(B_img, B_txt)` scores.
        """
        return self.head(image_embeds, text_embeds, text_attention_mask, image_chunk_size, text_chunk_size)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        hardest_negative: bool = True,
        **kwargs,
    ) -> SCTAOutput:
        r"""
        Args:
            pixel_values: `(B_img, 3, H, W)`.
            input_ids, attention_mask: `(B_txt, L)`, right-padded.
            image_ids: `(B,)` image id of each (image, caption) pair; pairs sharing an image are not negatives
                of each other in the loss.
            return_loss: compute the hinge loss; needs pairs (`B_img == B_txt`).
            hardest_negative: loss over the hardest negative only (True) or summed over all negatives (the
                recipe's first epoch).
        """
        if pixel_values is None or input_ids is None:
            raise ValueError("SCTAModel.forward needs both pixel_values and input_ids.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if return_loss and pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"return_loss=True needs (image, caption) pairs, but got {pixel_values.shape[0]} images and "
                f"{input_ids.shape[0]} captions."
            )
        if image_ids is not None and image_ids.shape != (pixel_values.shape[0],):
            raise ValueError(
                f"image_ids must have one id per image, shape ({pixel_values.shape[0]},); got {tuple(image_ids.shape)}."
            )
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids, attention_mask)
        logits_per_image = self.similarity(image_embeds, text_embeds, attention_mask)
        loss = None
        if return_loss:
            loss = scta_loss(logits_per_image, image_ids, self.config.margin, hardest_negative)
        kept = torch.tensor(self.head.num_kept_patches / self.head.num_patches, device=logits_per_image.device)
        return SCTAOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            kept_patch_fraction=kept,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **kwargs
    ) -> "SCTAModel":
        """
        An SCTA model with pretrained towers (Hub names or local folders) and a freshly initialised head.

        Keyword arguments starting with `vision_` / `text_` go to the towers' `from_pretrained` (e.g.
        `vision_revision="..."`); the others set `SCTAConfig` fields (e.g. `embed_size=512`).
        """
        tower_kwargs = {"vision": {}, "text": {}}
        for key in list(kwargs):
            for side in tower_kwargs:
                if key.startswith(side + "_"):
                    tower_kwargs[side][key[len(side) + 1 :]] = kwargs.pop(key)
        towers = {}
        for side, name in (("vision", vision_model_name_or_path), ("text", text_model_name_or_path)):
            tower_config = AutoConfig.from_pretrained(name, **tower_kwargs[side])
            model_class = AutoModel._model_mapping[type(tower_config)]
            if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
                tower_kwargs[side].setdefault("add_pooling_layer", False)
            towers[side] = AutoModel.from_pretrained(name, config=tower_config, **tower_kwargs[side])
        config = SCTAConfig.from_vision_text_configs(towers["vision"].config, towers["text"].config, **kwargs)
        return cls(config, vision_model=towers["vision"], text_model=towers["text"])


AutoConfig.register("scta", SCTAConfig, exist_ok=True)
AutoModel.register(SCTAConfig, SCTAModel, exist_ok=True)
SCTAConfig.register_for_auto_class()
SCTAModel.register_for_auto_class("AutoModel")


__all__ = ["SCTAModel", "SCTAPreTrainedModel", "KeyTokenAlignmentHead", "TokenAggregator", "scta_loss"]
