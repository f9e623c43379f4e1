"""scta-search: indexing throughput, re-indexing an unchanged folder, index size per image, and per-query latency of
`Gallery.search_text` (two-stage and exhaustive) as the gallery grows.

    python bench/bench_search.py --model outputs/demo_synthetic --json bench/results/search.json

Part 1, the demo model on real files: the synthetic test images written as PNG files (1,000 by default) are
indexed (`Gallery.build`, timed end to end: decoding, preprocessing, encoding, writing), indexed again unchanged
(`Gallery.update`: stat every file, encode nothing, rewrite nothing), and the index folder's size is divided by the
image count. Part 2, latency: galleries of `--gallery-sizes` images made from the demo model's real image
tokens (the 1,000 encoded images repeated with noise, so that the head sees realistic tokens), queried with
captions of the test split: median over `--queries` queries of `search_text(k=10, rerank_top_k=64)` and of the
exhaustive `rerank_top_k=0` (measured up to `--exhaustive-max`, projected linearly beyond). Part 3, the paper's
shapes with random weights: images/s of the ViT-B/16 image side and, per query, the BERT-base text side, the
first stage over 512-d global embeddings and the head on 64 candidates, summed into a projected latency.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchlib import machine_info, set_threads, write_json  # noqa: E402
from dataset_scripts.synthetic_shapes import generate_synthetic_dataset, write_png_files  # noqa: E402
from modeling_scta import SCTAModel  # noqa: E402
from processing_scta import SCTAProcessor  # noqa: E402
from search_scta import Gallery  # noqa: E402


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_files(args, model, processor, work: Path) -> tuple[dict, Gallery, list[str]]:
    dataset = generate_synthetic_dataset(seed=0, train_images=0, dev_images=0, test_images=args.images, num_proc=1)
    write_png_files(dataset, work / "photos")
    captions = [row[0] for row in dataset["test"]["captions"]]
    start = time.perf_counter()
    gallery = Gallery.build(model, processor, work / "photos" / "test", work / "index", batch_size=args.batch_size)
    first = time.perf_counter() - start
    start = time.perf_counter()
    counts = Gallery.load(work / "index", model, processor).update(work / "photos" / "test")
    again = time.perf_counter() - start
    assert counts["unchanged"] == args.images, counts
    size = folder_size(work / "index")
    result = {
        "images": args.images,
        "index_seconds": round(first, 3),
        "images_per_second": round(args.images / first, 1),
        "reindex_unchanged_seconds": round(again, 3),
        "reindex_fraction_of_first": round(again / first, 4),
        "index_bytes": size,
        "bytes_per_image": round(size / args.images),
    }
    return result, gallery, captions


def synthetic_gallery(base: Gallery, size: int, generator: torch.Generator) -> Gallery:
    """`size` images from the base gallery's real tokens, repeated with a little noise (deduplicated neighbours)."""
    tokens = torch.as_tensor(np.asarray(base.table.with_format("numpy")["tokens"], dtype=np.float32))
    repeats = -(-size // len(tokens))
    tiled = tokens.repeat(repeats, 1, 1)[:size]
    tiled = tiled + 0.05 * tiled.std() * torch.randn(tiled.shape, generator=generator)
    with torch.no_grad():
        global_embeddings = base.model.pool_image_tokens(tiled)
    table = datasets.Dataset.from_dict(
        {"path": [f"img{i:07d}" for i in range(size)], "size": [0] * size, "mtime": [0.0] * size,
         "tokens": list(tiled.half().numpy()), "global_embedding": list(global_embeddings.numpy())},
        features=base.table.features,
    )  # fmt: skip
    return Gallery(base.model, base.processor, table, base.manifest)


def part_latency(args, base: Gallery, captions: list[str]) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in args.gallery_sizes:
        gallery = synthetic_gallery(base, size, generator)
        queries = captions[: args.queries]
        gallery.search_text(queries[0], k=10)  # warm-up: loads the global matrix (and a FAISS index if installed)
        two_stage = statistics.median(median_seconds(lambda q=q: gallery.search_text(q, k=10, rerank_top_k=64), 1) for q in queries)
        row = {"gallery": size, "two_stage_k64_seconds": round(two_stage, 4)}
        if size <= args.exhaustive_max:
            exhaustive = statistics.median(median_seconds(lambda q=q: gallery.search_text(q, k=10, rerank_top_k=0), 1) for q in queries[:3])
            row["exhaustive_seconds"] = round(exhaustive, 4)
        rows.append(row)
        print(row, flush=True)
    measured = [row for row in rows if "exhaustive_seconds" in row]
    if measured:
        per_image = measured[-1]["exhaustive_seconds"] / measured[-1]["gallery"]
        for row in rows:
            row.setdefault("exhaustive_seconds_projected", round(per_image * row["gallery"], 3))
    return rows


def part_paper_shapes(args) -> dict:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
    bert = BertModel(BertConfig(), add_pooling_layer=False).eval()
    pixel_values = torch.randn(8, 3, 224, 224)
    ids = torch.randint(1000, 20000, (1, 16))
    with torch.no_grad():
        vit(pixel_values=pixel_values)
        images_per_second = 8 / median_seconds(lambda: vit(pixel_values=pixel_values), 2)
        text_seconds = median_seconds(lambda: bert(input_ids=ids), 3)
    from configuration_scta import SCTAConfig
    from modeling_scta import KeyTokenAlignmentHead

    head = KeyTokenAlignmentHead.from_config(SCTAConfig()).eval()
    candidates = torch.randn(64, 197, 512).half()
    text_tokens, text_mask = torch.randn(1, 16, 512), torch.ones(1, 16, dtype=torch.long)
    results = {"vit_b16_images_per_second": round(images_per_second, 2), "bert_base_query_seconds": round(text_seconds, 4)}
    with torch.no_grad():
        captions = head.caption_key_tokens(text_tokens, text_mask)
        results["head_64_candidates_seconds"] = round(median_seconds(
            lambda: head.score_pairs(candidates, captions, torch.arange(64), torch.zeros(64, dtype=torch.long)), 3), 4)  # fmt: skip
        for size in args.gallery_sizes:
            unit = F.normalize(torch.randn(size, 512), dim=-1)
            query = F.normalize(torch.randn(512), dim=-1)
            first = median_seconds(lambda: (unit @ query).topk(64), 5)
            results[f"first_stage_{size}_seconds"] = round(first, 5)
            results[f"query_{size}_projected_seconds"] = round(text_seconds + first + results["head_64_candidates_seconds"], 4)
            results[f"index_{size}_projected_hours"] = round(size / images_per_second / 3600, 2)
        results["bytes_per_image_paper_shapes"] = 197 * 512 * 2 + 512 * 4  # float16 tokens + float32 global
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "demo_synthetic"), help="the demo model folder")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gallery-sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--exhaustive-max", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-paper-shapes", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model = SCTAModel.from_pretrained(args.model).eval()
    processor = SCTAProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as work:
        files, gallery, captions = part_files(args, model, processor, Path(work))
        print(json.dumps(files, indent=2), flush=True)
        latency = part_latency(args, gallery, captions)
    results = {"machine": machine_info(torch.device("cpu")), "files": files, "latency": latency}
    if not args.skip_paper_shapes:
        results["paper_shapes"] = part_paper_shapes(args)
        print(json.dumps(results["paper_shapes"], indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
