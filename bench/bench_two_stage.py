"""
Benchmark of two-stage retrieval: a cheap first stage proposes the top-k candidates of every query, the exact SCTA
head re-scores only those (`SCTATrainer.evaluate --rerank_top_k K`; design in docs/RETRIEVAL.md).

Part 1, recall (`--models DIR [DIR ...]`, trained models): on a test split (default: the demo's synthetic test,
1,000 images / 5,000 captions), for each model
- exhaustive: every pair through the head (`SCTAModel.score`), its R@1/5/10 and scoring time;
- for each first stage and each k in `--ks`: the candidate recall (share of queries whose positive is among the
  k candidates), the final R@1/5/10 in both directions after re-ranking (one ranking per direction), the
  distinct head pairs scored, and the scoring time (first stage + head on the candidates, measured with
  `SCTAModel.score_candidates`, through `scta_train.retrieval.two_stage_rank`, the function `SCTATrainer.evaluate` uses;
  the re-ranked scores are checked against the exhaustive matrix).
  First stages: `global` (cosine of the model's global embeddings, `config.global_pooling`), `cls` (cosine of the
  projected [CLS] tokens), and `global>independent@N` (the global top N of every query, N in `--middle-n`,
  re-ranked by the head with caption-independent patch selection on precomputed image key tokens, docs/RETRIEVAL.md's
  middle stage).

Part 2, scale (`--scale`): the paper's shapes with random weights (1 + 196 image tokens, width 512, K = 98,
M = 29, a Flickr30K-length caption), per text query against a gallery of n images:
- first stage: cosine of the query against n global embeddings + top-k, measured at every n of `--gallery-sizes`;
- head on the k candidates (`score_candidates`), measured (independent of n);
- the query's text tower (BERT-base shapes, random weights), measured;
- exhaustive: the head against all n images, measured on `--exhaustive-images` images and projected linearly
  (the head's cost per image is constant: it has to rebuild every image's key state for the new caption).

`python bench/bench_two_stage.py --help`; bench/RESULTS.md has the commands and the numbers.
"""

import argparse
import contextlib

import torch
import torch.nn.functional as F

import benchlib
from benchlib import format_table, logger, machine_info, matmul_peak_gflops, set_threads, timed, write_json
from modeling_scta import KeyTokenAlignmentHead, SCTAModel, cosine_similarity_matrix
from processing_scta import SCTAProcessor
from scta_train.arguments import DataArguments
from scta_train.data import load_retrieval_dataset
from scta_train.metrics import retrieval_metrics
from scta_train.processing import RetrievalEvalCaptions, RetrievalEvalImages
from scta_train.retrieval import NON_CANDIDATE_OFFSET, encode_caption_corpus, encode_image_corpus, two_stage_rank


RECALLS = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "rsum")


class _MainProcessFirst:
    """The one method of TrainingArguments that `load_retrieval_dataset` uses, for a single process."""

    def main_process_first(self, desc: str = ""):
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Part 1: recall of a trained model


def load_split(args):
    if args.dataset_dir:
        data_args = DataArguments(dataset_dir=args.dataset_dir)
    else:
        data_args = DataArguments(dataset_name="synthetic_shapes", synthetic_train_images=args.synthetic_train_images)
    return load_retrieval_dataset(data_args, _MainProcessFirst())[args.split]


