"""
Extended COCO metrics on the COCO 5K test: ECCV Caption (mAP@R, R-Precision, R@1), CxC R@K and, when its
annotations are downloaded, PMRP, computed by the PyPI package `eccv-caption` (Chun et al., ECCV 2022), which
ships the ECCV Caption and CxC positives of the 5K test as COCO image and caption ids.

The package's caption ids (`Metrics.coco_ids`, 25,000) are in the Karpathy `testall` order: caption `c` of the
split's flattened captions (5 per image, in file order) is COCO caption `coco_ids[c]`, whose image is the split's
`image_id` of that row; `coco_5k_caption_ids` checks exactly that (tested against `testall_ids.txt`) and refuses
any other split. Values are percentages, like Recall@K.
"""

import contextlib
import io

import torch


PACKAGE_HINT = 'pip install eccv-caption (or pip install -e ".[coco]")'
RECALL_KS = (1, 5, 10)


def load_eccv_metrics(pm_dir: str | None = None):
    """The package's `Metrics` with its ground truths; `pm_dir`: folder of the downloaded Plausible Match
    annotations (`pm_image_to_caption.json`, `pm_caption_to_image.json`) for PMRP."""
    try:
        from eccv_caption import Metrics
    except ImportError as error:
        raise ImportError(f"The extended COCO metrics need the eccv-caption package: {PACKAGE_HINT}.") from error
    with contextlib.redirect_stderr(io.StringIO()):  # it warns that ujson is missing
        return Metrics(extra_file_dir=pm_dir)


def coco_5k_caption_ids(image_ids, caption_to_image, metrics) -> list[int]:
    """
    The package caption id of each caption of a split (`image_ids`: one per image row; `caption_to_image`: the
    row of each flattened caption), or a ValueError saying how the split differs from the COCO 5K test.
    """
    coco_ids = [int(caption_id) for caption_id in metrics.coco_ids]
    caption_images = metrics.coco_gts["t2i"]
    expected = [caption_images[caption_id][0] for caption_id in coco_ids]  # image id of each caption
    caption_to_image = [int(row) for row in caption_to_image]
    got = [int(image_ids[row]) for row in caption_to_image]
    hint = (
        "The ECCV Caption / CxC metrics exist for the COCO 5K (Karpathy testall) test only: build it with "
        "dataset_scripts/build_retrieval_dataset.py from testall_caps.txt / testall_ids.txt, in file order, without "
        "--max_eval_images."
    )
    if len(got) != len(expected):
        raise ValueError(
            f"the test split has {len(got)} captions of {len(image_ids)} images; the COCO 5K test has {len(expected)} "
            f"captions of {len(set(expected))} images. {hint}"
        )
    for index, (ours, theirs) in enumerate(zip(got, expected)):
        if ours != theirs:
            raise ValueError(
                f"caption {index} of the test split belongs to image {ours}, but caption {index} of the COCO 5K test "
                f"belongs to image {theirs}. {hint}"
            )
    return coco_ids


def _ranked(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """Indices of each row's `depth` best columns, best first."""
    return scores.topk(min(depth, scores.shape[1]), dim=1).indices


def coco_extended_metrics(
    image_to_text: torch.Tensor,
    text_to_image: torch.Tensor | None,
    caption_to_image,
    image_ids,
    metrics=None,
) -> dict[str, float]:
    """
    ECCV Caption mAP@R / R-Precision / R@1, CxC R@1/5/10, the package's own COCO 5K R@1/5/10 (a cross-check of
    ours) and, with PM annotations, PMRP, both directions: `{"eccv_map_at_r_i2t": ..., "cxc_r5_t2i": ...}` in %.

    Args:
        image_to_text: `(n_img, n_cap)` scores ranking captions for each image.
        text_to_image: `(n_img, n_cap)` scores ranking images for each caption (default: `image_to_text`).
        caption_to_image: `(n_cap,)` image row of each caption.
        image_ids: COCO image id of each row.
        metrics: an `eccv_caption.Metrics` (default: `load_eccv_metrics()`).
    """
    metrics = metrics if metrics is not None else load_eccv_metrics()
    caption_ids = coco_5k_caption_ids(image_ids, caption_to_image, metrics)
    text_to_image = image_to_text if text_to_image is None else text_to_image
    image_ids = [int(image_id) for image_id in image_ids]
    ground_truths = [metrics.coco_gts, metrics.cxc_gts, metrics.eccv_gts] + ([metrics.pm_gts] if metrics.pm_gts else [])
    depth = {
        direction: max([max(RECALL_KS)] + [len(items) for gts in ground_truths for items in gts[direction].values()])
        for direction in ("i2t", "t2i")
    }  # R-Precision needs each query's R best; R is its number of positives
    i2t_ranked = _ranked(image_to_text.float(), depth["i2t"]).tolist()
    t2i_ranked = _ranked(text_to_image.float().t(), depth["t2i"]).tolist()
    i2t_items = {image_ids[row]: [caption_ids[c] for c in ranked] for row, ranked in enumerate(i2t_ranked)}
    t2i_items = {caption_ids[c]: [image_ids[row] for row in ranked] for c, ranked in enumerate(t2i_ranked)}
    targets = ["eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls", "coco_5k_recalls"]
    with contextlib.redirect_stderr(io.StringIO()):  # its ECCV loop shows a progress bar regardless of verbose
        scores = metrics.compute_all_metrics(i2t_items, t2i_items, target_metrics=targets, Ks=RECALL_KS, verbose=False)
        if metrics.pm_gts:  # asked for separately: compute_all_metrics files PMRP under the bare keys i2t / t2i
            scores["pmrp"] = metrics.pmrp({"i2t": i2t_items, "t2i": t2i_items}, "all")
    return {
        f"{name.replace('coco_5k_', 'package_coco_5k_')}_{direction}": 100.0 * float(value)
        for name, directions in scores.items()
        for direction, value in directions.items()
    }


def coco_metrics_hook(pm_dir: str | None = None):
    """An `SCTATrainer.extra_metrics` entry: the metrics above for each evaluation of the COCO 5K test."""
    metrics = load_eccv_metrics(pm_dir)

    def compute(image_to_text, text_to_image, caption_to_image, split):
        return coco_extended_metrics(image_to_text, text_to_image, caption_to_image, split["image_id"], metrics)

    return compute
