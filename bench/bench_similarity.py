"""
Benchmark of SCTA's pairwise head: the batched `KeyTokenAlignmentHead` against the per-caption loop.

SCTA's cost is the head: every test image is scored against every test caption (Flickr30K test 1,000 x 5,000
pairs, COCO 5K 5,000 x 25,000) and, in training, every image against every caption of the batch. This script
times, in one run and on the same seeded inputs,
- `batched`: `KeyTokenAlignmentHead.forward` (what `SCTAModel.similarity` calls), and
- `loop`: `scta_train/reference.py::reference_similarity_loop`, the published code's per-caption Python loop
  (each caption against all images at once), which is also the test oracle,
for two cases:
- `eval`: an evaluation block, 256 images x 1,280 captions (5 per image), under `torch.no_grad`;
- `train`: a training batch, 128 images x 128 captions, forward + backward of the hinge loss (`scta_loss`, hardest
  negative) with gradients for the head's parameters and both token inputs.

Shapes are the paper's: 1 + 196 image tokens ([CLS] + 14 x 14 patches of ViT-B/16 at 224 px), width 512,
patch_keep_ratio 0.5 (K = 98 kept), patch_aggr_ratio 0.3 (M = 29 slots), word aggregation on
(word_keep_ratio 0.75). Caption token counts are drawn from the real Flickr30K test captions (words + 2).
Image tokens are Gaussian; caption tokens are noisy copies of their own image's tokens (`--caption-noise`), so
that a score matrix has recall to lose when reduced precision is tried (`--bf16`).

Reported per case and method: pairs/s, the batched/loop ratio, max |batched - loop| (the loop is the
specification; tolerance 1e-5), peak memory (each measurement in a fresh process, see `benchlib.PeakMemory`),
achieved useful GFLOP/s against a plain `torch.matmul` peak measured in the same run, and the projected head
time of the full Flickr30K and COCO 5K score matrices.

Useful FLOPs (`batched_head_flops`, 2 per multiply-add, contractions only; element-wise work, top-k and max are
not counted). For a pair of an image with N patches and a caption with J text key tokens, width C, M slots:
    2NC    selection scores norm(P) . text query            2NC    fused token of the dropped patches
    2CJ    fused token . text keys                          2NCJ   text key . patch products (one big matmul)
    2NJM   slot numerators (kept-set weighted sums)         2N^2M  slot norms (kept-set sums of N-dim coordinates)
    2NM    squared slot norms                               2CJ    [CLS] . text keys
per image: the patch MLP 2N(Ch + hM) and the patch coordinates 2N^2C (h = 0.2 C; the factorisation giving the
basis is an implementation detail and not counted); per caption of n tokens and k word slots: the word MLP
2(n-1)(Ch + hk) and the slots 2(n-1)kC. With N = 196, C = 512, M = 29 and J ~ 11.5 (Flickr30K test captions)
a pair costs about 5.2 MFLOP. The loop does about 14.4 MFLOP per pair (`loop_flops`): it reruns the patch MLP on the kept
patches for every caption (2K(Ch + hM) = 10.8 MFLOP), which the batched head does once per image - so at equal
arithmetic efficiency the batched head can only be ~3x faster; everything beyond comes from the loop's overheads.
Training FLOPs are counted as 3x the forward (backward ~ 2x forward); the batched head also recomputes each
block's forward under activation checkpointing, which is not counted as useful.

Memory is bounded by the chunk size, not by the number of pairs. The head scores blocks of I images x T captions
(`image_chunk_size` x `text_chunk_size`); inside a block the largest intermediates are, per pair, the patch
scores / keep mask / fusion weights (3N), the text-key x patch products and their kept-masked copy (2NJ), the
slot coordinates (MN) and the key-token similarities (~3J(M+2)); per image, the weighted coordinates (N^2 M).
So a block needs about 4 bytes x [I T (3N + 2NJ + MN + 3J(M+2) + C) + I N^2 (M + 1)] (`block_memory_mb`, ~180 MB
for the CPU default 16 x 128 at J = 16), whatever the totals; only the (B_img, B_txt) score matrix grows with
them. Under grad, each block is checkpointed: only its inputs and its (I, T) scores are kept, and the backward
recomputes one block at a time. `--sweep` measures time and peak memory over chunk shapes.

Agreement with the loop: a pair's score jumps where two patch selection scores cross at the top-K boundary, and
the two implementations round those scores differently (~1e-7), so at a few pairs in 1e4-1e5 they keep different
patches and differ by ~1e-2. Pairs beyond 1e-5 are therefore checked for such near ties (`selection_gaps`);
any other difference is reported as an error.

Run `python bench/bench_similarity.py --help`; bench/RESULTS.md has the commands and the numbers.
"""

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F

