"""SCTA: an image tower, a text tower and a key-token alignment head for fine-grained image-text retrieval.

Reads top to bottom: small helpers, the output dataclass and the encode-once caption corpus (`CaptionKeyTokens`),
the blocks (token aggregator, key-token alignment head with its full-matrix and candidate-pair scorers, the
global-cosine scorer, the first-stage adapter, the hinge loss), `SCTAPreTrainedModel` and `SCTAModel`.
Training across processes and the adapter's own loss live in `scta_train/loss.py` (not shipped). The head is the specification of `docs/METHOD.md` computed
batched over (image, caption) pairs; `scta_train/reference.py` holds the literal per-caption loop it is
tested against. Two-stage retrieval over these pieces: docs/RETRIEVAL.md and `scta_train.retrieval.two_stage_rank`.
"""

import inspect
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple, logging


try:
    from .configuration_scta import COMPOSITE_CHECKPOINTS, SCTAConfig, num_kept_patches, num_patch_slots
except ImportError:
    from configuration_scta import COMPOSITE_CHECKPOINTS, SCTAConfig, num_kept_patches, num_patch_slots


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


def cosine_similarity_matrix(image_vectors: torch.Tensor, text_vectors: torch.Tensor) -> torch.Tensor:
    """`(B_img, C)`, `(B_txt, C)` -> `(B_img, B_txt)` cosine similarities."""
    return F.normalize(image_vectors, dim=-1) @ F.normalize(text_vectors, dim=-1).t()


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
            Hinge ranking loss of the batch (sum over images and captions, docs/METHOD.md "Training objective").
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
        image_global_embeds (`torch.FloatTensor` of shape `(B_img, embed_size)`):
            One vector per image (`config.global_pooling`), not normalised: the first stage of two-stage retrieval
            compares them by cosine (`SCTAModel.global_similarity`).
        text_global_embeds (`torch.FloatTensor` of shape `(B_txt, embed_size)`):
            One vector per caption, likewise.
        vision_model_output, text_model_output (`BaseModelOutputWithPooling`):
            `get_image_features` / `get_text_features` of the batch: projected tokens, global embedding, and the
            towers' `hidden_states` / `attentions` when asked for.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    kept_patch_fraction: torch.FloatTensor | None = None
    image_global_embeds: torch.FloatTensor | None = None
    text_global_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        # as CLIPOutput: the nested tower outputs become tuples too
        return tuple(
            value.to_tuple() if name in ("vision_model_output", "text_model_output") else value
            for name, value in self.items()
        )


@dataclass
class TextKeyTokens:
    """
    Caption-side inputs of the head for a block of captions, padded to the block's longest key-token count.
    The leading dimensions are `(T,)` for captions shared by every image of a block, or `(I, T)` for captions
    that belong to one image each (candidate pairs).
    """

    tokens: torch.Tensor  # (..., J, C) L2-normalised text key tokens U
    mask: torch.Tensor  # (..., J) bool, True for real key tokens
    query: torch.Tensor  # (..., C) norm(mean of the real caption tokens), no gradient; drives patch selection


@dataclass
class CaptionKeyTokens:
    """
    The caption side of the SCTA head for a corpus of captions, computed once (text tower, projection and word
    aggregation) and reused for every image, every evaluation and every query. Stored ragged: caption `i` owns
    `tokens[offsets[i]:offsets[i + 1]]`, so a corpus costs its real key tokens only.

    Made by `SCTAModel.caption_key_tokens`; scored by `SCTAModel.score` / `SCTAModel.score_candidates`. Batches of
    captions encoded separately join with `CaptionKeyTokens.cat`.
    """

    tokens: torch.Tensor  # (total key tokens, C) L2-normalised text key tokens, caption after caption
    offsets: torch.Tensor  # (n + 1,) long, on the CPU
    query: torch.Tensor  # (n, C) norm(mean of each caption's real tokens), drives the patch selection
    # (n, C) each caption's global embedding (`pooler_output`), for the first stage and the fused score; None when
    # made by the head alone (`SCTAModel.caption_key_tokens` fills it)
    global_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.query.shape[0]

    @property
    def key_counts(self) -> torch.Tensor:
        """`(n,)` number of key tokens of each caption."""
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_padded(cls, padded: TextKeyTokens) -> "CaptionKeyTokens":
        """From the padded `(n, J, C)` key tokens of one batch (real keys first in every row)."""
        counts = padded.mask.sum(-1).cpu()
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(padded.tokens[padded.mask], offsets, padded.query)

    @classmethod
    def cat(cls, parts: "list[CaptionKeyTokens]") -> "CaptionKeyTokens":
        """One corpus from several, captions in the order given."""
        if not parts:
            raise ValueError("CaptionKeyTokens.cat needs at least one part.")
        starts = torch.tensor([0] + [int(part.offsets[-1]) for part in parts]).cumsum(0)
        offsets = torch.cat([parts[0].offsets[:1]] + [part.offsets[1:] + start for part, start in zip(parts, starts)])
        has_global = [part.global_embeds is not None for part in parts]
        if any(has_global) and not all(has_global):
            raise ValueError("CaptionKeyTokens.cat: some parts carry global embeddings and others do not.")
        global_embeds = torch.cat([part.global_embeds for part in parts]) if all(has_global) else None
        return cls(torch.cat([p.tokens for p in parts]), offsets, torch.cat([p.query for p in parts]), global_embeds)

    def subset(self, caption_index: torch.Tensor) -> "CaptionKeyTokens":
        """The captions `caption_index` `(n',)`, in that order, as a corpus of their own."""
        caption_index = torch.as_tensor(caption_index).cpu().long()
        counts = self.key_counts[caption_index]
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # position of every kept key token in self.tokens
        positions = torch.repeat_interleave(self.offsets[caption_index] - offsets[:-1], counts) + torch.arange(
            int(offsets[-1])
        )
        device = self.tokens.device
        global_embeds = None if self.global_embeds is None else self.global_embeds[caption_index.to(device)]
        return CaptionKeyTokens(
            self.tokens[positions.to(device)], offsets, self.query[caption_index.to(device)], global_embeds
        )

    def to(self, *args, **kwargs) -> "CaptionKeyTokens":
        """`Tensor.to` on the tokens (device and/or dtype); offsets stay on the CPU."""
        global_embeds = None if self.global_embeds is None else self.global_embeds.to(*args, **kwargs)
        return CaptionKeyTokens(
            self.tokens.to(*args, **kwargs), self.offsets, self.query.to(*args, **kwargs), global_embeds
        )

    def select(self, caption_index: torch.Tensor) -> TextKeyTokens:
        """
        Padded key tokens of the captions `caption_index` (any shape `S`): tokens `(*S, J, C)`, mask `(*S, J)`,
        query `(*S, C)`, with `J` the largest key count among them. Differentiable (a gather).
        """
        caption_index = caption_index.cpu()
        if len(self) == 0 or caption_index.numel() == 0:
            raise ValueError("select() needs at least one caption.")
        starts, counts = self.offsets[caption_index], self.key_counts[caption_index]  # (*S,)
        positions = starts[..., None] + torch.arange(int(counts.max()))  # (*S, J)
        mask = positions < (starts + counts)[..., None]
        positions = torch.where(mask, positions, starts[..., None])  # padding repeats a real token; masked anyway
        device = self.tokens.device
        # index_select: several times faster than advanced indexing for these row gathers on the CPU
        tokens = self.tokens.index_select(0, positions.reshape(-1).to(device)).view(*positions.shape, -1)
        query = self.query.index_select(0, caption_index.reshape(-1).to(device)).view(*caption_index.shape, -1)
        return TextKeyTokens(tokens, mask.to(device), query)


