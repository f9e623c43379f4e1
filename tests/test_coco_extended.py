"""Extended COCO metrics (ECCV Caption, CxC, PMRP) by the eccv-caption package: the caption-id mapping of the COCO 5K
test, refusal of other splits, and values on hand-built retrieval results computed by hand."""

import json

import numpy as np
import pytest
import torch

from scta_train.metrics import retrieval_metrics


eccv_caption = pytest.importorskip("eccv_caption", reason="the extended COCO metrics need: pip install eccv-caption")

from helpers import KARPATHY_DATA, requires_karpathy_data  # noqa: E402
from scta_train.coco_extended import coco_5k_caption_ids, coco_extended_metrics, load_eccv_metrics  # noqa: E402


SHARED = KARPATHY_DATA / "coco" if KARPATHY_DATA else None


@requires_karpathy_data("coco/testall_ids.txt")
def test_package_caption_ids_follow_the_karpathy_testall_order():
    metrics = load_eccv_metrics()
    # testall_ids.txt: the COCO image id of each of the 25,000 captions, 5 consecutive per image
    caption_images = [int(line) for line in (SHARED / "testall_ids.txt").read_text().split()]
    image_ids = caption_images[::5]
    caption_to_image = np.repeat(np.arange(5000), 5)
    caption_ids = coco_5k_caption_ids(image_ids, caption_to_image, metrics)
    assert len(caption_ids) == len(set(caption_ids)) == 25000
    for index in (0, 1, 4, 5, 12345, 24999):  # each caption id belongs to the image of its line
        assert metrics.coco_gts["t2i"][caption_ids[index]] == [caption_images[index]]
    # and every image's five caption ids are the package's five for that image
    for row in (0, 2500, 4999):
        assert sorted(caption_ids[5 * row : 5 * row + 5]) == sorted(metrics.coco_gts["i2t"][image_ids[row]])


@requires_karpathy_data("coco/testall_ids.txt", "f30k/test_ids.txt")
def test_other_splits_are_refused_with_the_reason():
    metrics = load_eccv_metrics()
    caption_images = [int(line) for line in (SHARED / "testall_ids.txt").read_text().split()]
    image_ids = caption_images[::5]
    with pytest.raises(ValueError, match="has 5000 captions of 1000 images; the COCO 5K test has 25000"):
        coco_5k_caption_ids(image_ids[:1000], np.repeat(np.arange(1000), 5), metrics)
    swapped = list(image_ids)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ValueError, match=f"caption 0 of the test split belongs to image {swapped[0]}"):
        coco_5k_caption_ids(swapped, np.repeat(np.arange(5000), 5), metrics)
    f30k_images = [int(line) for line in (SHARED.parent / "f30k" / "test_ids.txt").read_text().split()]
    with pytest.raises(ValueError, match="COCO 5K"):
        coco_5k_caption_ids(f30k_images[::5], np.repeat(np.arange(1000), 5), metrics)