import benchlib
from benchlib import (
    PeakMemory,
    caption_token_counts,
    draw_lengths,
    format_table,
    logger,
    machine_info,
    matmul_peak_gflops,
    run_isolated,
    set_threads,
    summarize_seconds,
    time_calls,
    write_json,
)
from modeling_scta import KeyTokenAlignmentHead, default_chunk_sizes, scta_loss
from scta_train.reference import reference_similarity_loop


FLICKR30K_TEST_PAIRS = 1_000 * 5_000
COCO_5K_TEST_PAIRS = 5_000 * 25_000
TOLERANCE = 1e-5  # batched == loop within this, the project's oracle tolerance
# A K-th / (K+1)-th patch score gap below this is a near tie of the top-K selection (fp32 rounding is ~1e-7).
NEAR_TIE = 1e-6
MAX_PAIRS_EXPLAINED = 100


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def build_head(job: dict) -> KeyTokenAlignmentHead:
    torch.manual_seed(job["seed"])
    return KeyTokenAlignmentHead(
        embed_size=job["embed_size"],
        num_patches=job["num_patches"],
        vision_has_cls_token=True,
        patch_keep_ratio=job["patch_keep_ratio"],
        patch_aggr_ratio=job["patch_aggr_ratio"],
        word_keep_ratio=job["word_keep_ratio"],
        word_aggregation=job["word_aggregation"],
    )


def caption_owners(num_images: int, num_captions: int) -> torch.Tensor:
    """Image row of every caption: consecutive captions share an image (5 per image for 256 x 1,280)."""
    return torch.arange(num_captions) * num_images // num_captions


def build_inputs(job: dict, device: torch.device):
    """
    The seeded head and inputs of a job; every process that builds the same job gets the same tensors.

    Returns:
        head; image tokens `(B_img, 1 + N, C)`; caption tokens `(B_txt, L, C)`, each real token a copy of a random
        token of the caption's own image plus Gaussian noise of std `caption_noise`, padding zero; the
        right-padded mask `(B_txt, L)`.
    """
    head = build_head(job)
    generator = torch.Generator().manual_seed(job["seed"] + 1)
    num_images, width, num_tokens = job["images"], job["embed_size"], 1 + job["num_patches"]
    lengths = torch.tensor(job["lengths"])
    num_captions, max_length = len(lengths), int(lengths.max())
    image_tokens = torch.randn(num_images, num_tokens, width, generator=generator)
    source = torch.randint(num_tokens, (num_captions, max_length), generator=generator)
    owner = caption_owners(num_images, num_captions)
    noise = torch.randn(num_captions, max_length, width, generator=generator)
    text_tokens = image_tokens[owner[:, None], source] + job["caption_noise"] * noise  # (B_txt, L, C)
    text_mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()  # (B_txt, L)
    text_tokens = text_tokens * text_mask[..., None]
    return head.to(device), image_tokens.to(device), text_tokens.to(device), text_mask.to(device)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and memory, analytically


def text_key_counts(head: KeyTokenAlignmentHead, lengths: list[int]) -> torch.Tensor:
    """J per caption: 1 + word slots with word aggregation, else all n tokens."""
    lengths = torch.tensor(lengths)
    if head.word_aggregator is None:
        return lengths
    return 1 + head.word_slot_counts(lengths)


def _aggregator_hidden(head: KeyTokenAlignmentHead) -> int:
    return head.patch_aggregator.mlp[1].out_features


def _word_side_flops(head: KeyTokenAlignmentHead, lengths: list[int], width: int) -> float:
    """Word MLP and word slots of every caption, once per caption (batched and loop alike)."""
    if head.word_aggregator is None:
        return 0.0
    hidden = _aggregator_hidden(head)
    words = torch.tensor(lengths, dtype=torch.float64) - 1
    slots = head.word_slot_counts(torch.tensor(lengths)).double()
    return float((2 * words * (width * hidden + hidden * slots) + 2 * words * slots * width).sum())


