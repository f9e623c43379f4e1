"""
Run under `torchrun --nproc_per_node 2 tests/distributed_check.py OUTPUT_JSON` (CPU, gloo).

Each process holds half of a global batch of 6 (image, caption) pairs; `SCTATrainer.compute_loss` gathers the
tokens and the global embeddings (the auxiliary objective is on) with gradient. The loss summed over processes and
the DDP-averaged gradients must equal a single process computing the same global batch: the hinge in both of its
phases (sum over negatives, hardest negative) and InfoNCE.
"""

import copy
import json
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

from helpers import random_text_batch, tiny_scta_config  # noqa: E402
from modeling_scta import SCTAModel, cosine_similarity_matrix, scta_with_global_loss  # noqa: E402
from scta_train.arguments import SCTATrainingArguments  # noqa: E402
from scta_train.pipeline import leave_process_group  # noqa: E402
from scta_train.trainer import SCTATrainer  # noqa: E402


def main(output_json: str) -> None:
    args = SCTATrainingArguments(
        output_dir=os.path.join(os.path.dirname(output_json), "distributed"),
        use_cpu=True,
        report_to="none",
        embedding_warmup_epochs=None,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
    )
    rank, world_size = args.process_index, args.world_size
    assert world_size == 2, f"run with torchrun --nproc_per_node 2 (world size {world_size})"

    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(6, 3, 32, 32, generator=generator)
    input_ids, attention_mask = random_text_batch([5, 9, 7, 12, 4, 8], generator=generator)
    image_ids = torch.tensor([0, 1, 2, 3, 1, 5])  # pairs 1 (process 0) and 4 (process 1) show the same image
    local = slice(3 * rank, 3 * rank + 3)
    local_length = int(attention_mask[local].sum(1).max())  # the processes' captions differ in padded length

    report = {}
    # eval: no dropout, so both runs see the same network; the auxiliary global objective on, to check it too.
    # The adapter learns from each process's own batch (local InfoNCE): this check is of the loss over the global
    # batch, the paper's hinge in both of its phases and InfoNCE with the learned temperature.
    for phase, epoch, training_loss in (
        ("sum_over_negatives", 0.5, "hinge"),
        ("hardest_negative", 1.5, "hinge"),
        ("infonce", 1.5, "infonce"),
    ):
        torch.manual_seed(0)
        config = tiny_scta_config(global_loss_weight=0.5, first_stage_adapter="none", training_loss=training_loss)
        model = SCTAModel(config).eval()
        reference = copy.deepcopy(model)
        trainer = SCTATrainer(model=model, args=args)
        distributed_model = trainer.accelerator.prepare_model(model)

        reference_outputs = reference(pixel_values, input_ids, attention_mask)
        expected, _ = scta_with_global_loss(
            reference_outputs.logits_per_image,
            cosine_similarity_matrix(reference_outputs.image_global_embeds, reference_outputs.text_global_embeds),
            image_ids,
            reference.config.margin,
            hardest_negative=epoch >= 1,
            global_loss_weight=reference.config.global_loss_weight,
            logit_scale=reference.logit_scale,
        )
        expected.backward()

        trainer.state.epoch = epoch
        inputs = {
            "pixel_values": pixel_values[local],
            "input_ids": input_ids[local, :local_length],
            "attention_mask": attention_mask[local, :local_length],
            "image_ids": image_ids[local],
        }
        loss = trainer.compute_loss(distributed_model, inputs)
        trainer.accelerator.backward(loss)
        # each process's loss is world_size x its share; their mean is the global loss
        total = trainer.accelerator.gather(loss.detach().reshape(1)).mean()
        gradient_error = max(
            float((got.grad - want.grad).abs().max()) for got, want in zip(model.parameters(), reference.parameters())
        )
        scale = max(float(p.grad.abs().max()) for p in reference.parameters())
        report[phase] = {
            "loss": float(total),
            "expected_loss": float(expected.detach()),
            "max_gradient_error": gradient_error,
            "max_gradient": scale,
        }
    if rank == 0:
        with open(output_json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