@dataclass
class ImageKeyState:
    """Image-side inputs of the head for a chunk of images, computed once per image."""

    patches: torch.Tensor  # (I, N, C) raw projected patch tokens P
    patch_directions: torch.Tensor  # (I, N, C) norm(P), no gradient
    self_scores: torch.Tensor  # (I, N) s_self = norm(P) . norm(mean(P)), no gradient
    cls: torch.Tensor | None  # (I, C) norm(c_v), None for towers without [CLS]
    slot_weights: torch.Tensor  # (I, N, M) exp(patch-slot logits - per-image shift), unnormalised softmax numerators
    # (I, N, M * N): slot_weights[i, k, m] * coordinates of P_k in an orthonormal basis of the image's patches; None
    # when the slot norms are computed from the patches directly (few captions per image: `image_key_state`)
    weighted_coordinates: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class TokenAggregator(nn.Module):
    """
    Token-wise `LayerNorm -> Linear -> GELU -> Linear` giving, for every token, one logit per slot, times a learned
    scale (docs/METHOD.md steps 3 and 5). A slot is the softmax-weighted sum of tokens under its logits.

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
    (docs/METHOD.md "The key-token head"). Batched over (image, caption) pairs in blocks of
    `image_chunk_size x text_chunk_size` pairs, which bounds memory; no per-caption loop.

    How the pair-dependent part stays cheap (docs/METHOD.md "Performance notes"):
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

    reranks = True  # the exact scores two-stage retrieval re-ranks candidates with

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
        text_guided_selection: bool = True,
        text_global_token: str = "first",
    ):
        super().__init__()
        if text_global_token not in ("first", "last"):
            raise ValueError(f"text_global_token must be 'first' or 'last', got {text_global_token!r}.")
        self.num_patches = num_patches
        self.vision_has_cls_token = vision_has_cls_token
        self.text_global_token = text_global_token
        self.num_kept_patches = num_kept_patches(num_patches, patch_keep_ratio)
        self.num_patch_slots = num_patch_slots(num_patches, patch_keep_ratio, patch_aggr_ratio)
        self.word_keep_ratio = word_keep_ratio
        self.min_word_slots = min_word_slots
        self.max_word_slots = max_word_slots
        self.negative_slope = negative_slope
        self.text_guided_selection = text_guided_selection
        self.patch_aggregator = TokenAggregator(embed_size, self.num_patch_slots, aggregator_hidden_ratio)
        # One learned layer for every caption; a caption with k slots uses its first k outputs (docs/METHOD.md oddity 1).
        self.word_aggregator = (
            TokenAggregator(embed_size, max_word_slots, aggregator_hidden_ratio) if word_aggregation else None
        )

    @classmethod
    def from_config(cls, config: SCTAConfig) -> "KeyTokenAlignmentHead":
        """The head of an `SCTAConfig`: its head settings and what it derives from the towers."""
        return cls(
            embed_size=config.embed_size,
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
            text_guided_selection=config.text_guided_selection,
            text_global_token=config.text_global_token,
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
        global_token, words, weights = self.word_slot_weights(text_tokens, token_mask, lengths, max_slots)
        slots = torch.einsum("bls,blc->bsc", weights, words)  # (B_txt, max_slots, C)
        key_tokens = F.normalize(torch.cat([global_token[:, None], slots], dim=1), dim=-1)  # (B_txt, 1 + max_slots, C)
        key_mask = torch.arange(1 + max_slots, device=lengths.device) < (1 + slot_counts)[:, None]
        return TextKeyTokens(key_tokens, key_mask, query)

    def word_slot_weights(
        self, text_tokens: torch.Tensor, token_mask: torch.Tensor, lengths: torch.Tensor, num_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global token `(B, C)`, word tokens `(B, L', C)`, the weight of every word in each of the first
        `num_slots` word slots `(B, L', num_slots)`, softmax over the caption's real words)."""
        global_token, words, word_mask = self.split_caption_tokens(text_tokens, token_mask, lengths)
        logits = self.word_aggregator(words)[..., :num_slots]  # (B, L', num_slots)
        logits = logits.masked_fill(~word_mask[..., None], torch.finfo(logits.dtype).min)
        return global_token, words, logits.softmax(dim=1)

    def split_caption_tokens(
        self, text_tokens: torch.Tensor, token_mask: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global token `(B, C)`, word tokens `(B, L', C)`, their mask): `split_caption_tokens` with this head's
        `text_global_token`."""
        return split_caption_tokens(text_tokens, token_mask, lengths, self.text_global_token)

    # -- image side --------------------------------------------------------------------------------------------

    def split_image_tokens(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(B, T_img, C)` -> ([CLS] `(B, C)` or None, patches `(B, N, C)`)."""
        return split_image_tokens(image_tokens, self.num_patches, self.vision_has_cls_token)

    def image_key_state(self, image_tokens: torch.Tensor, with_basis: bool = True) -> ImageKeyState:
        """
        Everything of steps 1-4 that depends on the image alone. `with_basis`: also the patches' coordinates in an
        orthonormal basis, from which every caption's slot norms cost `2 N^2 M` instead of `2 N M C` (a QR per
        image, worth it when an image meets more than `DIRECT_SLOT_NORM_CAPTIONS` captions).
        """
        cls, patches = self.split_image_tokens(image_tokens)  # (I, C), (I, N, C)
        logits = self.patch_aggregator(patches)  # (I, N, M), token-wise: once per image, not per pair
        with torch.no_grad():
            patch_directions = F.normalize(patches, dim=-1)
            image_query = F.normalize(patches.mean(1), dim=-1)  # (I, C), mean of the raw tokens
            self_scores = torch.einsum("inc,ic->in", patch_directions, image_query)  # (I, N)
            if with_basis:
                qr_input = patches.float() if patches.dtype in (torch.float16, torch.bfloat16) else patches
                basis = torch.linalg.qr(qr_input.transpose(1, 2)).Q.to(patches.dtype)  # (I, C, N)
            # Any K kept patches include one whose logit is >= the K-th smallest, so with this shift the
            # largest softmax numerator of every slot is >= 1 and never underflows.
            shift = logits.kthvalue(self.num_kept_patches, dim=1, keepdim=True).values  # (I, 1, M)
            exponent_range = float((logits.amax(1, keepdim=True) - shift).max())
            token_norm = float(patches.norm(dim=-1).max())
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
        weighted_coordinates = None
        if with_basis:
            coordinates = (patches @ basis).to(work_dtype)  # (I, N, N)
            weighted_coordinates = (slot_weights[..., None] * coordinates[:, :, None, :]).flatten(2)  # (I, N, M*N)
        return ImageKeyState(
            patches=patches.to(work_dtype),
            patch_directions=patch_directions.to(work_dtype),
            self_scores=self_scores.to(work_dtype),
            cls=None if cls is None else F.normalize(cls, dim=-1).to(work_dtype),
            slot_weights=slot_weights,
            weighted_coordinates=weighted_coordinates,
        )

    # -- pairs -------------------------------------------------------------------------------------------------

    def block_scores(self, image: ImageKeyState, text: TextKeyTokens) -> torch.Tensor:
        """
        Scores `(I, T)` of a block of I images against T captions (steps 1-6 for every pair): the same T captions
        for every image (`text.tokens` of shape `(T, J, C)`), or T captions of each image's own (`(I, T, J, C)`).
        """
        return max_mean_alignment(self.block_similarities(image, text), text.mask, self.negative_slope)

    def block_similarities(self, image: ImageKeyState, text: TextKeyTokens) -> torch.Tensor:
        """
        Steps 1-5 of `block_scores`: the cosine `(I, T, J, V)` of every text key token with every image key token
        (`V = [c_v;] A_v; f`) of each pair, before step 6's alignment. The search tool's per-word report reads the
        best image key token of each word slot from it.
        """
        patches, slot_weights = image.patches, image.slot_weights  # (I, N, C), (I, N, M)
        num_images, num_patches, width = patches.shape
        num_slots = slot_weights.shape[-1]
        key_tokens = text.tokens.to(patches.dtype)  # (T, J, C) or (I, T, J, C)
        shared = key_tokens.dim() == 3  # one caption block for every image
        num_texts, num_keys = key_tokens.shape[-3:-1]

        with torch.no_grad():  # steps 1-2: selection scores carry no gradient
            patch_scores = self.selection_scores(image, text)  # (I, T, N)
            kept_index = patch_scores.topk(self.num_kept_patches, dim=-1, sorted=False).indices  # (I, T, K)
            keep = torch.zeros_like(patch_scores).scatter_(-1, kept_index, 1.0)  # (I, T, N) 0/1
            # softmax over the dropped patches, unnormalised: the fused token is normalised anyway
            fuse_weights = patch_scores.exp_().mul_(1.0 - keep)  # (I, T, N)

        # step 2: fused token of the dropped patches against every text key token
        fused = F.normalize(torch.bmm(fuse_weights, patches), dim=-1)  # (I, T, C)
        fused_sim = torch.einsum("itc,tjc->itj" if shared else "itc,itjc->itj", fused, key_tokens)  # (I, T, J)

        # step 3: aggregated slots. Numerators u_j . sum_k keep_k e_km P_k from all u . P_k at once
        if shared:
            word_patch = torch.matmul(patches, key_tokens.reshape(num_texts * num_keys, width).t())  # (I, N, T*J)
        else:
            word_patch = torch.bmm(patches, key_tokens.reshape(num_images, num_texts * num_keys, width).transpose(1, 2))
        word_patch = word_patch.view(num_images, num_patches, num_texts, num_keys) * keep.transpose(1, 2)[..., None]
        numerators = torch.bmm(word_patch.view(num_images, num_patches, -1).transpose(1, 2), slot_weights)
        numerators = numerators.view(num_images, num_texts, num_keys, num_slots)  # (I, T, J, M)
        # ... and norms ||sum_k keep_k e_km P_k||: from the N-dimensional coordinates of the patches, or (without
        # the basis) from the slot vectors themselves
        if image.weighted_coordinates is not None:
            slot_coordinates = torch.bmm(keep, image.weighted_coordinates)  # (I, T, M*N)
            slot_coordinates = slot_coordinates.view(num_images, num_texts, num_slots, -1)
        else:
            kept_weights = keep[..., None] * slot_weights[:, None]  # (I, T, N, M)
            slot_coordinates = torch.matmul(kept_weights.transpose(-1, -2), patches[:, None])  # (I, T, M, C)
        slot_norms = torch.linalg.vector_norm(slot_coordinates, dim=-1)  # (I, T, M)
        slot_sim = numerators / slot_norms.clamp_min(1e-12)[:, :, None, :]  # (I, T, J, M)

        # step 4: image key tokens [c_v; A_v; f]
        columns = [slot_sim, fused_sim[..., None]]
        if image.cls is not None:
            cls_sim = torch.einsum("tjc,ic->itj" if shared else "itjc,ic->itj", key_tokens, image.cls)
            columns.insert(0, cls_sim[..., None])
        return torch.cat(columns, dim=-1)  # (I, T, J, M + 1 [+ 1])

    @torch.no_grad()
    def selection_scores(self, image: ImageKeyState, text: TextKeyTokens) -> torch.Tensor:
        """Steps 1-2's patch scores `(I, T, N)`: `s_self + s_text` (`s_self` alone without text-guided selection);
        the `num_kept_patches` highest are kept, the others fused."""
        patches = image.patches
        num_images, num_patches = patches.shape[:2]
        shared = text.tokens.dim() == 3
        num_texts = text.tokens.shape[-3]
        if not self.text_guided_selection:  # the same selection for every caption
            return image.self_scores[:, None, :].expand(num_images, num_texts, num_patches).clone()
        query = text.query.to(patches.dtype)  # (T, C) or (I, T, C)
        text_scores = torch.einsum("inc,tc->itn" if shared else "inc,itc->itn", image.patch_directions, query)
        return image.self_scores[:, None, :] + text_scores

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
        if image_tokens.shape[0] == 0 or text_tokens.shape[0] == 0:
            self.split_image_tokens(image_tokens)
            return image_tokens.new_zeros(image_tokens.shape[0], text_tokens.shape[0])
        captions = self.caption_key_tokens(text_tokens, text_attention_mask)
        return self.score(image_tokens, captions, image_chunk_size, text_chunk_size)

    def caption_key_tokens(self, text_tokens: torch.Tensor, text_attention_mask: torch.Tensor) -> CaptionKeyTokens:
        """The caption side of every pair, once per caption: `(B_txt, L, C)` projected tokens -> key tokens."""
        return CaptionKeyTokens.from_padded(self.text_key_tokens(text_tokens, text_attention_mask))

    def score(
        self,
        image_tokens: torch.Tensor,
        captions: CaptionKeyTokens,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """
        Scores `(B_img, n)` of every image against every caption of `captions`, in blocks of
        `image_chunk_size x text_chunk_size` pairs. Captions are grouped by key-token count so that little of a
        block is padding; the result is in the captions' order. `image_tokens` may be stored in another dtype
        (float16 in an index) or on the CPU: each chunk is moved to the head's device and dtype.
        """
        image_chunk_size, text_chunk_size = self._chunk_sizes(captions.tokens.device, image_chunk_size, text_chunk_size)
        self.split_image_tokens(image_tokens[:0])  # shape check before any work
        device, dtype = captions.tokens.device, captions.tokens.dtype
        order = captions.key_counts.argsort(stable=True)
        blocks = [captions.select(order[span]) for span in _spans(len(order), text_chunk_size)]
        recompute = torch.is_grad_enabled()  # keep memory to one block during training
        rows = []
        for image_span in tqdm(
            _spans(image_tokens.shape[0], image_chunk_size), desc="Scoring pairs", disable=not progress
        ):
            chunk = image_tokens[image_span].to(device=device, dtype=dtype)
            if recompute:
                row = [
                    checkpoint(self._score_tokens, chunk, b.tokens, b.mask, b.query, use_reentrant=False)
                    for b in blocks
                ]
            else:
                image = self.image_key_state(chunk)  # once per image, for every block
                row = [self.block_scores(image, b) for b in blocks]
            rows.append(torch.cat(row, dim=1))
        sorted_scores = torch.cat(rows, dim=0) if rows else image_tokens.new_zeros(0, len(captions), dtype=dtype)
        return sorted_scores.index_select(1, order.argsort().to(device))  # captions back in input order

    def score_pairs(
        self,
        image_tokens: torch.Tensor,
        captions: CaptionKeyTokens,
        image_index: torch.Tensor,
        caption_index: torch.Tensor,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """
        Scores of the pairs `(image_tokens[image_index[p]], captions[caption_index[p]])`, `(P,)`, computing no
        other pair. Equal to the same entries of `score` (same arithmetic per pair). Pairs are grouped by image;
        each block holds up to `image_chunk_size` images with up to `text_chunk_size` of their captions each.
        """
        image_chunk_size, text_chunk_size = self._chunk_sizes(captions.tokens.device, image_chunk_size, text_chunk_size)
        self.split_image_tokens(image_tokens[:0])
        device, dtype = captions.tokens.device, captions.tokens.dtype
        scores = torch.empty(len(image_index), device=device, dtype=dtype)
        blocks = pair_blocks(image_index, caption_index, captions.key_counts, image_chunk_size, text_chunk_size)
        for block_images, block_captions, valid, pairs in tqdm(blocks, desc="Scoring candidates", disable=not progress):
            chunk = image_tokens.index_select(0, block_images.to(image_tokens.device)).to(device=device, dtype=dtype)
            with_basis = block_captions.shape[1] > DIRECT_SLOT_NORM_CAPTIONS
            block = self.block_scores(self.image_key_state(chunk, with_basis), captions.select(block_captions))
            scores[pairs.to(device)] = block[valid.to(device)]
        return scores

    def kept_slot_weights(self, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`(I, N, M)` weight of every patch in each learned patch slot, softmax over the kept patches (`keep`
        `(I, N)` bool; dropped patches weigh 0): step 3 for one fixed selection (the search tool's pictures)."""
        return self.patch_aggregator(patches).masked_fill(~keep[..., None], -math.inf).softmax(dim=1)

    def _chunk_sizes(self, device, image_chunk_size, text_chunk_size) -> tuple[int, int]:
        default_images, default_texts = default_chunk_sizes(device)
        image_chunk_size = image_chunk_size or default_images
        text_chunk_size = text_chunk_size or default_texts
        if image_chunk_size < 1 or text_chunk_size < 1:
            raise ValueError(f"chunk sizes must be >= 1, got ({image_chunk_size}, {text_chunk_size}).")
        return image_chunk_size, text_chunk_size

    def _score_tokens(self, image_tokens, text_key_tokens, text_key_mask, text_query) -> torch.Tensor:
        return self.block_scores(
            self.image_key_state(image_tokens), TextKeyTokens(text_key_tokens, text_key_mask, text_query)
        )


def split_image_tokens(
    image_tokens: torch.Tensor, num_patches: int, vision_has_cls_token: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`(B, T_img, C)` projected image tokens -> ([CLS] `(B, C)` or None, patches `(B, N, C)`)."""
    expected = num_patches + int(vision_has_cls_token)
    if image_tokens.dim() != 3 or image_tokens.shape[1] != expected:
        raise ValueError(
            f"image tokens must be (batch, {expected}, embed_size) for this image tower "
            f"({'[CLS] + ' if vision_has_cls_token else ''}{num_patches} patches), "
            f"got shape {tuple(image_tokens.shape)}. Were they made by get_image_features of this model?"
        )
    if vision_has_cls_token:
        return image_tokens[:, 0], image_tokens[:, 1:]
    return None, image_tokens


def split_caption_tokens(
    text_tokens: torch.Tensor, token_mask: torch.Tensor, lengths: torch.Tensor, text_global_token: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global token `(B, C)`, word tokens `(B, L', C)`, their mask): `T_0` and the n - 1 other real tokens.
    `text_global_token="first"`: [CLS] and the tokens after it ([SEP] included); `"last"`: the end-of-text token of a
    causal encoder (CLIP) and the tokens before it."""
    if text_global_token == "first":
        return text_tokens[:, 0], text_tokens[:, 1:], token_mask[:, 1:]
    rows = torch.arange(len(text_tokens), device=text_tokens.device)
    last = (lengths - 1).to(text_tokens.device)
    word_mask = token_mask.clone()
    word_mask[rows, last] = False
    return text_tokens[rows, last], text_tokens, word_mask


class GlobalPooling:
    """One vector per image and per caption (`config.global_pooling`): the mean of the patch tokens and of the
    caption's real tokens (the two vectors the head's patch selection uses), or the [CLS] / end-of-text tokens."""

    def __init__(self, num_patches: int, vision_has_cls_token: bool, text_global_token: str, global_pooling: str):
        self.num_patches, self.vision_has_cls_token = num_patches, vision_has_cls_token
        self.text_global_token, self.global_pooling = text_global_token, global_pooling

    @classmethod
    def from_config(cls, config: SCTAConfig) -> "GlobalPooling":
        return cls(config.num_patches, config.vision_has_cls_token, config.text_global_token, config.global_pooling)

    def image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """`(B, T_img, C)` -> `(B, C)`."""
        cls, patches = split_image_tokens(image_tokens, self.num_patches, self.vision_has_cls_token)
        if self.global_pooling == "cls" and cls is not None:
            return cls
        return patches.mean(1)  # the vector the head's s_self compares patches with

    def text(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(B, L, C)` -> `(B, C)`."""
        if self.global_pooling == "cls":  # the caption's global token: [CLS], or CLIP's end-of-text
            lengths = text_lengths(attention_mask)
            return split_caption_tokens(text_tokens, attention_mask.bool(), lengths, self.text_global_token)[0]
        mask = attention_mask.to(text_tokens.dtype)[..., None]  # (B, L, 1)
        return (text_tokens * mask).sum(1) / mask.sum(1).clamp_min(1)  # the head's s_text query, before norm


class GlobalCosineScorer(nn.Module):
    """
    `scoring_head="global"`: a pair's score is the cosine of the image's and the caption's global embeddings (a dual
    encoder; the ablation study's baseline). It has the scoring interface of `KeyTokenAlignmentHead` (`forward`,
    `caption_key_tokens`, `score`, `score_pairs`) and no parameters: a global-only model builds no key-token head.
    """

    reranks = False  # its scores are the first stage's: re-ranking candidates with them changes nothing

    def __init__(self, pooling: GlobalPooling):
        super().__init__()
        self.pooling = pooling

    def forward(self, image_tokens, text_tokens, text_attention_mask, image_chunk_size=None, text_chunk_size=None):
        """Scores `(B_img, B_txt)`."""
        return cosine_similarity_matrix(
            self.pooling.image(image_tokens), self.pooling.text(text_tokens, text_attention_mask)
        )

    def caption_key_tokens(self, text_tokens: torch.Tensor, text_attention_mask: torch.Tensor) -> CaptionKeyTokens:
        """The one key token of a caption: its normalised global embedding."""
        embeds = F.normalize(self.pooling.text(text_tokens, text_attention_mask), dim=-1)  # (B_txt, C)
        mask = torch.ones(len(embeds), 1, dtype=torch.bool, device=embeds.device)
        return CaptionKeyTokens.from_padded(TextKeyTokens(embeds[:, None], mask, embeds))

    def score(
        self, image_tokens, captions: CaptionKeyTokens, image_chunk_size=None, text_chunk_size=None, progress=False
    ):
        """`(B_img, n)` cosines of the images' global embeddings with the captions'."""
        caption_embeds = captions.query
        device, dtype = caption_embeds.device, caption_embeds.dtype
        parts = [
            self.pooling.image(image_tokens[span].to(device=device, dtype=dtype))
            for span in _spans(image_tokens.shape[0], 4096)
        ]
        image_global = torch.cat(parts) if parts else caption_embeds.new_zeros(0, caption_embeds.shape[-1])
        return F.normalize(image_global, dim=-1) @ caption_embeds.t()

    def score_pairs(self, image_tokens, captions: CaptionKeyTokens, image_index, caption_index, *chunks_and_progress):
        """Cosines of the `(P,)` chosen pairs."""
        device, dtype = captions.query.device, captions.query.dtype
        chosen = image_tokens.index_select(0, image_index.to(image_tokens.device)).to(device=device, dtype=dtype)
        caption_embeds = captions.query.index_select(0, caption_index.to(device))
        return (F.normalize(self.pooling.image(chosen), dim=-1) * caption_embeds).sum(-1)


class EmbeddingMap(nn.Module):
    """
    One side of the first-stage adapter, over L2-normalised global embeddings `(B, C)`: affine (`x W^T + b`) or a
    residual MLP (`x + gelu(x H^T + c) W^T + b`). Starts as the identity (`W = I`, resp. `W = 0`): an untrained
    adapter ranks exactly as the global embeddings' cosine, and initialising it draws no random number (so that a
    model with an adapter draws the same random stream as one without).
    """

    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.empty(width, width))
        self.bias = nn.Parameter(torch.empty(width))
        if kind == "mlp":
            self.hidden_weight = nn.Parameter(torch.empty(width, width))
            self.hidden_bias = nn.Parameter(torch.empty(width))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(embeds, self.weight, self.bias)
        return embeds + F.linear(F.gelu(F.linear(embeds, self.hidden_weight, self.hidden_bias)), self.weight, self.bias)


class FirstStageAdapter(nn.Module):
    """
    The first retrieval stage (`config.first_stage_adapter`): a map per side over the global embeddings
    (`pooler_output`), compared by cosine, with the learned temperature of its loss. It is trained with symmetric
    InfoNCE on *detached* embeddings (`scta_train.loss.first_stage_loss`), so the towers and the head train exactly
    as without it; it proposes the candidates of two-stage retrieval and joins the fused score
    `head + fusion_weight * adapter cosine` (docs/RETRIEVAL.md "First-stage adapter").
    """

    def __init__(self, width: int, kind: str):
        super().__init__()
        self.image_map = EmbeddingMap(width, kind)
        self.text_map = EmbeddingMap(width, kind)
        self.logit_scale = nn.Parameter(torch.empty(()))  # log(1 / temperature), as CLIP's

    def image(self, image_global_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, C)` global image embeddings -> `(B, C)` L2-normalised first-stage embeddings."""
        return F.normalize(self.image_map(F.normalize(image_global_embeds, dim=-1)), dim=-1)

    def text(self, text_global_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, C)` global caption embeddings -> `(B, C)` L2-normalised first-stage embeddings."""
        return F.normalize(self.text_map(F.normalize(text_global_embeds, dim=-1)), dim=-1)


def build_scorer(config: SCTAConfig) -> nn.Module:
    """The pair scorer `config.scoring_head` names: the SCTA key-token head, or the global cosine."""
    if config.scoring_head == "global":
        return GlobalCosineScorer(GlobalPooling.from_config(config))
    return KeyTokenAlignmentHead.from_config(config)


def pair_blocks(
    image_index: torch.Tensor,
    caption_index: torch.Tensor,
    key_counts: torch.Tensor,
    image_chunk_size: int,
    text_chunk_size: int,
):
    """
    Blocks of ragged (image, caption) pairs for per-image scoring, so that no other pair is computed: pairs are
    grouped by image, an image's pairs split evenly into segments of at most `text_chunk_size`, and segments of
    similar length (captions by key count within each) put `image_chunk_size` to a block, so that little of a
    block is padding.

    Yields `(images (I,), captions (I, T), valid (I, T) bool, pairs (V,))`: a block's images, each image's
    captions (padding repeats a real one), which entries are real, and the input position of each real entry in
    `valid`'s row-major order.
    """
    image_index, caption_index = image_index.cpu().long(), caption_index.cpu().long()
    if len(image_index) == 0:
        return
    caption_rank = key_counts.argsort(stable=True).argsort()  # rank of each caption by key count
    order = torch.argsort(image_index * len(key_counts) + caption_rank[caption_index])  # by image, then key count
    images, counts = torch.unique_consecutive(image_index[order], return_counts=True)
    segment_images, segment_starts, segment_lengths = [], [], []
    start = 0
    for image, count in zip(images.tolist(), counts.tolist()):
        pieces = -(-count // text_chunk_size)
        bounds = [start + count * piece // pieces for piece in range(pieces + 1)]
        segment_images += [image] * pieces
        segment_starts += bounds[:-1]
        segment_lengths += [end - begin for begin, end in zip(bounds[:-1], bounds[1:])]
        start += count
    by_length = torch.tensor(segment_lengths).argsort(descending=True, stable=True)
    segment_images = torch.tensor(segment_images)[by_length]
    segment_starts, segment_lengths = torch.tensor(segment_starts)[by_length], torch.tensor(segment_lengths)[by_length]
    for span in _spans(len(segment_images), image_chunk_size):
        starts, lengths = segment_starts[span], segment_lengths[span]
        slots = torch.arange(int(lengths.max()))  # (T,)
        valid = slots[None, :] < lengths[:, None]  # (I, T)
        pair_rows = order[torch.where(valid, starts[:, None] + slots[None, :], starts[:, None])]  # (I, T)
        yield segment_images[span], caption_index[pair_rows], valid, pair_rows[valid]


# Captions per image up to which the head computes slot norms from the slot vectors (2NMC a pair) rather than from
# a per-image orthonormal basis (a QR of 4N^2C, then 2N^2M a pair): the break-even is about 20 at the paper's shapes
# (N = 196, M = 29, C = 512). Candidate scoring of one query meets 1 caption per image; exhaustive blocks, hundreds.
DIRECT_SLOT_NORM_CAPTIONS = 16


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


# CLIP clamps its logit scale at log(100): a temperature below 0.01 makes the softmax a hard max.
LOGIT_SCALE_MAX = 4.6052


def infonce_loss_one_direction(
    scores: torch.Tensor,
    positive_scores: torch.Tensor,
    positive_mask: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """
    InfoNCE of queries (rows) against candidates (columns), the `training_loss="infonce"` counterpart of
    `hinge_loss_one_direction`: per query, the cross-entropy of its own positive against every negative, at the
    temperature `exp(-logit_scale)` (clamped as CLIP's). Other positives of the query (`positive_mask`, e.g. the
    other captions of its image) are left out of its softmax instead of counting as negatives.

    Args:
        scores: `(Q, D)` score of every query against every candidate.
        positive_scores: `(Q,)` score of each query with its own positive.
        positive_mask: `(Q, D)` bool, True where the candidate is a positive of the query (its own included).
        logit_scale: `()` log of the inverse temperature.
    Returns:
        `()` loss summed over queries (divide by the number of queries for the mean).
    """
    scale = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    negatives = (scale * scores).masked_fill(positive_mask, float("-inf"))
    logits = torch.cat([(scale * positive_scores)[:, None], negatives], dim=1)  # column 0: the positive
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).sum()


def scta_loss(
    logits_per_image: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    hardest_negative: bool = True,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    SCTA's training objective on a batch of B (image, caption) pairs (docs/METHOD.md "Training objective").

    Args:
        logits_per_image: `(B, B)` scores, row i the image of pair i, column j the caption of pair j.
        image_ids: `(B,)` image id of each pair; pairs that share an image are positives of each other and never
            count as negatives. Default: every pair has its own image.
        margin: hinge margin (0.2).
        hardest_negative: hardest negative only (after the warm-up epochs) or sum over all negatives.
        logit_scale: `()` the learned log inverse temperature of `training_loss="infonce"`: then the loss is
            symmetric InfoNCE, the mean over pairs of both directions' cross-entropy (CLIP's), and `margin` and
            `hardest_negative` are not used. `None`: the hinge.
    Returns:
        `()` image-to-text plus text-to-image loss (hinge: summed over pairs), or their mean (InfoNCE).
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
    if logit_scale is not None:
        image_to_text = infonce_loss_one_direction(logits_per_image, positives, positive_mask, logit_scale)
        text_to_image = infonce_loss_one_direction(logits_per_image.t(), positives, positive_mask, logit_scale)
        return (image_to_text + text_to_image) / (2 * batch)
    image_to_text = hinge_loss_one_direction(logits_per_image, positives, positive_mask, margin, hardest_negative)
    text_to_image = hinge_loss_one_direction(logits_per_image.t(), positives, positive_mask, margin, hardest_negative)
    return image_to_text + text_to_image


def scta_with_global_loss(
    logits_per_image: torch.Tensor,
    global_logits_per_image: torch.Tensor | None,
    image_ids: torch.Tensor | None,
    margin: float,
    hardest_negative: bool,
    global_loss_weight: float,
    logit_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The training loss of one process's batch: `scta_loss` on the head's scores plus, when `global_loss_weight > 0`,
    the same hinge on the cosine matrix of the global embeddings times that weight (an auxiliary objective that
    trains the first retrieval stage; docs/RETRIEVAL.md). Returns `(total, global term or None)`.
    """
    loss = scta_loss(logits_per_image, image_ids, margin, hardest_negative, logit_scale)
    if not global_loss_weight:
        return loss, None
    global_loss = scta_loss(global_logits_per_image, image_ids, margin, hardest_negative, logit_scale)
    return loss + global_loss_weight * global_loss, global_loss


# ----------------------------------------------------------------------------------------------------------------
# Models


class SCTAPreTrainedModel(PreTrainedModel):
    config: SCTAConfig
    config_class = SCTAConfig
    base_model_prefix = "scta"
    main_input_name = "pixel_values"  # forward's first argument
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
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and "config" not in kwargs and "first_stage_adapter" not in kwargs:
            hub = ("revision", "cache_dir", "token", "local_files_only", "subfolder")
            hub = {key: kwargs[key] for key in hub if kwargs.get(key) is not None}
            saved_config, _ = cls.config_class.get_config_dict(source, **hub)
            if (
                "first_stage_adapter" not in saved_config
            ):  # saved before first-stage adapters: its first stage is the cosine
                logger.warning(
                    "%s has no first-stage adapter: two-stage retrieval proposes candidates by the global embeddings' "
                    "cosine. Fit one (the model is left unchanged) with: python -m scta_train.fit_first_stage "
                    "--model_name_or_path MODEL --dataset_name DATA --output_dir NEW_MODEL",
                    source,
                )
                kwargs["first_stage_adapter"] = "none"
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
            details = "; ".join(
                f"{kind}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}" for kind, keys in problems.items()
            )
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            hints = []
            if "missing_keys" in problems or "unexpected_keys" in problems:
                hints.append(
                    f"{cls.__name__}.from_pretrained({source!r}, strict=False) loads it anyway, initialising "
                    "missing weights and dropping unexpected ones"
                )
            if "mismatched_keys" in problems:
                hints.append("ignore_mismatched_sizes=True re-initialises the weights of another shape")
            raise ValueError(
                f"The checkpoint {source} does not match {cls.__name__} ({details}). Was it saved by another version "
                f"or configuration? To load it partially: {'; '.join(hints)}."
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
        elif isinstance(module, EmbeddingMap):  # the identity map; no random number drawn
            init.zeros_(module.bias)
            if module.kind == "linear":
                init.eye_(module.weight)
            else:
                init.zeros_(module.weight)
                init.eye_(module.hidden_weight)
                init.zeros_(module.hidden_bias)
        elif isinstance(module, FirstStageAdapter):
            init.constant_(module.logit_scale, math.log(1 / 0.07))  # CLIP's initial temperature
        elif isinstance(module, SCTAModel):
            # Xavier projections, as in the published encoders
            for projection in (module.vision_projection, module.text_projection):
                if isinstance(projection, nn.Linear):
                    init.xavier_uniform_(projection.weight)
                    init.zeros_(projection.bias)
            if module.logit_scale is not None:
                init.constant_(module.logit_scale, module.config.logit_scale_init_value)


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f'{name} is a {type(value).__name__}, not a tensor. Call the processor with return_tensors="pt" '
            '(processor(images=..., text=..., return_tensors="pt")) before model(**inputs).'
        )


def text_position_limit(text_config) -> int:
    """The longest caption (in tokens) a text tower embeds: RoBERTa-style towers start positions after padding_idx."""
    offset = text_config.pad_token_id + 1 if text_config.model_type in ("roberta", "xlm-roberta") else 0
    return text_config.max_position_embeddings - offset


def _no_pooling_layer(config) -> dict:
    """`add_pooling_layer=False` where the tower class takes it: SCTA uses the token states, not a pooler."""
    model_class = AutoModel._model_mapping[type(config)]
    return (
        {"add_pooling_layer": False}
        if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
        else {}
    )


def tower_from_config(config) -> PreTrainedModel:
    """A randomly initialised tower (`AutoModel`) for a tower config, without its pooling layer."""
    return AutoModel.from_config(config, **_no_pooling_layer(config))


def load_pretrained_tower(name_or_path: str, side: str, **kwargs) -> PreTrainedModel:
    """
    A pretrained `side` ("vision" or "text") tower (Hub name or local folder) without its pooling layer: the
    checkpoint's `AutoModel`, or the `side` tower of a checkpoint that holds both (`COMPOSITE_CHECKPOINTS`: a CLIP
    checkpoint gives its `CLIPVisionModel` or `CLIPTextModel`). `kwargs` go to `from_pretrained` (e.g. `revision`).
    """
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    towers = COMPOSITE_CHECKPOINTS.get(config.model_type)
    if towers is not None:
        if side not in towers:
            raise ValueError(f"{name_or_path} is a {config.model_type} checkpoint, which has no {side} tower.")
        tower_config = getattr(config, f"{side}_config")
        model_class = AutoModel._model_mapping[type(tower_config)]
        return model_class.from_pretrained(name_or_path, **kwargs)
    return AutoModel.from_pretrained(name_or_path, config=config, **{**_no_pooling_layer(config), **kwargs})


class SCTAImageEncoder(nn.Module):
    """`pixel_values -> (image tokens, global embedding)` of an `SCTAModel`, as one module for `torch.export` /
    ONNX export of the image side (the tokens are what the head and an index take)."""

    def __init__(self, model: "SCTAModel"):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model.get_image_features(pixel_values)
        return outputs.last_hidden_state, outputs.pooler_output


class SCTATextEncoder(nn.Module):
    """`(input_ids, attention_mask) -> (caption tokens, global embedding)` of an `SCTAModel`, for export. The token-id
    range check of `get_text_features` is data-dependent and skipped while exporting: feed it the processor's ids."""

    def __init__(self, model: "SCTAModel"):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model.get_text_features(input_ids, attention_mask)
        return outputs.last_hidden_state, outputs.pooler_output


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
        self.vision_model = vision_model if vision_model is not None else tower_from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else tower_from_config(config.text_config)
        # the towers read the composite config, so that edits to it reach them; a tower built outside keeps the
        # attention implementation it was built with (sdpa or eager), as a reloaded model will use it
        for tower, tower_config in ((self.vision_model, config.vision_config), (self.text_model, config.text_config)):
            if tower.config is not tower_config and tower.config._attn_implementation is not None:
                tower_config._attn_implementation = tower.config._attn_implementation
            tower.config = tower_config

        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        embed_size = config.embed_size
        self.vision_projection = nn.Linear(vision_width, embed_size) if vision_width != embed_size else nn.Identity()
        self.text_projection = nn.Linear(text_width, embed_size) if text_width != embed_size else nn.Identity()
        self.head = build_scorer(config)  # the key-token head, or the global cosine (no parameters)
        self.global_pooling = GlobalPooling.from_config(config)
        self.first_stage = (
            FirstStageAdapter(embed_size, config.first_stage_adapter) if config.first_stage_adapter != "none" else None
        )
        # log(1 / temperature) of the InfoNCE objective (CLIPModel's logit_scale); the hinge has no such weight
        self.logit_scale = nn.Parameter(torch.empty(())) if config.training_loss == "infonce" else None
        if not isinstance(self.head, KeyTokenAlignmentHead):
            # checkpoints of earlier releases stored the key-token head of global-only models, never used
            self._keys_to_ignore_on_load_unexpected = [r"^head\."]
        self.post_init()

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """
        Image side, once per image (transformers 5's `get_image_features` convention).

        Args:
            pixel_values: `(B, 3, H, W)`.
            kwargs: passed to the image tower (e.g. `output_hidden_states=True`, `output_attentions=True`);
                `return_dict=False` gives a tuple.
        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` the projected image tokens `(B, T_img, C)`
            ([CLS] first where the tower has one, all patches: what the head consumes), `pooler_output` the global
            embedding `(B, C)` (`config.global_pooling`, not normalised), and the tower's `hidden_states` /
            `attentions` when asked for.
        """
        _check_tensor("pixel_values", pixel_values)
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got {tuple(pixel_values.shape)}.")
        tower = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        image_tokens = self.vision_projection(tower.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=image_tokens,
            pooler_output=self.pool_image_tokens(image_tokens),
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    def encode_image_batches(
        self, pixel_batches: Iterable[torch.Tensor], keep_tokens: bool = True
    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
        """
        The image side of a corpus, one batch at a time: for every `(b, 3, H, W)` batch of `pixel_batches`, its
        `(b, T_img, C)` projected tokens (None with `keep_tokens=False`, when only the first stage is needed) and
        `(b, C)` global embeddings, on the model's device. The one loop behind evaluation (a DataLoader of a
        dataset) and scta-search (decoded image files): without gradient, in eval mode, the caller's mode restored
        when the iteration ends (or is abandoned).
        """
        was_training = self.training
        self.eval()
        try:
            for pixel_values in pixel_batches:
                with torch.no_grad():
                    features = self.get_image_features(pixel_values.to(self.device))
                yield (features.last_hidden_state if keep_tokens else None), features.pooler_output
        finally:
            self.train(was_training)

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """
        Caption side (transformers 5's `get_text_features` convention).

        Args:
            input_ids, attention_mask: `(B, L)`, right-padded (mask of ones when omitted).
            kwargs: passed to the text tower (`token_type_ids`, `output_hidden_states`, ...); `return_dict=False`
                gives a tuple.
        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` the projected caption tokens `(B, L, C)`
            (padding positions included) and `pooler_output` the global embedding `(B, C)`.
        """
        _check_tensor("input_ids", input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _check_tensor("attention_mask", attention_mask)
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (batch, length), got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}."
            )
        if not torch.compiler.is_compiling():  # value checks are data-dependent: skipped by torch.export / compile
            self._check_token_ids(input_ids)
        tower = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        text_tokens = self.text_projection(tower.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=text_tokens,
            pooler_output=self.pool_text_tokens(text_tokens, attention_mask),
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Token ids and caption lengths the text tower can embed, or a ValueError naming the limit (not torch's IndexError)."""
        vocabulary = self.text_model.get_input_embeddings().num_embeddings
        if input_ids.numel() and (int(input_ids.max()) >= vocabulary or int(input_ids.min()) < 0):
            bad = int(input_ids.max()) if int(input_ids.max()) >= vocabulary else int(input_ids.min())
            raise ValueError(
                f"input_ids holds the token id {bad}, outside the text tower's vocabulary of {vocabulary} "
                f"(text_config.vocab_size). Was it tokenized with another model's tokenizer? Use this model's "
                "processor (SCTAProcessor.from_pretrained on the model folder)."
            )
        limit = text_position_limit(self.config.text_config)
        if input_ids.shape[1] > limit:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per caption, more than the text tower's {limit} positions "
                f"(text_config.max_position_embeddings={self.config.text_config.max_position_embeddings}). Truncate "
                f"the captions: processor(text=..., max_length={min(limit, 90)})."
            )

    def set_first_stage_adapter(self, kind: str) -> None:
        """Replace the first-stage adapter by a fresh (identity) one of `kind` ("linear", "mlp"), or remove it
        ("none"); `config.first_stage_adapter` follows and the fusion weight is reset (to be chosen again)."""
        self.config.first_stage_adapter = kind
        self.config.check_settings()
        self.config.fusion_weight = None
        if kind == "none":
            self.first_stage = None
            return
        parameter = next(self.parameters())
        self.first_stage = FirstStageAdapter(self.config.embed_size, kind).to(parameter.device)
        self.first_stage.apply(self._init_weights)

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings (so that `resize_token_embeddings` works after adding tokens)."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def pool_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """`(B, T_img, C)` projected image tokens -> `(B, C)` global embeddings (`config.global_pooling`)."""
        return self.global_pooling.image(image_tokens)

    def pool_text_tokens(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(B, L, C)` projected caption tokens -> `(B, C)` global embeddings (`config.global_pooling`)."""
        return self.global_pooling.text(text_tokens, attention_mask)

    def global_similarity(self, image_global_embeds: torch.Tensor, text_global_embeds: torch.Tensor) -> torch.Tensor:
        """`(B_img, B_txt)` cosine similarities of the global embeddings themselves (no adapter)."""
        return cosine_similarity_matrix(image_global_embeds, text_global_embeds)

    def first_stage_image_embeds(self, image_global_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, C)` global image embeddings -> `(B, C)` L2-normalised first-stage embeddings (through the adapter,
        when the model has one)."""
        if self.first_stage is None:
            return F.normalize(image_global_embeds, dim=-1)
        return self.first_stage.image(image_global_embeds.to(self.first_stage.logit_scale.dtype))

    def first_stage_text_embeds(self, text_global_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, C)` global caption embeddings -> `(B, C)` L2-normalised first-stage embeddings."""
        if self.first_stage is None:
            return F.normalize(text_global_embeds, dim=-1)
        return self.first_stage.text(text_global_embeds.to(self.first_stage.logit_scale.dtype))

    def first_stage_similarity(
        self, image_global_embeds: torch.Tensor, text_global_embeds: torch.Tensor
    ) -> torch.Tensor:
        """`(B_img, B_txt)` first-stage scores: the adapter's cosine (the global embeddings' cosine without one). It
        proposes the candidates of two-stage retrieval and joins the fused score."""
        return self.first_stage_image_embeds(image_global_embeds) @ self.first_stage_text_embeds(text_global_embeds).t()

    def caption_key_tokens(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> CaptionKeyTokens:
        """
        Encode captions once for scoring: `(B_txt, L, C)` projected tokens (`get_text_features(...)
        .last_hidden_state`) -> `CaptionKeyTokens`, reusable against any images, carrying the captions' global
        embeddings for the fused score. Join batches with `CaptionKeyTokens.cat`. With `scoring_head="global"` the
        one key token of a caption is its normalised global embedding.
        """
        captions = self.head.caption_key_tokens(text_embeds, attention_mask)
        captions.global_embeds = self.pool_text_tokens(text_embeds, attention_mask)
        return captions

    def _fused(self, head_scores, image_embeds, captions, fusion_weight, image_index=None, caption_index=None):
        """`head_scores + fusion_weight * first-stage cosine` of the same pairs (all, or the indexed ones)."""
        if not fusion_weight:
            return head_scores
        if captions.global_embeds is None:
            raise ValueError(
                "fusion_weight needs the captions' global embeddings: encode them with SCTAModel.caption_key_tokens "
                "(the head's own caption_key_tokens does not keep them)."
            )
        device = head_scores.device
        if image_index is None:
            image_first = self.first_stage_image_embeds(self.pool_image_tokens(image_embeds.to(device)))
            first = image_first @ self.first_stage_text_embeds(captions.global_embeds.to(device)).t()
        else:
            chosen = image_embeds.index_select(0, image_index.to(image_embeds.device)).to(device)
            image_first = self.first_stage_image_embeds(self.pool_image_tokens(chosen))
            text_first = self.first_stage_text_embeds(captions.global_embeds.index_select(0, caption_index.to(device)))
            first = (image_first * text_first).sum(-1)
        return head_scores + fusion_weight * first.to(head_scores.dtype)

    def score(
        self,
        image_embeds: torch.Tensor,
        captions: CaptionKeyTokens,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
        progress: bool = False,
        fusion_weight: float = 0.0,
    ) -> torch.Tensor:
        """
        SCTA score of every image against every encoded caption, `(B_img, n)`, in blocks of
        `image_chunk_size x text_chunk_size` pairs (default `default_chunk_sizes(device)`; results do not depend
        on them). `image_embeds` from `get_image_features(...).last_hidden_state`, in any dtype or device.
        `progress=True` shows a progress bar. `fusion_weight=lambda` adds `lambda` x the first-stage cosine (the
        fused score; `config.fusion_weight` is the value chosen on dev); 0 gives the paper's score.
        """
        scores = self.head.score(image_embeds, captions, image_chunk_size, text_chunk_size, progress)
        return self._fused(scores, image_embeds, captions, fusion_weight)

    def score_candidates(
        self,
        image_embeds: torch.Tensor,
        captions: CaptionKeyTokens,
        image_index: torch.Tensor,
        caption_index: torch.Tensor,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
        progress: bool = False,
        fusion_weight: float = 0.0,
    ) -> torch.Tensor:
        """
        SCTA scores of chosen (image, caption) pairs only, e.g. the top-k candidates of every query. The indices
        broadcast against each other: `image_index` `(Q, 1)` with `caption_index` `(Q, k)` scores k captions per
        image query; `caption_index` `(Q, 1)` with `image_index` `(Q, k)` k images per caption query; two
        `(P,)` tensors any P pairs. Returns scores of the broadcast shape, equal to the same entries of `score`
        (with the same `fusion_weight`).
        """
        image_index, caption_index = torch.broadcast_tensors(
            torch.as_tensor(image_index), torch.as_tensor(caption_index)
        )
        for name, index, size in (
            ("image_index", image_index, len(image_embeds)),
            ("caption_index", caption_index, len(captions)),
        ):
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
                raise ValueError(f"{name} has entries outside [0, {size}): {int(index.min())}..{int(index.max())}.")
        scores = self.head.score_pairs(
            image_embeds,
            captions,
            image_index.reshape(-1),
            caption_index.reshape(-1),
            image_chunk_size,
            text_chunk_size,
            progress,
        )
        scores = self._fused(
            scores, image_embeds, captions, fusion_weight, image_index.reshape(-1), caption_index.reshape(-1)
        )
        return scores.view(image_index.shape)

    def similarity(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_chunk_size: int | None = None,
        text_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """
        SCTA score of every image against every caption, from projected tokens.

        Args:
            image_embeds: `(B_img, T_img, C)` from `get_image_features(...).last_hidden_state`.
            text_embeds: `(B_txt, L, C)` from `get_text_features(...).last_hidden_state`.
            text_attention_mask: `(B_txt, L)`, right-padded.
            image_chunk_size, text_chunk_size: pairs are scored in blocks of this many images x captions, which
                bounds memory (default: `default_chunk_sizes(device)`). Results do not depend on them.
        Returns:
            `(B_img, B_txt)` scores. To score the same captions again, encode them once with
            `caption_key_tokens` and call `score`.
        """
        return self.head(image_embeds, text_embeds, text_attention_mask, image_chunk_size, text_chunk_size)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        hardest_negative: bool = True,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> SCTAOutput:
        r"""
        Any other keyword argument is a `TypeError` naming it (a misspelt `atention_mask` is not ignored).

        Args:
            pixel_values: `(B_img, 3, H, W)`.
            input_ids, attention_mask: `(B_txt, L)`, right-padded.
            token_type_ids: `(B_txt, L)`, passed to the text tower (a BERT tokenizer returns them).
            output_hidden_states, output_attentions: passed to both towers; their outputs are returned as
                `vision_model_output` / `text_model_output`.
            image_ids: `(B,)` image id of each (image, caption) pair; pairs sharing an image are not negatives
                of each other in the loss.
            return_loss: compute the loss of `config.training_loss` (`scta_loss`: the hinge, or InfoNCE with
                `self.logit_scale`), plus `config.global_loss_weight` x the same loss on the global embeddings;
                needs pairs (`B_img == B_txt`).
            hardest_negative: hinge over the hardest negative only (True) or summed over all negatives (the
                recipe's first epoch). Not used by InfoNCE.
        """
        if pixel_values is None or input_ids is None:
            raise ValueError("SCTAModel.forward needs both pixel_values and input_ids.")
        _check_tensor("pixel_values", pixel_values)
        _check_tensor("input_ids", input_ids)
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
        tower_kwargs = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        tower_kwargs = {name: value for name, value in tower_kwargs.items() if value is not None}
        image_outputs = self.get_image_features(pixel_values, return_dict=True, **tower_kwargs)
        text_kwargs = tower_kwargs if token_type_ids is None else {**tower_kwargs, "token_type_ids": token_type_ids}
        text_outputs = self.get_text_features(input_ids, attention_mask, return_dict=True, **text_kwargs)
        image_embeds, text_embeds = image_outputs.last_hidden_state, text_outputs.last_hidden_state
        logits_per_image = self.similarity(image_embeds, text_embeds, attention_mask)
        kept = torch.tensor(self.config.num_kept_patches / self.config.num_patches, device=logits_per_image.device)
        fields = dict(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            kept_patch_fraction=kept,
            image_global_embeds=image_outputs.pooler_output,
            text_global_embeds=text_outputs.pooler_output,
            vision_model_output=image_outputs,
            text_model_output=text_outputs,
        )
        loss = None
        if return_loss:  # this batch's loss; the Trainer's (scta_train.loss.SCTALoss) spans every process's batch
            loss, _ = scta_with_global_loss(
                logits_per_image,
                self.global_similarity(image_outputs.pooler_output, text_outputs.pooler_output),
                image_ids,
                self.config.margin,
                hardest_negative,
                self.config.global_loss_weight,
                self.logit_scale,
            )
        return SCTAOutput(loss=loss, **fields)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the saved config maps `AutoModelForZeroShotImageClassification` to
        this class too, so that `pipeline("zero-shot-image-classification", trust_remote_code=True)` loads it."""
        module = type(self).__module__.split(".")[-1]
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModelForZeroShotImageClassification": f"{module}.{type(self).__name__}",
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers writes the weights through a private temporary file (mode 0600): give them the permissions
        # of every other file of the folder (0666 less the umask), so that a shared model folder is readable.
        umask = os.umask(0)
        os.umask(umask)
        for weights in Path(save_directory).glob("*.safetensors"):
            weights.chmod(0o666 & ~umask)
        return result

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
        towers = {
            side: load_pretrained_tower(name, side, **tower_kwargs[side])
            for side, name in (("vision", vision_model_name_or_path), ("text", text_model_name_or_path))
        }
        config = SCTAConfig.from_vision_text_configs(towers["vision"].config, towers["text"].config, **kwargs)
        return cls(config, vision_model=towers["vision"], text_model=towers["text"])


AutoConfig.register("scta", SCTAConfig, exist_ok=True)
AutoModel.register(SCTAConfig, SCTAModel, exist_ok=True)
# transformers' pipeline("zero-shot-image-classification") loads its model through this auto class, as for CLIP
AutoModelForZeroShotImageClassification.register(SCTAConfig, SCTAModel, exist_ok=True)
SCTAConfig.register_for_auto_class()
SCTAModel.register_for_auto_class("AutoModel")


__all__ = [
    "CaptionKeyTokens",
    "SCTAImageEncoder",
    "SCTATextEncoder",
    "KeyTokenAlignmentHead",
    "SCTAModel",
    "SCTAPreTrainedModel",
    "TokenAggregator",
    "FirstStageAdapter",
    "infonce_loss_one_direction",
    "scta_loss",
    "scta_with_global_loss",
]