def evaluate_model(args, model_dir: str, split) -> dict:
    model = SCTAModel.from_pretrained(model_dir).eval()
    processor = SCTAProcessor.from_pretrained(model_dir)
    device = torch.device(args.device)
    model.to(device)
    config = model.config
    images = RetrievalEvalImages(split, processor.image_processor)
    captions_view = RetrievalEvalCaptions(split, processor.tokenizer)
    caption_to_image = captions_view.caption_to_image
    num_images, num_captions = len(images), len(captions_view)

    with torch.no_grad():
        (image_tokens, image_global), encode_images_s = timed(
            lambda: encode_image_corpus(model, images, args.batch_size, device), 1, device
        )
        (captions, caption_global), encode_captions_s = timed(
            lambda: encode_caption_corpus(
                model, captions_view, args.batch_size, device, processor.tokenizer.pad_token_id
            ),
            1,
            device,
        )
        exhaustive_scores, exhaustive_s = timed(
            lambda: model.score(image_tokens, captions).float().cpu(), args.repeats, device
        )
    exhaustive = retrieval_metrics(exhaustive_scores, caption_to_image)
    logger.info(
        "%s: %d images x %d captions; encoding %.1f s + %.1f s; exhaustive head %.2f s, R@1 %.1f / %.1f",
        model_dir,
        num_images,
        num_captions,
        encode_images_s,
        encode_captions_s,
        exhaustive_s,
        exhaustive["r1_i2t"],
        exhaustive["r1_t2i"],
    )

    def global_stage():
        return model.global_similarity(image_global, caption_global).float().cpu()

    def cls_stage():
        if not config.vision_has_cls_token:
            raise ValueError("the image tower has no [CLS]")
        text_cls = captions.tokens[captions.offsets[:-1].to(captions.tokens.device)]  # key token 0 = norm(T_0)
        return cosine_similarity_matrix(image_tokens[:, 0], text_cls).float().cpu()

    with torch.no_grad():
        image_keys, image_keys_s = timed(lambda: model.caption_independent_image_keys(image_tokens), 1, device)
    logger.info("caption-independent image key tokens: %.2f s for %d images (once per image)", image_keys_s, num_images)

    def score_exact(image_index, caption_index):
        return model.score_candidates(image_tokens, captions, image_index, caption_index).float().cpu()

    def score_middle(image_index, caption_index):
        return model.caption_independent_scores(image_keys, captions, image_index, caption_index).float().cpu()

    # (first stage, middle stage top-N)
    stages = {"global": (global_stage, 0), "cls": (cls_stage, 0)}
    stages.update({f"global>independent@{n}": (global_stage, n) for n in args.middle_n})
    rows = []
    for name, (stage, middle_n) in stages.items():
        for k in args.ks:

            def run():
                return two_stage_rank(stage(), caption_to_image, k, score_exact, middle_n, score_middle)

            with torch.no_grad():
                (i2t, t2i, stats), scoring_s = timed(run, args.repeats, device)
            metrics = retrieval_metrics(i2t, caption_to_image, text_to_image_scores=t2i)
            # the re-ranked candidates hold exact scores: the same entries as the exhaustive matrix
            exact = i2t > -NON_CANDIDATE_OFFSET + 1
            row = {
                "model": model_dir,
                "stage": name,
                "k": k,
                **stats,
                "pair_reduction": num_images * num_captions / stats["head_pairs"],
                "scoring_s": scoring_s,
                "speedup": exhaustive_s / scoring_s,
                "max_abs_diff_vs_exhaustive": float((i2t[exact] - exhaustive_scores[exact]).abs().max()),
                **{metric: metrics[metric] for metric in RECALLS},
                "delta_r1_i2t": metrics["r1_i2t"] - exhaustive["r1_i2t"],
                "delta_r1_t2i": metrics["r1_t2i"] - exhaustive["r1_t2i"],
            }
            rows.append(row)
            logger.info(
                "%s k=%d: R@1 %.1f / %.1f (exhaustive %.1f / %.1f), %d head pairs, %.2f s",
                name,
                k,
                row["r1_i2t"],
                row["r1_t2i"],
                exhaustive["r1_i2t"],
                exhaustive["r1_t2i"],
                row["head_pairs"],
                scoring_s,
            )
    return {
        "model": model_dir,
        "global_pooling": config.global_pooling,
        "global_loss_weight": config.global_loss_weight,
        "images": num_images,
        "captions": num_captions,
        "encode_images_s": encode_images_s,
        "encode_captions_s": encode_captions_s,
        "caption_independent_keys_s": image_keys_s,
        "exhaustive": {
            **{name: exhaustive[name] for name in RECALLS},
            "head_pairs": num_images * num_captions,
            "scoring_s": exhaustive_s,
        },
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# Part 2: per-query latency at the paper's shapes


def scale(args) -> dict:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    width, num_patches = 512, 196
    head = KeyTokenAlignmentHead(embed_size=width, num_patches=num_patches, vision_has_cls_token=True).to(device).eval()
    query_tokens = torch.randn(1, args.caption_tokens, width, generator=generator).to(device)
    query_mask = torch.ones(1, args.caption_tokens, dtype=torch.long, device=device)
    results = {"caption_tokens": args.caption_tokens, "first_stage": [], "head_on_candidates": []}
    with torch.no_grad():
        captions = head.caption_key_tokens(query_tokens, query_mask)
        query_global = F.normalize(query_tokens.mean(1), dim=-1)

        # the query's text tower: BERT-base shapes, random weights
        from transformers import BertConfig, BertModel

        bert = BertModel(BertConfig(), add_pooling_layer=False).to(device).eval()
        ids = torch.randint(1000, 20000, (1, args.caption_tokens), generator=generator).to(device)
        timed(lambda: bert(input_ids=ids), 1, device)  # warm-up
        results["text_tower_s"] = timed(lambda: bert(input_ids=ids), args.repeats, device)[1]
        bert = None  # free its memory before the gallery

        # first stage, measured at every gallery size
        for size in args.gallery_sizes:
            gallery = F.normalize(torch.randn(size, width, generator=generator), dim=-1).to(device)
            for k in args.scale_ks:
                _, seconds = timed(lambda: (gallery @ query_global[0]).topk(min(k, size)), args.repeats, device)
                results["first_stage"].append({"gallery": size, "k": k, "seconds": seconds})
            gallery = None

        # the head on k candidate images of the query (independent of the gallery size), from float16 storage
        stored = torch.randn(max(args.scale_ks), 1 + num_patches, width, generator=generator).half().to(device)
        for k in args.scale_ks:
            image_index, caption_index = torch.arange(k), torch.zeros(k, dtype=torch.long)
            head.score_pairs(stored, captions, image_index, caption_index)  # warm-up
            _, seconds = timed(
                lambda: head.score_pairs(stored, captions, image_index, caption_index), args.repeats, device
            )
            results["head_on_candidates"].append({"k": k, "seconds": seconds})

        # exhaustive: every image of the gallery against the query, measured on a slice, projected
        exhaustive_images = (
            torch.randn(args.exhaustive_images, 1 + num_patches, width, generator=generator).half().to(device)
        )
        head.score(exhaustive_images[:16], captions)  # warm-up
        _, seconds = timed(lambda: head.score(exhaustive_images, captions), 1, device)
        results["exhaustive_measured"] = {"images": args.exhaustive_images, "seconds": seconds}
        results["exhaustive_per_image_s"] = seconds / args.exhaustive_images

    latency = []
    head_k = {row["k"]: row["seconds"] for row in results["head_on_candidates"]}
    for row in results["first_stage"]:
        two_stage = results["text_tower_s"] + row["seconds"] + head_k[row["k"]]
        exhaustive = results["text_tower_s"] + results["exhaustive_per_image_s"] * row["gallery"]
        latency.append(
            {
                **row,
                "head_s": head_k[row["k"]],
                "text_tower_s": results["text_tower_s"],
                "two_stage_s": two_stage,
                "exhaustive_s": exhaustive,
                "exhaustive_measured": row["gallery"] <= args.exhaustive_images,
            }
        )
    results["latency"] = latency
    return results


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=[], help="trained SCTA folders for part 1 (recall)")
    parser.add_argument(
        "--dataset-dir", default=None, help="a built dataset folder (default: the demo's synthetic set)"
    )
    parser.add_argument(
        "--synthetic-train-images", type=int, default=16000, help="names the demo's cached synthetic set"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument(
        "--middle-n", type=int, nargs="+", default=[64, 256], help="global candidates re-ranked by the middle stage"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--scale", action="store_true", help="part 2: per-query latency at the paper's shapes")
    parser.add_argument("--gallery-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--scale-ks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--caption-tokens", type=int, default=15, help="query length (Flickr30K test mean: 15.6)")
    parser.add_argument("--exhaustive-images", type=int, default=2000, help="images the exhaustive query is timed on")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test (seconds)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.gallery_sizes, args.scale_ks, args.exhaustive_images, args.repeats = [1000, 5000], [8, 16], 32, 1
        args.middle_n = [min(n, 16) for n in args.middle_n]
    if not args.models and not args.scale:
        parser.error("nothing to do: give --models DIR ... and/or --scale")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchlib.setup_logging()
    device = torch.device(args.device)
    set_threads(args.threads)
    results = {"machine": machine_info(device), "settings": vars(args)}
    results["matmul_peak_gflops"] = matmul_peak_gflops(device, 256 if args.quick else 2048)
    logger.info("machine: %s; fp32 matmul %.0f GFLOP/s", results["machine"], results["matmul_peak_gflops"])

    if args.models:
        split = load_split(args)
        results["models"] = [evaluate_model(args, model_dir, split) for model_dir in args.models]
        for summary in results["models"]:
            exhaustive = summary["exhaustive"]
            logger.info(
                "\n%s (global_pooling=%s, global_loss_weight=%s): exhaustive R@1/5/10 i2t %.1f/%.1f/%.1f t2i "
                "%.1f/%.1f/%.1f rsum %.1f, %d pairs, %.2f s",
                summary["model"],
                summary["global_pooling"],
                summary["global_loss_weight"],
                *[exhaustive[name] for name in RECALLS],
                exhaustive["head_pairs"],
                exhaustive["scoring_s"],
            )
            logger.info(
                format_table(
                    summary["rows"],
                    [
                        ("stage", "stage", ""),
                        ("k", "k", "d"),
                        ("cand i2t", "candidate_recall_i2t", ".1f"),
                        ("cand t2i", "candidate_recall_t2i", ".1f"),
                        ("R@1 i2t", "r1_i2t", ".1f"),
                        ("R@5", "r5_i2t", ".1f"),
                        ("R@10", "r10_i2t", ".1f"),
                        ("R@1 t2i", "r1_t2i", ".1f"),
                        ("R@5 ", "r5_t2i", ".1f"),
                        ("R@10 ", "r10_t2i", ".1f"),
                        ("dR@1 i2t", "delta_r1_i2t", "+.1f"),
                        ("dR@1 t2i", "delta_r1_t2i", "+.1f"),
                        ("head pairs", "head_pairs", ",d"),
                        ("fewer", "pair_reduction", ".1f"),
                        ("middle pairs", "middle_pairs", ",d"),
                        ("scoring s", "scoring_s", ".2f"),
                        ("faster", "speedup", ".1f"),
                    ],
                )
            )
    if args.scale:
        results["scale"] = scale(args)
        logger.info(
            "\nper text query at the paper's shapes (text tower %.3f s; exhaustive head %.2f ms per image, "
            "measured on %d images)",
            results["scale"]["text_tower_s"],
            1e3 * results["scale"]["exhaustive_per_image_s"],
            args.exhaustive_images,
        )
        logger.info(
            format_table(
                results["scale"]["latency"],
                [
                    ("gallery", "gallery", ",d"),
                    ("k", "k", "d"),
                    ("first stage s", "seconds", ".4f"),
                    ("head on k s", "head_s", ".4f"),
                    ("two-stage s", "two_stage_s", ".3f"),
                    ("exhaustive s", "exhaustive_s", ",.1f"),
                    ("exhaustive measured", "exhaustive_measured", ""),
                ],
            )
        )
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
