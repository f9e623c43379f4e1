"""
Full-size evaluation benchmark: exhaustive and two-stage scoring of a whole test split at the paper's shapes
(ViT-B/16 + BERT-base towers, random weights), for a GPU machine.

For each size in `--sizes` (default Flickr30K's 1,000 images x 5,000 captions and MSCOCO 5K's 5,000 x 25,000),
on random pixels and random captions with the Flickr30K test caption lengths:
- encoding: both towers over every image and caption (`encode_image_corpus` / `encode_caption_corpus` of
  `scta_train.retrieval`, the code `SCTATrainer.evaluate` runs), timed;
- exhaustive: every pair through the head (`SCTAModel.score`), timed (or projected from `--exhaustive-images`
  images when the full matrix would take longer than that);
- two-stage: `scta_train.retrieval.two_stage_rank` at each k of `--ks` (the first stage's top k re-scored by the
  head), timed, with the head pairs scored.
Random weights give meaningless recall; this measures time and memory. The head's chunk shape
(`default_chunk_sizes`) is chosen by one sweep, `bench/bench_similarity.py --sweep`.

    python bench/bench_full_size_eval.py --device cuda --json full_size_eval_gpu.json
    python bench/bench_full_size_eval.py --device cpu --skip-towers --sizes 1000x5000 --exhaustive-images 256
    python bench/bench_full_size_eval.py --quick          # seconds, CPU: a smoke test of the same code
"""

import argparse

import torch
from transformers import BertConfig, ViTConfig

import benchlib
from benchlib import (
    caption_token_counts,
    draw_lengths,
    format_table,
    logger,
    machine_info,
    set_threads,
    timed,
    write_json,
)
from configuration_scta import SCTAConfig
from modeling_scta import SCTAModel, default_chunk_sizes
from scta_train.retrieval import encode_caption_corpus, encode_image_corpus, two_stage_rank
from scta_train.testing import TINY_TEXT, TINY_VISION


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def build_model(args, device) -> SCTAModel:
    if args.quick:
        vision, text = ViTConfig(**TINY_VISION), BertConfig(**TINY_TEXT)
        config = SCTAConfig.from_vision_text_configs(vision, text, embed_size=32)
    else:
        config = SCTAConfig()  # ViT-B/16 at 224 px + BERT-base, the paper's head
    torch.manual_seed(args.seed)
    return SCTAModel(config).to(device).eval()


def run_size(args, model, device, num_images: int, num_captions: int, lengths_pool) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    image_size = model.config.vision_config.image_size
    vocabulary = model.config.text_config.vocab_size
    lengths = draw_lengths(lengths_pool, num_captions, args.seed)
    caption_to_image = torch.arange(num_captions) * num_images // num_captions
    row = {"images": num_images, "captions": num_captions}
    if args.skip_towers:  # random projected tokens of the towers' shapes: the scoring costs alone
        width, tokens = model.config.embed_size, model.config.num_patches + 1
        image_tokens = torch.randn(num_images, tokens, width, generator=generator).to(device)
        image_global = model.pool_image_tokens(image_tokens)
        text = torch.randn(num_captions, max(lengths), width, generator=generator).to(device)
        mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long().to(device)
        with torch.no_grad():
            caption_keys = model.caption_key_tokens(text, mask)
            caption_global = model.pool_text_tokens(text, mask)
        row["encode_images_s"] = row["encode_captions_s"] = None
    else:
        images = _Items(
            [{"pixel_values": torch.randn(3, image_size, image_size, generator=generator)} for _ in range(num_images)]
        )
        captions = _Items(
            [
                {"input_ids": [101] + torch.randint(1000, vocabulary, (n - 2,), generator=generator).tolist() + [102]}
                for n in lengths
            ]
        )
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16_towers):
            (image_tokens, image_global), row["encode_images_s"] = timed(
                lambda: encode_image_corpus(model, images, args.batch_size, device), 1, device
            )
            (caption_keys, caption_global), row["encode_captions_s"] = timed(
                lambda: encode_caption_corpus(model, captions, args.batch_size, device, 0), 1, device
            )
    image_tokens, image_global = image_tokens.float(), image_global.float()
    caption_keys, caption_global = caption_keys.to(torch.float32), caption_global.float()
    chunks = (args.image_chunk_size, args.text_chunk_size)
    with torch.no_grad():
        measured = min(num_images, args.exhaustive_images)
        _, seconds = timed(lambda: model.score(image_tokens[:measured], caption_keys, *chunks), 1, device)
        row["exhaustive_s"] = seconds * num_images / measured
        row["exhaustive_measured"] = measured == num_images
        row["exhaustive_pairs_per_s"] = measured * num_captions / seconds

        def score_exact(image_index, caption_index):
            return model.score_candidates(image_tokens, caption_keys, image_index, caption_index, *chunks).float().cpu()

        stages = []
        for k in args.ks:

            def rank():
                first_stage = model.first_stage_similarity(image_global, caption_global).float().cpu()
                return two_stage_rank(first_stage, caption_to_image, k, score_exact)

            (_, _, stats), seconds = timed(rank, 1, device)
            stages.append({"k": k, "scoring_s": seconds, **stats, "speedup": row["exhaustive_s"] / seconds})
    row["two_stage"] = stages
    if device.type == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sizes", nargs="+", default=["1000x5000", "5000x25000"], help="images x captions")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--batch-size", type=int, default=256, help="images or captions per tower batch")
    parser.add_argument("--bf16-towers", action="store_true", help="encode under bf16 autocast (the head stays fp32)")
    parser.add_argument("--exhaustive-images", type=int, default=5000, help="images the exhaustive head is timed on")
    parser.add_argument(
        "--skip-towers",
        action="store_true",
        help="score random projected tokens instead of encoding (times the head and the stages alone, e.g. on a CPU)",
    )
    parser.add_argument("--image-chunk-size", type=int, default=None)
    parser.add_argument("--text-chunk-size", type=int, default=None)
    parser.add_argument(
        "--captions-file",
        default=None,
        help="a one-caption-a-line file to draw caption lengths from (default: the shipped Flickr30K test histogram)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny towers and sizes (seconds)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.ks, args.batch_size = ["20x100"], [4], 16
    args.sizes = [tuple(int(part) for part in size.split("x")) for size in args.sizes]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchlib.setup_logging()
    device = torch.device(args.device)
    set_threads(args.threads)
    lengths_pool = caption_token_counts(args.captions_file)
    model = build_model(args, device)
    results = {
        "machine": machine_info(device),
        "settings": {**vars(args), "sizes": [f"{i}x{c}" for i, c in args.sizes]},
        "default_chunk_sizes": default_chunk_sizes(device),
    }
    logger.info("machine: %s", results["machine"])
    results["sizes"] = []
    for num_images, num_captions in args.sizes:
        row = run_size(args, model, device, num_images, num_captions, lengths_pool)
        results["sizes"].append(row)
        logger.info(
            "\n%d images x %d captions: encoding %s s + %s s; exhaustive head %.1f s (%s, %.0f pairs/s)",
            num_images,
            num_captions,
            row["encode_images_s"],
            row["encode_captions_s"],
            row["exhaustive_s"],
            "measured" if row["exhaustive_measured"] else "projected",
            row["exhaustive_pairs_per_s"],
        )
        logger.info(
            format_table(
                row["two_stage"],
                [
                    ("k", "k", "d"),
                    ("head pairs", "head_pairs", ",d"),
                    ("scoring s", "scoring_s", ".2f"),
                    ("faster", "speedup", ".1f"),
                ],
            )
        )
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