def batched_head_flops(head: KeyTokenAlignmentHead, lengths: list[int], num_images: int) -> float:
    """Useful forward FLOPs of the batched head on `num_images` x `len(lengths)` pairs (formula in the docstring)."""
    n, c, m = head.num_patches, head.patch_aggregator.mlp[0].normalized_shape[0], head.num_patch_slots
    hidden = _aggregator_hidden(head)
    keys = text_key_counts(head, lengths).double()  # (B_txt,)
    per_pair = 2 * n * c + 2 * n * c + 2 * c * keys + 2 * n * c * keys + 2 * n * keys * m + 2 * n * n * m + 2 * n * m
    if head.vision_has_cls_token:
        per_pair = per_pair + 2 * c * keys
    per_image = 2 * n * (c * hidden + hidden * m) + 2 * n * n * c
    return num_images * float(per_pair.sum()) + num_images * per_image + _word_side_flops(head, lengths, c)


def loop_flops(head: KeyTokenAlignmentHead, lengths: list[int], num_images: int) -> float:
    """Forward FLOPs of the per-caption loop: per pair the selection, the patch MLP on the K kept patches, the slot
    sums, the fused token and the alignment matmul; per caption the word side."""
    n, c, m, k = (
        head.num_patches,
        head.patch_aggregator.mlp[0].normalized_shape[0],
        head.num_patch_slots,
        head.num_kept_patches,
    )
    hidden = _aggregator_hidden(head)
    keys = text_key_counts(head, lengths).double()
    image_keys = m + 1 + int(head.vision_has_cls_token)
    per_pair = (
        2 * n * c + 2 * k * (c * hidden + hidden * m) + 2 * m * k * c + 2 * (n - k) * c + 2 * keys * image_keys * c
    )
    return num_images * float(per_pair.sum()) + _word_side_flops(head, lengths, c)


def block_memory_mb(head: KeyTokenAlignmentHead, image_chunk: int, text_chunk: int, num_keys: int, width: int) -> float:
    """Estimated fp32 working set of one block of pairs without grad (terms in the module docstring)."""
    n, m = head.num_patches, head.num_patch_slots
    per_pair = 3 * n + 2 * n * num_keys + m * n + 3 * num_keys * (m + 2) + width
    per_image = n * n * (m + 1)
    return 4 * (image_chunk * text_chunk * per_pair + image_chunk * per_image) / 2**20


# ----------------------------------------------------------------------------------------------------------------
# One measurement (runs in a fresh process unless --no-isolate)


