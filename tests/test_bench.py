"""The benchmark scripts run end to end at tiny shapes (seconds), and their analytic counts are right."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch


BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_similarity  # noqa: E402
import bench_train_step  # noqa: E402
import bench_two_stage  # noqa: E402

import benchlib  # noqa: E402
from helpers import PUBLISHED_CODE, requires_published_code  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The benchmarks run with --threads 1 here: on a busy machine two OpenMP threads can stall each other for
    seconds on these tiny shapes. The test process's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_similarity_benchmark_runs_and_matches_the_loop(tmp_path, one_thread):
    path = tmp_path / "similarity.json"
    results = bench_similarity.main(["--quick", "--no-isolate", "--bf16", "--sweep", "--json", str(path), *one_thread])
    for case in ("eval", "train"):
        summary = results["cases"][case]
        assert {row["method"] for row in summary["rows"]} == {"batched", "loop", "batched_bf16"}
        assert all(row["pairs_per_s"] > 0 and row["median_s"] > 0 for row in summary["rows"])
        assert summary["within_tolerance"], summary["max_abs_diff_batched_vs_loop"]
        assert summary["agrees_with_loop"]
        assert summary["bf16"]["max_abs_score_diff"] < 0.5  # a sanity bound, not a precision claim
    assert results["cases"]["train"]["max_abs_grad_diff_batched_vs_loop"] <= 1e-5
    assert results["cases"]["eval"]["compared_captions"] == 40  # --quick loops over every caption
    assert "recall_fp32" in results["cases"]["eval"]["bf16"]
    assert len(results["sweep"]) == 4
    saved = json.loads(path.read_text())
    assert saved["cases"]["eval"]["rows"][0]["pairs"] == 8 * 40
    assert saved["matmul_peak_gflops"]["fp32"] > 0


def test_train_step_benchmark_runs_and_its_breakdown_adds_up(tmp_path, one_thread):
    path = tmp_path / "train.json"
    argv = ["--quick", "--no-isolate", "--variants", "fp32", "checkpointing", "--json", str(path), *one_thread]
    results = bench_train_step.main(argv)
    assert [run["variant"] for run in results["runs"]] == ["fp32", "checkpointing"]
    for run in results["runs"]:
        assert run["median_s"] > 0 and run["samples_per_s"] > 0
        assert math.isfinite(run["losses"][0])
        assert set(run["breakdown_s"]) == set(bench_train_step.BREAKDOWN_PARTS)
        assert 0 < run["head_share_pct"] < 100
        assert run["head_share_pct"] + run["towers_share_pct"] < 100  # the optimizer step is the rest
    assert json.loads(path.read_text())["runs"][0]["batch_size"] == 8


def test_flop_count_of_one_pair_by_hand():
    job = {
        "embed_size": 512,
        "num_patches": 196,
        "patch_keep_ratio": 0.5,
        "patch_aggr_ratio": 0.3,
        "word_keep_ratio": 0.75,
        "word_aggregation": True,
        "seed": 0,
    }
    head = bench_similarity.build_head(job)
    n, c, m, h = 196, 512, 29, 102
    keys = 1 + 9  # a caption of 14 tokens: floor(0.75 * 13) = 9 word slots, plus [CLS]
    per_pair = 4 * n * c + 4 * c * keys + 2 * n * c * keys + 2 * n * keys * m + 2 * n * n * m + 2 * n * m
    per_image = 2 * n * (c * h + h * m) + 2 * n * n * c
    per_caption = 2 * 13 * (c * h + h * 9) + 2 * 13 * 9 * c
    assert bench_similarity.batched_head_flops(head, [14], 1) == pytest.approx(per_pair + per_image + per_caption)
    # about 4.8 MFLOP per pair at these shapes, under a third of the loop's
    assert 4.5e6 < per_pair < 5.0e6
    assert bench_similarity.loop_flops(head, [14], 1) > 3 * per_pair


def test_peak_memory_sees_an_allocation_and_caption_file_errors_name_the_fix(tmp_path):
    with benchlib.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if memory.rss_method.startswith("VmHWM"):
        assert memory.growth_rss_mb > 48
    with pytest.raises(FileNotFoundError, match="--captions-file"):
        benchlib.caption_token_counts(tmp_path / "missing.txt")
    (tmp_path / "caps.txt").write_text("a dog runs\n\n" + " ".join(["word"] * 200) + "\n")
    assert benchlib.caption_token_counts(tmp_path / "caps.txt") == [5, benchlib.EVAL_MAX_CAPTION_TOKENS]


def test_a_real_disagreement_with_the_loop_is_not_excused_as_a_near_tie():
    args = bench_similarity.parse_args(["--quick"])
    job = bench_similarity.case_jobs(args, "eval", [12, 14, 16, 20])
    head = bench_similarity.build_head(job)
    loop = {"scores": torch.zeros(job["images"], len(job["lengths"]))}
    batched = {"scores": loop["scores"].clone()}
    batched["scores"][3, 5] = 1e-3
    comparison = bench_similarity.compare_with_loop(job, batched, loop, head)
    assert comparison["pairs_beyond_tolerance"] == 1 and not comparison["within_tolerance"]
    (pair,) = comparison["beyond_tolerance_pairs"]
    assert (pair["image"], pair["caption"]) == (3, 5) and pair["selection_gap"] > 0
    # random inputs have no exact tie at the top-K boundary here, so the difference stays an error
    assert pair["selection_gap"] >= bench_similarity.NEAR_TIE
    assert not comparison["agrees_with_loop"]


@pytest.mark.slow
def test_two_stage_benchmark_runs_and_its_reranked_scores_are_exact(tmp_path, one_thread, synthetic_dir):
    import datasets

    from helpers import TINY_TOWERS
    from modeling_scta import SCTAModel
    from processing_scta import SCTAProcessor
    from scta_train.models import tower_config_from_spec
    from scta_train.processing import train_wordpiece_tokenizer

    captions = [c for row in datasets.load_from_disk(synthetic_dir)["train"]["captions"] for c in row]
    processor = SCTAProcessor.from_tokenizer(train_wordpiece_tokenizer(captions, vocab_size=300), image_size=32)
    torch.manual_seed(0)
    text_config = tower_config_from_spec({**TINY_TOWERS["text_config"], "vocab_size": len(processor.tokenizer)}, "text")
    config = bench_two_stage.SCTAModel.config_class.from_vision_text_configs(
        tower_config_from_spec(TINY_TOWERS["vision_config"], "vision"), text_config, embed_size=32, fusion_weight=1.0
    )
    model_dir = tmp_path / "model"
    model = SCTAModel(config)
    with torch.no_grad():
        model.first_stage.text_map.weight.add_(0.3 * torch.randn(32, 32))  # an adapter unlike the plain cosine
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    path = tmp_path / "two_stage.json"
    argv = [
        "--models",
        str(model_dir),
        "--dataset-dir",
        synthetic_dir,
        "--ks",
        "4",
        "80",
        "--scale",
        "--quick",
        "--json",
        str(path),
        *one_thread,
    ]
    results = bench_two_stage.main(argv)
    (summary,) = results["models"]
    assert summary["images"] == 16 and summary["captions"] == 80
    rows = {(row["stage"], row["ranking"], row["k"]): row for row in summary["rows"]}
    expected = {
        (stage, ranking, k) for stage in ("adapter", "global") for ranking in ("head", "fused") for k in (4, 80)
    }
    assert set(rows) == expected
    for row in summary["rows"]:
        assert row["max_abs_diff_vs_exhaustive"] <= 1e-5
        assert 0 <= row["candidate_recall_t2i"] <= 100 and row["head_pairs"] <= 16 * 80
    # k = 80 covers the corpus: the exhaustive ranking of the same score, whatever the first stage
    exhaustive = {row["ranking"]: row for row in summary["exhaustive"]}
    for stage in ("adapter", "global"):
        for ranking in ("head", "fused"):
            assert rows[(stage, ranking, 80)]["r1_i2t"] == pytest.approx(exhaustive[ranking]["r1_i2t"])
            assert rows[(stage, ranking, 80)]["rsum"] == pytest.approx(exhaustive[ranking]["rsum"])
    assert rows[("adapter", "fused", 4)]["head_pairs"] < rows[("adapter", "fused", 80)]["head_pairs"] == 16 * 80
    assert results["summary"]["exhaustive"]["head"]["rsum"] == pytest.approx(exhaustive["head"]["rsum"])
    latency = results["scale"]["latency"]
    assert {row["gallery"] for row in latency} == {1000, 5000}
    assert all(row["two_stage_s"] > 0 and row["exhaustive_s"] > 0 for row in latency)
    assert json.loads(path.read_text())["models"][0]["exhaustive"][0]["head_pairs"] == 16 * 80


def test_full_size_evaluation_benchmark_runs_at_tiny_shapes(tmp_path, one_thread):
    import bench_full_size_eval

    results = bench_full_size_eval.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "f.json"), *one_thread])
    (size,) = results["sizes"]
    assert (size["images"], size["captions"]) == (20, 100) and size["exhaustive_measured"]
    assert [row["k"] for row in size["two_stage"]] == [4]
    assert all(0 < row["head_pairs"] <= 20 * 100 and row["scoring_s"] > 0 for row in size["two_stage"])


@pytest.mark.slow
def test_search_benchmark_runs_at_tiny_shapes(tmp_path, one_thread):
    import socket

    import bench_search

    from helpers import save_search_model

    save_search_model(tmp_path / "model")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "search.json"
    arguments = ["--model", str(tmp_path / "model"), "--images", "12", "--gallery-sizes", "12", "30"]
    arguments += ["--exhaustive-max", "12", "--queries", "2", "--skip-paper-shapes", "--cold-repeats", "1"]
    bench_search.main([*arguments, "--port", str(port), "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["files"]["images"] == 12 and results["files"]["bytes_per_image"] > 17 * 24 * 2
    assert 0 < results["files"]["reindex_fraction_of_first"]
    sizes = [row["gallery"] for row in results["latency"]]
    assert sizes == [12, 30] and "exhaustive_seconds" in results["latency"][0]
    assert results["latency"][1]["exhaustive_seconds_projected"] > 0
    cold = results["cold_start"]
    assert 0 < cold["help_seconds"] and 0 < cold["import_torch_seconds"] < cold["text_query_seconds"]
    assert results["server"]["queries_per_second_4_clients"] > 0 and results["server"]["http_query_seconds"] > 0


def test_selection_ties_flag_pairs_whose_kept_patches_rounding_may_change():
    """The cross-check explains the trained model's few differing pairs by ties in patch selection: flagged when
    the K-th and (K+1)-th selection scores coincide, not otherwise."""
    import crosscheck_published

    head = crosscheck_published.make_head(crosscheck_published.SHAPES["demo"], word_aggregation=True, seed=0).eval()
    torch.manual_seed(0)
    images = torch.randn(3, 1 + head.num_patches, 128)
    images[1, 1:] = images[1, 1]  # every patch of image 1 the same: all its selection scores are equal
    text = torch.randn(5, 9, 128)
    with torch.no_grad():
        captions = head.caption_key_tokens(text, torch.ones(5, 9, dtype=torch.long))
        ties = crosscheck_published.selection_ties(head, images, captions, chunk=2)
    assert ties.shape == (3, 5)
    assert ties[1].all() and not ties[[0, 2]].any()


@requires_published_code
def test_the_head_and_loss_equal_the_published_codes():
    """SCTA and LAPS modes score exactly as the published heads with the same weights (float64: to rounding), at
    the paper's and the demo's shapes; the loss equals the published ContrastiveLoss."""
    import crosscheck_published

    results = crosscheck_published.main(
        ["--scta_dir", PUBLISHED_CODE["SCTA"], "--laps_dir", PUBLISHED_CODE["LAPS"], "--images", "5", "--captions", "7"]
    )
    exact = [row for row in results["scores"] if "random" not in row["mode"]]
    assert {(row["mode"], row["shapes"], row["dtype"]) for row in exact} == {
        (mode, shapes, dtype)
        for mode in ("SCTA", "LAPS")
        for shapes in ("paper", "demo")
        for dtype in ("float64", "float32")
    }
    for row in exact:
        assert row["max_abs_diff"] < (1e-12 if row["dtype"] == "float64" else 1e-5), row
    # the published random caption layer is what makes the published scores differ
    assert all(row["max_abs_diff"] > 1e-3 for row in results["scores"] if "random" in row["mode"])
    assert all(row["abs_diff"] < 1e-9 for row in results["loss"])
