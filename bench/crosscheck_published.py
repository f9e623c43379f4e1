"""
Cross-check against the published code: this project's key-token head and loss against the published SCTA and LAPS
repositories' own modules, on the same inputs and weights.

    python bench/crosscheck_published.py --scta_dir PATH/TO/SCTA --laps_dir PATH/TO/LAPS \
        [--model outputs/demo_synthetic] --json bench/results/crosscheck.json

`--scta_dir` / `--laps_dir` are checkouts of https://github.com/ICME2025ITR/SCTA and
https://github.com/CrossmodalGroup/LAPS. They carry no license, so nothing of them is copied here: their `lib`
packages are imported from the given folders (`lib/cross_net.py`, `lib/xttn.py`, `lib/loss.py`).

1. Scores. The published `CrossSparseAggrNet_v2` (SCTA: image patch selection + aggregation, caption aggregation;
   LAPS: image side only, every caption token a key token) is built with this project's head settings, this head's
   weights are copied into it, and both score the same projected tokens. The published caption aggregator creates
   its last layer anew, randomly, at every call (documented deviation 1 of docs/METHOD.md): for the comparison our
   learned layer takes its place (its first k rows for a caption of k word slots, zero bias, which the softmax over
   words cancels anyway). Shapes: the paper's (1 + 196 image tokens, width 512, K = 98, M = 29, Flickr30K test
   caption lengths from the shipped histogram) and the demo's (1 + 16 tokens, width 128, patch_aggr_ratio 0.75).
   Scores are compared in float64 (the arithmetic alone) and float32.
2. The loss. The published `ContrastiveLoss` (VSE++ hinge, margin 0.2, pairs of one image masked) against
   `modeling_scta.scta_loss` on the same score matrices, with repeated image ids, sum over negatives and hardest
   negative.
3. With `--model` (a trained SCTA folder, e.g. the demo): the published head with this model's weights scores the
   demo's synthetic test split (every image against every caption, its per-caption loop): with our learned caption
   layer in place it must give this project's recall, and the few pairs it scores differently are counted with how
   many of them sit at a patch-selection tie (the K-th and (K+1)-th selection scores equal to float32 rounding, so
   that either implementation may keep the other patch); with its own random layer per call (as published) the
   recall it would really report, which measures what deviation 1 costs.
"""

import argparse
import contextlib
import importlib
import sys
import types
from pathlib import Path

import torch
from torch import nn

import benchlib
from benchlib import caption_token_counts, draw_lengths, format_table, logger, write_json
from modeling_scta import KeyTokenAlignmentHead, scta_loss


# ----------------------------------------------------------------------------------------------------------------
# Importing a published repository's `lib` package (both repositories name it `lib`)