def hand_built_metrics(tmp_path, with_pm: bool):
    """3 images (100, 200, 300), 2 captions each (11, 12 | 21, 22 | 31, 32), and hand-written positives."""
    ground_truths = {
        "coco": (
            {100: [11, 12], 200: [21, 22], 300: [31, 32]},
            {c: [100 * (c // 10)] for c in (11, 12, 21, 22, 31, 32)},
        ),
        "eccv": ({100: [11, 12, 21]}, {21: [200, 100]}),
        "cxc": ({100: [11, 12], 200: [21, 22, 32]}, {11: [100], 32: [300, 200]}),
        "pm": ({100: [11, 12, 22]}, {11: [100, 300]}),
    }
    paths = {}
    for name, (i2t, t2i) in ground_truths.items():
        for direction, table in (("image_to_caption", i2t), ("caption_to_image", t2i)):
            path = tmp_path / f"{name}_{direction}.json"
            path.write_text(json.dumps({str(k): v for k, v in table.items()}))
            paths[name, direction] = str(path)
    metrics = load_eccv_metrics(str(tmp_path) if with_pm else None)
    metrics.set_coco_gts(paths["coco", "image_to_caption"], paths["coco", "caption_to_image"])
    metrics.set_cxc_gts(paths["cxc", "image_to_caption"], paths["cxc", "caption_to_image"])
    metrics.set_eccv_gts(paths["eccv", "image_to_caption"], paths["eccv", "caption_to_image"])
    metrics.coco_ids = np.array([11, 12, 21, 22, 31, 32])
    return metrics


# rows: images 100, 200, 300; columns: captions 11, 12, 21, 22, 31, 32
SCORES = torch.tensor(
    [
        [0.8, 0.6, 0.9, 0.5, 0.7, 0.4],  # image 100 ranks 21, 11, 31, 12, 22, 32
        [0.7, 0.55, 0.5, 0.4, 0.9, 0.8],  # image 200 ranks 31, 32, 11, 12, 21, 22 (no ties anywhere)
        [0.1, 0.2, 0.6, 0.4, 0.9, 0.85],  # image 300 ranks 31, 32, 21, 22, 12, 11
    ]
)
CAPTION_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("with_pm", [False, True])
def test_values_on_hand_built_results_equal_the_hand_computed_ones(tmp_path, with_pm):
    if with_pm:  # the package reads the downloaded Plausible Match annotations under these names
        (tmp_path / "pm_image_to_caption.json").write_text(json.dumps({"100": [11, 12, 22]}))
        (tmp_path / "pm_caption_to_image.json").write_text(json.dumps({"11": [100, 300]}))
    metrics = hand_built_metrics(tmp_path, with_pm)
    result = coco_extended_metrics(SCORES, None, CAPTION_TO_IMAGE, [100, 200, 300], metrics)
    # ECCV i2t, image 100, positives {11, 12, 21} (R = 3), top 3 = 21, 11, 31: precision@1 1, @2 1, item 3 wrong
    assert result["eccv_r1_i2t"] == pytest.approx(100.0)
    assert result["eccv_rprecision_i2t"] == pytest.approx(100 * 2 / 3)
    assert result["eccv_map_at_r_i2t"] == pytest.approx(100 * (1 + 1 + 0) / 3)
    # ECCV t2i, caption 21 (column 2: 0.9, 0.5, 0.6 -> images 100, 300, 200), positives {200, 100} (R = 2)
    assert result["eccv_r1_t2i"] == pytest.approx(100.0)
    assert result["eccv_rprecision_t2i"] == pytest.approx(50.0)
    assert result["eccv_map_at_r_t2i"] == pytest.approx(50.0)
    # CxC i2t: image 100 {11, 12}: first hit at rank 2; image 200 {21, 22, 32}: at rank 2 (32)
    assert (result["cxc_r1_i2t"], result["cxc_r5_i2t"], result["cxc_r10_i2t"]) == pytest.approx((0.0, 100.0, 100.0))
    # CxC t2i: caption 11 ranks image 100 first; caption 32 (0.4, 0.8, 0.85) ranks 300 first
    assert result["cxc_r1_t2i"] == pytest.approx(100.0)
    # the package's plain COCO recall equals ours
    ours = retrieval_metrics(SCORES, CAPTION_TO_IMAGE)
    for k in (1, 5, 10):
        for direction in ("i2t", "t2i"):
            assert result[f"package_coco_5k_r{k}_{direction}"] == pytest.approx(ours[f"r{k}_{direction}"])
    if with_pm:  # image 100, R = 3: top 3 = 21, 11, 31 -> 1 of 3; caption 11, R = 2: images 100, 200 -> 1 of 2
        assert result["pmrp_i2t"] == pytest.approx(100 / 3)
        assert result["pmrp_t2i"] == pytest.approx(50.0)
    else:
        assert not any(name.startswith("pmrp") for name in result)


def test_a_separate_text_to_image_matrix_ranks_images(tmp_path):
    metrics = hand_built_metrics(tmp_path, with_pm=False)
    text_to_image = SCORES.clone()
    text_to_image[:, 5] = torch.tensor([0.9, 0.1, 0.2])  # caption 32 now ranks image 100 first: a CxC miss
    result = coco_extended_metrics(SCORES, text_to_image, CAPTION_TO_IMAGE, [100, 200, 300], metrics)
    assert result["cxc_r1_t2i"] == pytest.approx(50.0)
    assert result["cxc_r1_i2t"] == pytest.approx(0.0)  # image-to-text still from SCORES
