"""
The training objectives and their cross-process gather, in one place: `SCTALoss` (the head's loss over the global
batch, hinge or InfoNCE by `config.training_loss`, plus the optional auxiliary term on the global embeddings) and
`first_stage_loss` (symmetric InfoNCE of the first-stage adapter on detached embeddings). The per-direction losses
themselves are `modeling_scta.hinge_loss_one_direction` and `infonce_loss_one_direction` (shipped:
`SCTAModel.forward(return_loss=True)` and the evaluation loss use them too).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from configuration_scta import SCTAConfig
from modeling_scta import (
    LOGIT_SCALE_MAX,
    FirstStageAdapter,
    SCTAModel,
    SCTAOutput,
    cosine_similarity_matrix,
    hinge_loss_one_direction,
    infonce_loss_one_direction,
    scta_with_global_loss,
)


def all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (sizes may differ along dim 0), with gradient flowing back to its owner."""
    # The autograd all-gather of functional collectives (its backward is a summing reduce-scatter), imported here
    # because the module is private: only multi-process training needs it. Older torch names it
    # all_gather_tensor_autograd.
    import torch.distributed._functional_collectives as funcol

    all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(sizes))
    padded = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, largest - tensor.shape[0]]).contiguous()
    gathered = all_gather_autograd(padded, 0, dist.group.WORLD)  # (world_size * largest, ...)
    return [part[: int(n)] for part, n in zip(gathered.chunk(len(sizes)), sizes)]


class SCTALoss(nn.Module):
    """
    SCTA's objective over the global batch: the loss of `config.training_loss` (the paper's hinge, or InfoNCE with
    the model's learned `logit_scale`) on `model.similarity` (the key-token head, or the global cosine with
    `scoring_head="global"`), plus `config.global_loss_weight` x the same loss on the global embeddings' cosine.
    Both paths below score with the per-direction losses of `modeling_scta` and the positive masks of `image_ids`;
    the cross-process gather is `all_gather_with_grad`.

    In one process it is `scta_with_global_loss` of the batch. Under several processes (torch.distributed
    initialised, `world_size > 1`), each process computes its image rows and caption columns of the global score
    matrix: tokens are gathered with gradient, so negatives come from every process, and the local block the
    forward made is reused. The sum over processes of these losses is the single-process loss of the global batch;
    the result is multiplied by `world_size` to undo DDP's gradient averaging.
    """

    def __init__(self, config: SCTAConfig):
        super().__init__()
        self.margin = config.margin
        self.global_loss_weight = config.global_loss_weight

    def forward(
        self,
        model: SCTAModel,
        outputs: SCTAOutput,
        text_attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        hardest_negative: bool = True,
        world_size: int = 1,
    ) -> torch.Tensor:
        if world_size == 1:
            global_logits = cosine_similarity_matrix(outputs.image_global_embeds, outputs.text_global_embeds)
            loss, _ = scta_with_global_loss(
                outputs.logits_per_image,
                global_logits,
                image_ids,
                self.margin,
                hardest_negative,
                self.global_loss_weight,
                model.logit_scale,
            )
            return loss
        return self._global_batch_loss(model, outputs, text_attention_mask, image_ids, hardest_negative) * world_size

    def _global_batch_loss(self, model, outputs, text_attention_mask, image_ids, hardest_negative) -> torch.Tensor:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if image_ids is None:  # every pair its own image: ids unique across processes
            image_ids = rank * len(outputs.image_embeds) + torch.arange(
                len(outputs.image_embeds), device=text_attention_mask.device
            )
        length = torch.tensor([text_attention_mask.shape[1]], device=text_attention_mask.device)
        lengths = [torch.zeros_like(length) for _ in range(world_size)]
        dist.all_gather(lengths, length)
        longest = int(max(lengths))
        text_embeds = F.pad(outputs.text_embeds, (0, 0, 0, longest - text_attention_mask.shape[1]))
        text_attention_mask = F.pad(text_attention_mask, (0, longest - text_attention_mask.shape[1]))

        all_images = all_gather_with_grad(outputs.image_embeds)
        all_texts = all_gather_with_grad(text_embeds)
        all_masks = all_gather_with_grad(text_attention_mask)
        all_ids = torch.cat(all_gather_with_grad(image_ids))
        local_block = outputs.logits_per_image  # (B_r, B_r)
        rows = [
            local_block if other == rank else model.similarity(outputs.image_embeds, all_texts[other], all_masks[other])
            for other in range(world_size)
        ]
        columns = [
            local_block if other == rank else model.similarity(all_images[other], text_embeds, text_attention_mask)
            for other in range(world_size)
        ]
        positive_mask = image_ids[:, None] == all_ids[None, :]  # (B_r, B_global)
        logit_scale, global_batch = model.logit_scale, len(all_ids)

        def contrastive(rows: torch.Tensor, columns: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
            """Both directions for this process's queries: rows `(B_r, B_global)`, columns `(B_global, B_r)`.
            InfoNCE is a mean over the global batch, so every process divides its sum by the global batch size."""
            if logit_scale is not None:
                image_to_text = infonce_loss_one_direction(rows, positives, positive_mask, logit_scale)
                text_to_image = infonce_loss_one_direction(columns.t(), positives, positive_mask, logit_scale)
                return (image_to_text + text_to_image) / (2 * global_batch)
            image_to_text = hinge_loss_one_direction(rows, positives, positive_mask, self.margin, hardest_negative)
            text_to_image = hinge_loss_one_direction(
                columns.t(), positives, positive_mask, self.margin, hardest_negative
            )
            return image_to_text + text_to_image

        loss = contrastive(torch.cat(rows, 1), torch.cat(columns, 0), local_block.diagonal())
        if self.global_loss_weight:
            image_global, text_global = outputs.image_global_embeds, outputs.text_global_embeds
            all_image_global = torch.cat(all_gather_with_grad(image_global))
            all_text_global = torch.cat(all_gather_with_grad(text_global))
            loss = loss + self.global_loss_weight * contrastive(
                cosine_similarity_matrix(image_global, all_text_global),
                cosine_similarity_matrix(all_image_global, text_global),
                cosine_similarity_matrix(image_global, text_global).diagonal(),
            )
        return loss


def first_stage_loss(
    adapter: FirstStageAdapter,
    image_global_embeds: torch.Tensor,
    text_global_embeds: torch.Tensor,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Symmetric InfoNCE with the adapter's learned temperature (as CLIP), over one batch of B pairs, on *detached*
    global embeddings: its gradient reaches the adapter only, so the towers and the head train exactly as without
    it. Pairs sharing an image (`image_ids`) are left out of each other's softmax instead of counting as negatives.
    Under several processes each one's batch is its own softmax (local negatives, no gather).
    """
    image = adapter.image(image_global_embeds.detach().float())
    text = adapter.text(text_global_embeds.detach().float())
    logits = adapter.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * image @ text.t()  # (B, B)
    batch = len(logits)
    targets = torch.arange(batch, device=logits.device)
    if image_ids is not None:
        other_positive = (image_ids[:, None] == image_ids[None, :]) & (targets[:, None] != targets[None, :])
        logits = logits.masked_fill(other_positive, float("-inf"))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