def import_published(folder: str, module: str) -> types.ModuleType:
    """`lib.<module>` of the checkout `folder`, imported from there; any `lib` imported before is forgotten first."""
    root = Path(folder).resolve()
    if not (root / "lib" / f"{module}.py").is_file():
        raise SystemExit(f"{root} is not a checkout of the published code: it has no lib/{module}.py.")
    for name in [name for name in sys.modules if name == "lib" or name.startswith("lib.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"lib.{module}")
    finally:
        sys.path.remove(str(root))


# ----------------------------------------------------------------------------------------------------------------
# The published head with this head's weights


def published_options(head: KeyTokenAlignmentHead, embed_size: int, patch_keep_ratio: float, patch_aggr_ratio: float):
    """The `opt` namespace the published `CrossSparseAggrNet_v2` reads, for both repositories' argument names."""
    return types.SimpleNamespace(
        embed_size=embed_size,
        num_patches=head.num_patches,
        img_sparse_ratio=patch_keep_ratio,  # SCTA's names
        img_aggr_ratio=patch_aggr_ratio,
        cap_aggr_ratio=head.word_keep_ratio,
        monitor_weight=0.0,
        sparse_ratio=patch_keep_ratio,  # LAPS's names
        aggr_ratio=patch_aggr_ratio,
        ratio_weight=0.0,
        attention_weight=0.0,
    )


def copy_aggregator(ours, published_sequential: nn.Sequential, published_scale: nn.Parameter) -> None:
    """Our `TokenAggregator` (LayerNorm, Linear, GELU, Linear without bias, scale) into the published Sequential."""
    with torch.no_grad():
        published_sequential[0].load_state_dict(ours.mlp[0].state_dict())
        published_sequential[1].load_state_dict(ours.mlp[1].state_dict())
        published_sequential[3].weight.copy_(ours.mlp[3].weight)
        published_sequential[3].bias.zero_()  # a per-slot constant, cancelled by the softmax over tokens
        published_scale.copy_(ours.scale.reshape(published_scale.shape))


def published_head(cross_net, head: KeyTokenAlignmentHead, opt, laps: bool) -> nn.Module:
    net = cross_net.CrossSparseAggrNet_v2(opt).eval()
    if laps:
        copy_aggregator(head.patch_aggregator, net.aggr_net.weight, net.aggr_net.scale)
        return net
    copy_aggregator(head.patch_aggregator, net.img_aggr_net.weight, net.img_aggr_net.scale)
    caption = net.cap_aggr_net
    with torch.no_grad():
        caption.layer_norm.load_state_dict(head.word_aggregator.mlp[0].state_dict())
        caption.fc1.load_state_dict(head.word_aggregator.mlp[1].state_dict())
        caption.scale.copy_(head.word_aggregator.scale.reshape(caption.scale.shape))
    return net


@contextlib.contextmanager
def learned_caption_layer(cross_net, head: KeyTokenAlignmentHead):
    """While active, the published caption aggregator's `nn.Linear(hidden, k)`, created at every call, is our learned
    layer's first k outputs (zero bias) instead of a random one. Done by giving the published module a `nn`
    namespace whose `Linear` makes that layer; the published code itself is unchanged."""
    if head.word_aggregator is None:  # LAPS: no caption aggregator
        yield
        return
    learned = head.word_aggregator.mlp[3].weight  # (max_word_slots, hidden)

    def linear(in_features: int, out_features: int, *args, **kwargs) -> nn.Linear:
        layer = nn.Linear(in_features, out_features, device=learned.device, dtype=learned.dtype)
        with torch.no_grad():
            layer.weight.copy_(learned[:out_features])
            layer.bias.zero_()
        return layer

    original = cross_net.nn
    cross_net.nn = types.SimpleNamespace(**{name: getattr(nn, name) for name in dir(nn) if not name.startswith("_")})
    cross_net.nn.Linear = linear
    try:
        yield
    finally:
        cross_net.nn = original


# ----------------------------------------------------------------------------------------------------------------
# 1. Scores on the same inputs


SHAPES = {
    # the paper's: ViT-B/16 at 224 px (1 + 196 tokens), width 512, K = 98, M = 29, Flickr30K caption lengths
    "paper": {"num_patches": 196, "embed_size": 512, "patch_keep_ratio": 0.5, "patch_aggr_ratio": 0.3},
    # the demo's: 64 px images in 16-px patches (1 + 16 tokens), width 128, M = 6
    "demo": {"num_patches": 16, "embed_size": 128, "patch_keep_ratio": 0.5, "patch_aggr_ratio": 0.75},
}


def make_head(shape: dict, word_aggregation: bool, seed: int) -> KeyTokenAlignmentHead:
    torch.manual_seed(seed)
    head = KeyTokenAlignmentHead(
        embed_size=shape["embed_size"],
        num_patches=shape["num_patches"],
        vision_has_cls_token=True,
        patch_keep_ratio=shape["patch_keep_ratio"],
        patch_aggr_ratio=shape["patch_aggr_ratio"],
        word_aggregation=word_aggregation,
    ).eval()
    with torch.no_grad():  # trained-looking scales rather than the initial 1
        head.patch_aggregator.scale.fill_(2.5)
        if head.word_aggregator is not None:
            head.word_aggregator.scale.fill_(1.7)
    return head


def compare_scores(cross_net, mode: str, shape_name: str, args, lengths_pool) -> list[dict]:
    shape = SHAPES[shape_name]
    laps = mode == "LAPS"
    head = make_head(shape, word_aggregation=not laps, seed=args.seed)
    opt = published_options(head, shape["embed_size"], shape["patch_keep_ratio"], shape["patch_aggr_ratio"])
    net = published_head(cross_net, head, opt, laps)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 1 + shape["num_patches"], shape["embed_size"], generator=generator)
    lengths = torch.tensor(draw_lengths(lengths_pool, args.captions, args.seed))
    captions = torch.randn(args.captions, int(lengths.max()), shape["embed_size"], generator=generator)
    mask = (torch.arange(captions.shape[1])[None] < lengths[:, None]).long()
    rows = []
    for dtype in (torch.float64, torch.float32):
        head_d, net_d = head.to(dtype), net.to(dtype)
        with torch.no_grad(), learned_caption_layer(cross_net, head_d):
            ours = head_d(images.to(dtype), captions.to(dtype), mask)
            theirs = net_d(images.to(dtype), captions.to(dtype), lengths)
        difference = (ours - theirs).abs()
        rows.append(
            {
                "mode": mode,
                "shapes": shape_name,
                "dtype": str(dtype).replace("torch.", ""),
                "pairs": ours.numel(),
                "max_abs_diff": float(difference.max()),
                "mean_abs_diff": float(difference.mean()),
                "score_range": [float(ours.min()), float(ours.max())],
                "same_best_caption_per_image": float((ours.argmax(1) == theirs.argmax(1)).float().mean()),
            }
        )
    if not laps:  # the published caption layer as published: random at every call
        with torch.no_grad():
            random_layer = net.float()(images, captions, lengths)
            ours = head.float()(images, captions, mask)
        rows.append(
            {
                "mode": mode + " (published random caption layer)",
                "shapes": shape_name,
                "dtype": "float32",
                "pairs": ours.numel(),
                "max_abs_diff": float((ours - random_layer).abs().max()),
                "mean_abs_diff": float((ours - random_layer).abs().mean()),
                "score_range": [float(random_layer.min()), float(random_layer.max())],
                "same_best_caption_per_image": float((ours.argmax(1) == random_layer.argmax(1)).float().mean()),
            }
        )
    head.float(), net.float()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 2. The loss


def compare_losses(loss_module, args) -> list[dict]:
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for hardest in (False, True):
        criterion = loss_module.ContrastiveLoss(opt=None, margin=0.2, max_violation=hardest)
        for batch in (8, 128):
            scores = torch.rand(batch, batch, generator=generator, dtype=torch.float64) * 2.2 - 0.2
            image_ids = torch.randint(0, max(2, batch // 2), (batch,), generator=generator)  # repeated images
            theirs = criterion(torch.empty(batch, 1), None, img_ids=image_ids, scores=scores.clone())
            ours = scta_loss(scores, image_ids, margin=0.2, hardest_negative=hardest)
            rows.append(
                {
                    "hardest_negative": hardest,
                    "batch": batch,
                    "published": float(theirs),
                    "ours": float(ours),
                    "abs_diff": abs(float(theirs) - float(ours)),
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3. A trained model through the published head


DIFFERING = 1e-5  # |score difference| above which a pair of the trained model counts as scored differently
TIE = 1e-6  # a K-th and (K+1)-th patch selection score closer than this: which one is kept is float32 rounding


def selection_ties(head: KeyTokenAlignmentHead, image_tokens, captions, chunk: int = 256) -> torch.Tensor:
    """`(I, n)` bool: pairs whose K-th and (K+1)-th highest patch selection scores are within `TIE`, so that any
    rounding difference between two implementations may keep the other patch (a jump in the score, not an error)."""
    state = head.image_key_state(image_tokens)
    kept = head.num_kept_patches
    if kept >= head.num_patches:
        return torch.zeros(image_tokens.shape[0], len(captions), dtype=torch.bool)
    parts = []
    for start in range(0, len(captions), chunk):
        block = captions.select(torch.arange(start, min(start + chunk, len(captions))))
        top = head.selection_scores(state, block).topk(kept + 1, dim=-1).values  # (I, T, K + 1)
        parts.append(top[..., kept - 1] - top[..., kept] < TIE)
    return torch.cat(parts, dim=1)


def trained_model_recall(cross_net, args) -> list[dict]:
    from modeling_scta import SCTAModel
    from processing_scta import SCTAProcessor
    from scta_train.arguments import DataArguments
    from scta_train.data import load_retrieval_dataset
    from scta_train.metrics import retrieval_metrics
    from scta_train.processing import RetrievalEvalCaptions, RetrievalEvalImages
    from scta_train.retrieval import encode_caption_corpus, encode_image_corpus

    model = SCTAModel.from_pretrained(args.model).eval()
    processor = SCTAProcessor.from_pretrained(args.model)
    head, config = model.head, model.config

    data_args = DataArguments(dataset_name="synthetic_shapes", synthetic_train_images=args.synthetic_train_images)
    split = load_retrieval_dataset(data_args)["test"]
    images = RetrievalEvalImages(split, processor.image_processor)
    captions_view = RetrievalEvalCaptions(split, processor.tokenizer)
    caption_to_image = captions_view.caption_to_image
    with torch.no_grad():
        image_tokens, _ = encode_image_corpus(model, images, 128, torch.device("cpu"))
        text = [
            model.get_text_features(torch.tensor([item["input_ids"]])).last_hidden_state[0] for item in captions_view
        ]
    lengths = torch.tensor([len(t) for t in text])
    text_tokens = torch.nn.utils.rnn.pad_sequence(text, batch_first=True)
    mask = (torch.arange(text_tokens.shape[1])[None] < lengths[:, None]).long()
    laps = not config.word_aggregation
    opt = published_options(head, config.embed_size, config.patch_keep_ratio, config.patch_aggr_ratio)
    net = published_head(cross_net, head, opt, laps)
    rows = []
    with torch.no_grad():
        batched = encode_caption_corpus(model, captions_view, 128, "cpu", processor.tokenizer.pad_token_id)[0]
        # the same per-caption tokens for both heads, so that only the heads differ
        captions = head.caption_key_tokens(text_tokens, mask)  # once, for the scores and the selection ties
        ours = head.score(image_tokens, captions).float()
        variants = [
            ("this project's head", ours),
            ("this project, SCTAModel.score (captions encoded in batches)", model.score(image_tokens, batched).float()),
        ]
        with learned_caption_layer(cross_net, head):
            variants.append(("published head, our learned caption layer", net(image_tokens, text_tokens, lengths)))
        if not laps:
            torch.manual_seed(args.seed)
            variants.append(
                ("published head as published (random caption layer)", net(image_tokens, text_tokens, lengths))
            )
        ties = selection_ties(head, image_tokens, captions)
    for name, scores in variants:
        metrics = retrieval_metrics(scores, caption_to_image)
        differing = (scores - ours).abs() > DIFFERING
        rows.append(
            {
                "scores": name,
                "max_abs_diff_vs_ours": float((scores - ours).abs().max()),
                "pairs_differing": int(differing.sum()),
                # of those, pairs whose patch selection is a float32 tie: a rounding difference flips a patch
                "pairs_differing_at_selection_ties": int((differing & ties).sum()),
                **{key: metrics[key] for key in ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "rsum")},
            }
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--scta_dir", required=True, help="a checkout of github.com/ICME2025ITR/SCTA")
    parser.add_argument("--laps_dir", required=True, help="a checkout of github.com/CrossmodalGroup/LAPS")
    parser.add_argument("--images", type=int, default=24, help="random images scored against every caption")
    parser.add_argument("--captions", type=int, default=40, help="random captions, Flickr30K test lengths")
    parser.add_argument("--model", default=None, help="a trained SCTA folder to score the synthetic test split with")
    parser.add_argument("--synthetic_train_images", type=int, default=16000, help="names the demo's cached set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchlib.setup_logging()
    lengths_pool = caption_token_counts()
    results = {"settings": vars(args), "scores": [], "loss": []}
    for mode, folder in (("SCTA", args.scta_dir), ("LAPS", args.laps_dir)):
        cross_net = import_published(folder, "cross_net")
        for shape_name in SHAPES:
            pool = lengths_pool if shape_name == "paper" else [length for length in range(6, 15)]
            results["scores"] += compare_scores(cross_net, mode, shape_name, args, pool)
        results["loss"] += [
            {"repository": mode, **row} for row in compare_losses(import_published(folder, "loss"), args)
        ]
        if args.model and mode == "SCTA":
            results["trained_model"] = trained_model_recall(cross_net, args)
    logger.info(
        format_table(
            results["scores"],
            [
                ("head", "mode", ""),
                ("shapes", "shapes", ""),
                ("dtype", "dtype", ""),
                ("pairs", "pairs", ",d"),
                ("max |diff|", "max_abs_diff", ".2e"),
                ("mean |diff|", "mean_abs_diff", ".2e"),
                ("same top-1", "same_best_caption_per_image", ".3f"),
            ],
        )
    )
    logger.info(
        format_table(
            results["loss"],
            [
                ("repository", "repository", ""),
                ("hardest", "hardest_negative", ""),
                ("batch", "batch", "d"),
                ("published", "published", ".6f"),
                ("ours", "ours", ".6f"),
                ("|diff|", "abs_diff", ".1e"),
            ],
        )
    )
    if "trained_model" in results:
        logger.info(
            format_table(
                results["trained_model"],
                [
                    ("scores", "scores", ""),
                    ("max |diff|", "max_abs_diff_vs_ours", ".2e"),
                    (f"pairs > {DIFFERING:g}", "pairs_differing", ",d"),
                    ("of them selection ties", "pairs_differing_at_selection_ties", ",d"),
                    ("R@1 i2t", "r1_i2t", ".1f"),
                    ("R@1 t2i", "r1_t2i", ".1f"),
                    ("rsum", "rsum", ".1f"),
                ],
            )
        )
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