def measure_head(job: dict) -> dict:
    """
    Times one method on one case and returns its timings, peak memory, scores and (train) gradients.

    `job` keys: case ('eval' | 'train'), method ('batched' | 'loop'), precision ('fp32' | 'bf16'), the head
    shape, images, lengths, caption_noise, seed, device, threads, repeats, image_chunk_size, text_chunk_size,
    loop_captions (eval loop only: the loop is timed on the first captions, its cost being linear in them).
    """
    set_threads(job["threads"])
    device = torch.device(job["device"])
    head, image_tokens, text_tokens, text_mask = build_inputs(job, device)
    train = job["case"] == "train"
    if job["method"] == "loop" and not train:
        text_tokens, text_mask = text_tokens[: job["loop_captions"]], text_mask[: job["loop_captions"]]
    if train:
        image_tokens.requires_grad_(True)
        text_tokens.requires_grad_(True)
    precision = (
        torch.autocast(device.type, dtype=torch.bfloat16) if job["precision"] == "bf16" else contextlib.nullcontext()
    )

    def scores_of(images: torch.Tensor, texts: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with precision:
            if job["method"] == "batched":
                return head(images, texts, masks, job["image_chunk_size"], job["text_chunk_size"])
            return reference_similarity_loop(head, images, texts, masks)

    def run(image_slice=slice(None), text_slice=slice(None)) -> torch.Tensor:
        images, texts, masks = image_tokens[image_slice], text_tokens[text_slice], text_mask[text_slice]
        if not train:
            with torch.no_grad():
                return scores_of(images, texts, masks)
        head.zero_grad(set_to_none=True)
        image_tokens.grad = text_tokens.grad = None
        scores = scores_of(images, texts, masks).float()
        square = scores.shape[0] == scores.shape[1]
        loss = scta_loss(scores) if job["loss"] == "hinge" and square else scores.sum()
        loss.backward()
        return scores.detach()

    # Warm-up on a slice with the timed run's block shapes: the batched head's first image chunk against all
    # captions, or the loop's first captions against all images.
    if job["method"] == "batched":
        run(image_slice=slice(0, job["image_chunk_size"] or default_chunk_sizes(device)[0]))
    else:
        run(text_slice=slice(0, 4))

    result = {}
    with PeakMemory(device) as memory:
        seconds = time_calls(lambda: result.update(scores=run()), job["repeats"], device)
    output = {"job": {k: v for k, v in job.items() if k != "lengths"}, **summarize_seconds(seconds), **memory.as_dict()}
    output["scores"] = result["scores"].detach().float().cpu()
    if train:
        grads = {"image_tokens": image_tokens.grad, "text_tokens": text_tokens.grad}
        grads.update({f"head.{name}": p.grad for name, p in head.named_parameters() if p.grad is not None})
        output["grads"] = {name: g.detach().float().cpu() for name, g in grads.items()}
    return output


# ----------------------------------------------------------------------------------------------------------------
# Comparisons


def max_abs_difference(a: dict | torch.Tensor, b: dict | torch.Tensor) -> float:
    if isinstance(a, dict):
        if set(a) != set(b):
            raise RuntimeError(f"gradients of different tensors: {sorted(set(a) ^ set(b))}")
        return max(max_abs_difference(a[name], b[name]) for name in a)
    return float((a - b).abs().max())


def selection_gaps(job: dict, pairs: torch.Tensor, head: KeyTokenAlignmentHead) -> list[float]:
    """
    For (image, caption) pairs, the gap between the K-th and (K+1)-th patch selection score (docs/METHOD.md step 1).

    The head keeps the top K patches, so a pair's score jumps where two patch scores cross. Where they are
    within rounding (~1e-7 in fp32) of each other, two correct implementations that sum in different orders
    can keep different patches and give scores that differ by ~1e-2: a near tie, not an error.
    """
    _, image_tokens, text_tokens, text_mask = build_inputs(job, torch.device("cpu"))
    _, patches = head.split_image_tokens(image_tokens)
    directions = F.normalize(patches, dim=-1)  # (B_img, N, C)
    self_scores = torch.einsum("inc,ic->in", directions, F.normalize(patches.mean(1), dim=-1))
    text_query = F.normalize((text_tokens * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True), dim=-1)
    gaps = []
    for image, caption in pairs.tolist():
        scores = self_scores[image] + directions[image] @ text_query[caption]  # (N,)
        top = scores.topk(head.num_kept_patches + 1).values
        gaps.append(float(top[-2] - top[-1]))
    return gaps


def compare_with_loop(job: dict, batched: dict, loop: dict, head: KeyTokenAlignmentHead) -> dict:
    """max |batched - loop| over the loop's captions; pairs beyond the tolerance are checked for near ties."""
    columns = loop["scores"].shape[1]
    difference = (batched["scores"][:, :columns] - loop["scores"]).abs()
    beyond = (difference > TOLERANCE).nonzero()
    comparison = {
        "compared_captions": columns,
        "max_abs_diff_batched_vs_loop": float(difference.max()),
        "within_tolerance": bool(beyond.numel() == 0),
        "pairs_beyond_tolerance": int(beyond.shape[0]),
        "compared_pairs": difference.numel(),
    }
    if beyond.numel():
        gaps = selection_gaps(job, beyond[:MAX_PAIRS_EXPLAINED], head)
        comparison["beyond_tolerance_pairs"] = [
            {"image": i, "caption": t, "abs_diff": float(difference[i, t]), "selection_gap": gap}
            for (i, t), gap in zip(beyond[:MAX_PAIRS_EXPLAINED].tolist(), gaps)
        ]
        comparison["all_beyond_tolerance_are_near_ties"] = bool(
            beyond.shape[0] <= MAX_PAIRS_EXPLAINED and max(gaps) < NEAR_TIE
        )
    # The implementations agree: every pair within the tolerance, except top-K near ties (see `selection_gaps`).
    comparison["agrees_with_loop"] = comparison["within_tolerance"] or comparison["all_beyond_tolerance_are_near_ties"]
    if "grads" in batched:
        comparison["max_abs_grad_diff_batched_vs_loop"] = max_abs_difference(batched["grads"], loop["grads"])
        comparison["max_abs_grad"] = max(float(g.abs().max()) for g in batched["grads"].values())
    return comparison


def recall_of(scores: torch.Tensor, owners: torch.Tensor) -> dict | str:
    """R@1/5 and rsum by the project's definition (docs/METHOD.md "Evaluation"), or why they could not be computed."""
    try:
        from scta_train.metrics import retrieval_metrics
    except ImportError as error:  # scta_train needs `datasets`, which a bare GPU machine may lack
        logger.warning("recall not computed: scta_train does not import (%s)", error)
        return f"not computed: {error}"
    metrics = retrieval_metrics(scores, owners, five_fold=False)
    return {name: metrics[name] for name in ("r1_i2t", "r5_i2t", "r1_t2i", "r5_t2i", "rsum")}


def precision_effect(fp32: torch.Tensor, reduced: torch.Tensor, owners: torch.Tensor | None) -> dict:
    """How much a reduced-precision score matrix differs from the fp32 one, and what it does to ranking."""
    difference = (reduced - fp32).abs()
    effect = {
        "max_abs_score_diff": float(difference.max()),
        "mean_abs_score_diff": float(difference.mean()),
        "fp32_score_range": [float(fp32.min()), float(fp32.max())],
        "same_top1_caption_per_image_pct": 100.0 * float((reduced.argmax(1) == fp32.argmax(1)).double().mean()),
        "same_top1_image_per_caption_pct": 100.0 * float((reduced.argmax(0) == fp32.argmax(0)).double().mean()),
    }
    if owners is not None:
        effect["recall_fp32"] = recall_of(fp32, owners)
        effect["recall_reduced"] = recall_of(reduced, owners)
    return effect


# ----------------------------------------------------------------------------------------------------------------
# Cases


def case_jobs(args, case: str, lengths_pool: list[int]) -> dict:
    images, captions = (
        (args.eval_images, args.eval_captions) if case == "eval" else (args.train_batch, args.train_batch)
    )
    offset = {"eval": 0, "train": 1000}[case]
    return {
        "case": case,
        "method": "batched",
        "precision": "fp32",
        "embed_size": args.embed_size,
        "num_patches": args.num_patches,
        "patch_keep_ratio": args.patch_keep_ratio,
        "patch_aggr_ratio": args.patch_aggr_ratio,
        "word_keep_ratio": args.word_keep_ratio,
        "word_aggregation": not args.no_word_aggregation,
        "images": images,
        "lengths": draw_lengths(lengths_pool, captions, args.seed + offset),
        "caption_noise": args.caption_noise,
        "seed": args.seed + offset,
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "image_chunk_size": args.image_chunk_size,
        "text_chunk_size": args.text_chunk_size,
        "loop_captions": min(args.loop_captions or captions, captions),
        "loss": args.train_loss,
    }


def run_case(args, case: str, lengths_pool: list[int], peaks: dict) -> dict:
    job = case_jobs(args, case, lengths_pool)
    head = build_head(job)
    train = case == "train"
    images, lengths = job["images"], job["lengths"]
    logger.info(
        "%s: %d images x %d captions (%s)", case, images, len(lengths), "forward + backward" if train else "no grad"
    )

    flops = batched_head_flops(head, lengths, images)
    summary = {
        "images": images,
        "captions": len(lengths),
        "mean_caption_tokens": statistics.mean(lengths),
        "mean_text_keys": float(text_key_counts(head, lengths).double().mean()),
        "useful_forward_flops_per_pair": flops / (images * len(lengths)),
        "loop_forward_flops_per_pair": loop_flops(head, lengths, images) / (images * len(lengths)),
    }
    flop_factor = 3.0 if train else 1.0  # forward + backward ~ 3 forwards

    runs = {}
    logger.info("  batched head ...")
    runs["batched"] = run_isolated(measure_head, job, isolate=not args.no_isolate)
    if not args.skip_loop:
        loop_job = {**job, "method": "loop", "repeats": args.loop_repeats}
        logger.info("  per-caption loop%s ...", "" if train else f" (first {loop_job['loop_captions']} captions)")
        runs["loop"] = run_isolated(measure_head, loop_job, isolate=not args.no_isolate)
    if args.bf16:
        logger.info("  batched head under bf16 autocast ...")
        runs["batched_bf16"] = run_isolated(measure_head, {**job, "precision": "bf16"}, isolate=not args.no_isolate)

    rows = []
    for name, run in runs.items():
        pairs = run["scores"].numel()
        pairs_per_s = pairs / run["median_s"]
        row = {
            "method": name,
            "pairs": pairs,
            "median_s": run["median_s"],
            "min_s": run["min_s"],
            "pairs_per_s": pairs_per_s,
            "peak_rss_mb": run["peak_rss_mb"],
            "growth_rss_mb": run["growth_rss_mb"],
            "rss_method": run["rss_method"],
        }
        if "cuda_peak_mb" in run:
            row.update(cuda_peak_mb=run["cuda_peak_mb"], cuda_growth_mb=run["cuda_growth_mb"])
        if name.startswith("batched"):
            gflops = flop_factor * flops / run["median_s"] / 1e9
            peak = peaks["bf16" if name.endswith("bf16") else "fp32"]
            row.update(useful_gflops=gflops, pct_of_matmul_peak=100.0 * gflops / peak if peak else None)
        if not train:
            row.update(
                flickr30k_1k_projected_s=FLICKR30K_TEST_PAIRS / pairs_per_s,
                coco_5k_projected_s=COCO_5K_TEST_PAIRS / pairs_per_s,
            )
        rows.append(row)
    summary["rows"] = rows

    by_name = {row["method"]: row for row in rows}
    if "loop" in runs:
        summary["speedup_batched_over_loop"] = by_name["batched"]["pairs_per_s"] / by_name["loop"]["pairs_per_s"]
        summary.update(compare_with_loop(job, runs["batched"], runs["loop"], head))
    if "batched_bf16" in runs:
        owners = None if train else caption_owners(images, len(lengths))
        summary["bf16"] = {
            "speedup_over_fp32": by_name["batched_bf16"]["pairs_per_s"] / by_name["batched"]["pairs_per_s"],
            **precision_effect(runs["batched"]["scores"], runs["batched_bf16"]["scores"], owners),
        }
        if train:
            summary["bf16"]["max_abs_grad_diff_vs_fp32"] = max_abs_difference(
                runs["batched"]["grads"], runs["batched_bf16"]["grads"]
            )
    return summary


def run_sweep(args, lengths_pool: list[int]) -> list[dict]:
    """Batched eval throughput and peak memory over (image_chunk_size, text_chunk_size)."""
    job = case_jobs(args, "eval", lengths_pool)
    job.update(
        images=args.sweep_images,
        lengths=draw_lengths(lengths_pool, args.sweep_captions, args.seed),
        repeats=args.sweep_repeats,
    )
    head = build_head(job)
    block_keys = int(text_key_counts(head, job["lengths"]).max())
    default = default_chunk_sizes(torch.device(args.device))
    rows = []
    for image_chunk in args.sweep_image_chunks:
        for text_chunk in args.sweep_text_chunks:
            logger.info("  sweep: %d images x %d captions per block ...", image_chunk, text_chunk)
            row = {
                "image_chunk_size": image_chunk,
                "text_chunk_size": text_chunk,
                "default": "*" if (image_chunk, text_chunk) == default else "",
                "estimated_block_mb_at_max_keys": block_memory_mb(
                    head, image_chunk, text_chunk, block_keys, args.embed_size
                ),
            }
            try:
                run = run_isolated(
                    measure_head,
                    {**job, "image_chunk_size": image_chunk, "text_chunk_size": text_chunk},
                    isolate=not args.no_isolate,
                )
            except torch.OutOfMemoryError as error:  # a too large block is a result of the sweep, not a failure
                logger.warning("    out of memory: %s", str(error).splitlines()[0])
                rows.append({**row, "error": "out of memory"})
                continue
            row.update(
                pairs_per_s=run["scores"].numel() / run["median_s"],
                median_s=run["median_s"],
                growth_rss_mb=run["growth_rss_mb"],
                cuda_growth_mb=run.get("cuda_growth_mb"),
            )
            rows.append(row)
    return rows


def run_profile(args, lengths_pool: list[int]) -> list[dict]:
    """torch.profiler of the batched head on the eval block's captions: the top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    job = case_jobs(args, "eval", lengths_pool)
    image_chunk = args.image_chunk_size or default_chunk_sizes(device)[0]
    job["images"] = args.profile_images or 4 * image_chunk
    head, image_tokens, text_tokens, text_mask = build_inputs(job, device)
    with torch.no_grad():
        head(image_tokens, text_tokens, text_mask, args.image_chunk_size, args.text_chunk_size)  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            head(image_tokens, text_tokens, text_mask, args.image_chunk_size, args.text_chunk_size)
    time_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(group_by_input_shape=True), key=lambda e: getattr(e, time_key), reverse=True)
    total = sum(getattr(event, time_key) for event in events)
    return [
        {
            "op": event.key,
            "input_shapes": str(event.input_shapes),
            "calls": event.count,
            "self_ms": getattr(event, time_key) / 1e3,
            "self_pct": 100.0 * getattr(event, time_key) / total if total else 0.0,
        }
        for event in events[: args.profile_rows]
    ]


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["eval", "train"],
        choices=["eval", "train"],
        help="cases to time; '--cases' alone times none (e.g. with --sweep or --profile only)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the batched head per case (median)")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed runs of the loop per case")
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--eval-captions", type=int, default=1280)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument(
        "--loop-captions",
        type=int,
        default=256,
        help="eval case: time the loop on the first N captions only (its cost is one iteration per caption, linear "
        "in N); 0 = all. The train case always loops over all captions.",
    )
    parser.add_argument("--skip-loop", action="store_true", help="time the batched head only")
    parser.add_argument("--train-loss", choices=["hinge", "sum"], default="hinge", help="loss of the train case")
    parser.add_argument("--embed-size", type=int, default=512)
    parser.add_argument("--num-patches", type=int, default=196, help="patch tokens N (the image has 1 + N tokens)")
    parser.add_argument("--patch-keep-ratio", type=float, default=0.5)
    parser.add_argument("--patch-aggr-ratio", type=float, default=0.3)
    parser.add_argument("--word-keep-ratio", type=float, default=0.75)
    parser.add_argument("--no-word-aggregation", action="store_true", help="LAPS: all caption tokens are key tokens")
    parser.add_argument("--image-chunk-size", type=int, default=None, help="default: default_chunk_sizes(device)")
    parser.add_argument("--text-chunk-size", type=int, default=None, help="default: default_chunk_sizes(device)")
    parser.add_argument(
        "--captions-file",
        default=None,
        help="a one-caption-a-line file to draw caption lengths from (default: the shipped Flickr30K test histogram)",
    )
    parser.add_argument("--caption-noise", type=float, default=2.5, help="std of the noise on caption tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="also run the batched head under bf16 autocast")
    parser.add_argument("--sweep", action="store_true", help="chunk-shape sweep of the batched eval head")
    parser.add_argument("--sweep-image-chunks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--sweep-text-chunks", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--sweep-images", type=int, default=64)
    parser.add_argument("--sweep-captions", type=int, default=1024)
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the batched eval head")
    parser.add_argument(
        "--profile-images",
        type=int,
        default=None,
        help="default: 4 image chunks, so that the caption side (once per call) weighs about as in a large block",
    )
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--matmul-size", type=int, default=2048, help="size of the reference matmul peak")
    parser.add_argument("--no-isolate", action="store_true", help="measure in this process (memory less exact)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a smoke test (seconds)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.eval_images, args.eval_captions, args.train_batch = 8, 40, 8
        args.embed_size, args.num_patches, args.repeats, args.loop_captions = 64, 16, 1, 0
        args.image_chunk_size, args.text_chunk_size = args.image_chunk_size or 4, args.text_chunk_size or 16
        args.sweep_image_chunks, args.sweep_text_chunks, args.sweep_images, args.sweep_captions = (
            [4, 8],
            [16, 40],
            8,
            40,
        )
        args.matmul_size = 256
    for name in ("eval_images", "eval_captions", "train_batch", "repeats", "loop_repeats", "num_patches", "embed_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchlib.setup_logging()
    device = torch.device(args.device)
    set_threads(args.threads)
    lengths_pool = caption_token_counts(args.captions_file)

    results = {
        "machine": machine_info(device),
        "settings": vars(args),
        "default_chunk_sizes": default_chunk_sizes(device),
    }
    logger.info("machine: %s", results["machine"])
    peaks = {"fp32": matmul_peak_gflops(device, args.matmul_size)}
    if args.bf16:
        peaks["bf16"] = matmul_peak_gflops(device, args.matmul_size, torch.bfloat16)
    results["matmul_peak_gflops"] = peaks
    logger.info("plain %d^3 matmul peak: %s GFLOP/s", args.matmul_size, {k: round(v, 1) for k, v in peaks.items()})

    columns = [
        ("method", "method", ""),
        ("pairs", "pairs", "d"),
        ("median s", "median_s", ".3f"),
        ("pairs/s", "pairs_per_s", ",.0f"),
        ("useful GFLOP/s", "useful_gflops", ".1f"),
        ("% matmul peak", "pct_of_matmul_peak", ".0f"),
        ("peak RSS MB", "peak_rss_mb", ".0f"),
        ("RSS growth MB", "growth_rss_mb", ".0f"),
        ("CUDA peak MB", "cuda_peak_mb", ".0f"),
        ("F30K 1Kx5K s", "flickr30k_1k_projected_s", ",.0f"),
        ("COCO 5Kx25K s", "coco_5k_projected_s", ",.0f"),
    ]
    results["cases"] = {}
    for case in args.cases:
        summary = run_case(args, case, lengths_pool, peaks)
        results["cases"][case] = summary
        logger.info(
            "\n%s: %d images x %d captions, mean %.1f caption tokens, %.1f text key tokens; useful forward "
            "%.2f MFLOP/pair (loop %.2f)",
            case,
            summary["images"],
            summary["captions"],
            summary["mean_caption_tokens"],
            summary["mean_text_keys"],
            summary["useful_forward_flops_per_pair"] / 1e6,
            summary["loop_forward_flops_per_pair"] / 1e6,
        )
        logger.info(format_table(summary["rows"], columns))
        if "speedup_batched_over_loop" in summary:
            logger.info(
                "batched / loop throughput: %.1fx; max |batched - loop| = %.2e over %d captions; %d of %d pairs "
                "beyond 1e-5%s%s",
                summary["speedup_batched_over_loop"],
                summary["max_abs_diff_batched_vs_loop"],
                summary["compared_captions"],
                summary["pairs_beyond_tolerance"],
                summary["compared_pairs"],
                ""
                if summary["within_tolerance"]
                else (
                    ", all top-K near ties (selection gap < 1e-6: {})".format(
                        ", ".join(f"{pair['selection_gap']:.1e}" for pair in summary["beyond_tolerance_pairs"][:8])
                    )
                    if summary["all_beyond_tolerance_are_near_ties"]
                    else ", NOT explained by near ties"
                ),
                f"; max |grad diff| = {summary['max_abs_grad_diff_batched_vs_loop']:.2e} (max |grad| "
                f"{summary['max_abs_grad']:.2e})"
                if "max_abs_grad_diff_batched_vs_loop" in summary
                else "",
            )
        if "bf16" in summary:
            effect = summary["bf16"]
            logger.info(
                "bf16 autocast: %.2fx fp32 speed; max |score diff| %.2e (mean %.2e); same top-1 caption for "
                "%.1f%% of images, same top-1 image for %.1f%% of captions",
                effect["speedup_over_fp32"],
                effect["max_abs_score_diff"],
                effect["mean_abs_score_diff"],
                effect["same_top1_caption_per_image_pct"],
                effect["same_top1_image_per_caption_pct"],
            )
            if "recall_fp32" in effect:
                logger.info(
                    "  synthetic recall fp32 %s\n  synthetic recall bf16 %s",
                    effect["recall_fp32"],
                    effect["recall_reduced"],
                )

    if args.sweep:
        logger.info("\nchunk sweep: %d images x %d captions, batched eval", args.sweep_images, args.sweep_captions)
        results["sweep"] = run_sweep(args, lengths_pool)
        logger.info(
            format_table(
                results["sweep"],
                [
                    ("images/block", "image_chunk_size", "d"),
                    ("captions/block", "text_chunk_size", "d"),
                    ("default", "default", ""),
                    ("pairs/s", "pairs_per_s", ",.0f"),
                    ("RSS growth MB", "growth_rss_mb", ".0f"),
                    ("CUDA growth MB", "cuda_growth_mb", ".0f"),
                    ("est. block MB", "estimated_block_mb_at_max_keys", ".0f"),
                    ("error", "error", ""),
                ],
            )
        )
    if args.profile:
        logger.info("\nprofile of the batched eval head (top operators by self time)")
        results["profile"] = run_profile(args, lengths_pool)
        logger.info(
            format_table(
                results["profile"],
                [
                    ("op", "op", ""),
                    ("self ms", "self_ms", ".1f"),
                    ("self %", "self_pct", ".1f"),
                    ("calls", "calls", "d"),
                    ("input shapes", "input_shapes", ""),
                ],
            )
        )

    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
