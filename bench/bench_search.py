"""scta-search: start-up of the command line from a cold process, indexing throughput, re-indexing an unchanged
folder, index size per image, per-query latency of `Gallery.search_text` (two-stage and exhaustive) as the gallery
grows, and the server's latency over HTTP and throughput with concurrent clients.

    python bench/bench_search.py --model outputs/demo_synthetic --json bench/results/search.json

Part 0, cold processes (median of `--cold-repeats`): `python -c "import torch"` as the yardstick, `scta-search
--help`, an argument error, and a text query on the demo index (model load, index open, query, word report).
Part 4, the server: `scta-search serve`'s API in this process over real HTTP (uvicorn on 127.0.0.1), the median
per-query time seen by a client against the same query in process, and queries per second with 1 and 4 clients.

Part 1, the demo model on real files: the synthetic test images written as PNG files (1,000 by default) are
indexed (`Gallery.build`, timed end to end: decoding, preprocessing, encoding, writing), indexed again unchanged
(`Gallery.update`: stat every file, encode nothing, rewrite nothing), and the index folder's size is divided by the
image count. Part 2, latency: galleries of `--gallery-sizes` images made from the demo model's real image
tokens (the 1,000 encoded images repeated with noise, so that the head sees realistic tokens), queried with
captions of the test split: median over `--queries` queries of `search_text(k=10)` (two-stage, the default k) and of the
exhaustive `rerank_top_k=0` (measured up to `--exhaustive-max`, projected linearly beyond). Part 3, the paper's
shapes with random weights: images/s of the ViT-B/16 image side and the index's bytes per image (the per-query
latency at these shapes is measured once, by `bench/bench_two_stage.py --scale`).
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from benchlib import machine_info, set_threads, time_calls, write_json
from dataset_scripts.synthetic_shapes import generate_synthetic_dataset, write_png_files
from modeling_scta import SCTAModel
from processing_scta import SCTAProcessor
from scta_search import DEFAULT_RERANK_TOP_K, Gallery
from scta_search.files import ReadFile, Stamp
from scta_search.store import IndexStore


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median_seconds(function, repeats: int) -> float:
    """Median wall seconds of `repeats` calls (benchlib's timing; this benchmark runs on the CPU)."""
    return statistics.median(time_calls(function, repeats, torch.device("cpu")))


def part_files(args, model, processor, work: Path) -> tuple[dict, Gallery, list[str]]:
    dataset = generate_synthetic_dataset(seed=0, train_images=0, dev_images=0, test_images=args.images, num_proc=1)
    write_png_files(dataset, work / "photos")
    captions = [row[0] for row in dataset["test"]["captions"]]
    start = time.perf_counter()
    gallery = Gallery.build(
        model,
        processor,
        work / "photos" / "test",
        work / "index",
        batch_size=args.batch_size,
        model_name_or_path=str(Path(args.model).resolve()),
    )
    first = time.perf_counter() - start
    start = time.perf_counter()
    counts = gallery.update(work / "photos" / "test")
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


def synthetic_gallery(base: Gallery, size: int, generator: torch.Generator, folder: Path) -> Gallery:
    """`size` images from the base gallery's real tokens, repeated with a little noise (deduplicated neighbours),
    written into an index of their own as the indexer would (batches of 4,096)."""
    tokens = base.tokens(list(range(len(base)))).float()
    repeats = -(-size // len(tokens))
    tiled = tokens.repeat(repeats, 1, 1)[:size]
    tiled = tiled + 0.05 * tiled.std() * torch.randn(tiled.shape, generator=generator)
    with torch.no_grad():
        global_embeddings = base.model.pool_image_tokens(tiled)
    store = IndexStore.create(
        folder, {key: value for key, value in base.manifest.items() if key not in ("format", "version", "created")}
    )
    for start in range(0, size, 4096):
        files = [ReadFile(f"/img{i:07d}.png", Stamp(0, 0), f"{i:064x}") for i in range(start, min(start + 4096, size))]
        store.add(files, tiled[start : start + 4096].half().numpy(), global_embeddings[start : start + 4096].numpy())
    store.compact_if_needed()
    return Gallery(base.model, base.processor, store)


def part_latency(args, base: Gallery, captions: list[str], work: Path) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in args.gallery_sizes:
        gallery = synthetic_gallery(base, size, generator, work / f"gallery-{size}")
        queries = captions[: args.queries]
        gallery.search_text(queries[0], k=10)  # warm-up: loads the global matrix (and a FAISS index if installed)
        two_stage = statistics.median(
            median_seconds(lambda q=q: gallery.search_text(q, k=10, rerank_top_k=DEFAULT_RERANK_TOP_K), 1)
            for q in queries
        )
        row = {"gallery": size, "two_stage_seconds": round(two_stage, 4), "rerank_top_k": DEFAULT_RERANK_TOP_K}
        if size <= args.exhaustive_max:
            exhaustive = statistics.median(
                median_seconds(lambda q=q: gallery.search_text(q, k=10, rerank_top_k=0), 1) for q in queries[:3]
            )
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
    """Indexing at the paper's shapes: images/s of the ViT-B/16 image side (random weights) and the index's bytes
    per image. The per-query latency at these shapes is `bench/bench_two_stage.py --scale`'s (one measurement)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
    pixel_values = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        vit(pixel_values=pixel_values)
        images_per_second = 8 / median_seconds(lambda: vit(pixel_values=pixel_values), 2)
    results = {"vit_b16_images_per_second": round(images_per_second, 2)}
    for size in args.gallery_sizes:
        results[f"index_{size}_projected_hours"] = round(size / images_per_second / 3600, 2)
    results["bytes_per_image_paper_shapes"] = 197 * 512 * 2 + 512 * 4  # float16 tokens + float32 global
    return results


def cold_seconds(command: list[str], repeats: int) -> float:
    """Median wall time of a command in a fresh process (its exit status is not checked: errors are timed too)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_cold_start(args, index: Path) -> dict:
    python = sys.executable
    result = {
        "import_torch_seconds": cold_seconds([python, "-c", "import torch"], args.cold_repeats),
        "help_seconds": cold_seconds([python, "-m", "scta_search", "--help"], args.cold_repeats),
        "argument_error_seconds": cold_seconds(
            [python, "-m", "scta_search", "query", "--index", str(index), "x", "-k", "0"], args.cold_repeats
        ),
        "missing_index_error_seconds": cold_seconds(
            [python, "-m", "scta_search", "query", "--index", str(index) + "-missing", "x"], args.cold_repeats
        ),
        "text_query_seconds": cold_seconds(
            [python, "-m", "scta_search", "query", "--index", str(index), "a small red circle on the left", "-k", "5"],
            args.cold_repeats,
        ),
        "reindex_unchanged_cold_seconds": None,
    }
    result["text_query_over_import_torch"] = round(result["text_query_seconds"] / result["import_torch_seconds"], 2)
    return {key: (round(value, 3) if isinstance(value, float) else value) for key, value in result.items()}


def part_server(args, gallery: Gallery, captions: list[str]) -> dict:
    import uvicorn

    from scta_search.server import create_app

    app = create_app(gallery, with_app=False)
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{args.port}/api/search?"
    queries = captions[: args.queries]

    def over_http(query: str) -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(base + urllib.parse.urlencode({"q": query, "k": 10}), timeout=60) as response:
            response.read()
        return time.perf_counter() - start

    def in_process(query: str) -> float:
        start = time.perf_counter()
        gallery.search_text(query, k=10, word_report=True)
        return time.perf_counter() - start

    over_http(queries[0])
    http = statistics.median(over_http(q) for q in queries)
    local = statistics.median(in_process(q) for q in queries)
    result = {
        "http_query_seconds": round(http, 4),
        "in_process_query_seconds": round(local, 4),
        "http_overhead_ms": round(1000 * (http - local), 1),
    }
    for clients in (1, 4):
        work = queries * 2
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(over_http, work))
        result[f"queries_per_second_{clients}_clients"] = round(len(work) / (time.perf_counter() - start), 1)
    server.should_exit = True
    thread.join(timeout=10)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo_synthetic", help="the demo model folder")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gallery-sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--exhaustive-max", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-paper-shapes", action="store_true")
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    model = SCTAModel.from_pretrained(args.model).eval()
    processor = SCTAProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as work:
        files, gallery, captions = part_files(args, model, processor, Path(work))
        print(json.dumps(files, indent=2), flush=True)
        cold = part_cold_start(args, Path(work) / "index")
        cold["reindex_unchanged_cold_seconds"] = round(
            cold_seconds(
                [
                    sys.executable,
                    "-m",
                    "scta_search",
                    "index",
                    "--model",
                    args.model,
                    "--images",
                    str(Path(work) / "photos" / "test"),
                    "--index",
                    str(Path(work) / "index"),
                ],
                args.cold_repeats,
            ),
            3,
        )
        print(json.dumps(cold, indent=2), flush=True)
        server = part_server(args, gallery, captions)
        print(json.dumps(server, indent=2), flush=True)
        latency = part_latency(args, gallery, captions, Path(work))
    results = {
        "machine": machine_info(torch.device("cpu")),
        "cold_start": cold,
        "files": files,
        "server": server,
        "latency": latency,
    }
    if not args.skip_paper_shapes:
        results["paper_shapes"] = part_paper_shapes(args)
        print(json.dumps(results["paper_shapes"], indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
