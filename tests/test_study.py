"""The study features of run_retrieval.py: the global baseline end to end, results that carry their seed and their
aggregation over seeds, mixed tower sources, the extended-metrics hook and its COCO-only refusal, studies/ablation.py."""

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys

import datasets
import pytest
import torch
import transformers

import scta_train.checks
import scta_train.pipeline
from helpers import REPO, TINY_TOWERS, run_main, tiny_run_config, write_config
from modeling_scta import SCTAModel
from scta_train import aggregate
from scta_train.arguments import ModelArguments
from scta_train.models import build_model, build_processor
from scta_train.processing import train_wordpiece_tokenizer
from scta_train.results import aggregate_runs, render_aggregate_table


def run(tmp_path, config: dict, name: str = "run.json"):
    return run_main([write_config(tmp_path / name, config)])


def short(synthetic_dir, output_dir, **overrides):
    settings = dict(max_steps=3, do_eval=False, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    return tiny_run_config(synthetic_dir, str(output_dir), **{**settings, **overrides})


def test_the_global_baseline_trains_and_evaluates_by_one_setting(tmp_path, synthetic_dir):
    results = run(tmp_path, short(synthetic_dir, tmp_path / "global", scoring_head="global", max_steps=6))
    saved = json.loads((tmp_path / "global" / "config.json").read_text())
    assert saved["scoring_head"] == "global"
    assert results["test_head_pairs"] == 16 * 80 and results["seed"] == 7
    assert "scoring_head=global" in (tmp_path / "global" / "README.md").read_text()
    # the key-token head's second stage makes no sense for it: refused, not silently skipped
    evaluate = {
        "model_name_or_path": str(tmp_path / "global"),
        "dataset_dir": synthetic_dir,
        "do_train": False,
        "do_predict": True,
        "rerank_top_k": 4,
        "output_dir": str(tmp_path / "again"),
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
    }
    with pytest.raises(ValueError, match="scoring_head='global'.*--rerank_top_k 0"):
        run(tmp_path, evaluate, "again.json")


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, synthetic_dir):
    root = tmp_path_factory.mktemp("seeds")
    folders = []
    for seed in (1, 2, 3):
        folder = root / f"seed{seed}"
        run_main([write_config(root / f"seed{seed}.json", short(synthetic_dir, folder, seed=seed))])
        folders.append(folder)
    return folders


@pytest.mark.slow
def test_results_carry_the_seed_and_aggregate_to_mean_and_deviation(seed_runs):
    values = []
    for seed, folder in zip((1, 2, 3), seed_runs):
        results = json.loads((folder / "all_results.json").read_text())
        assert results["seed"] == seed
        assert json.loads((folder / "test_results.json").read_text())["seed"] == seed
        values.append(results["test_r1_t2i"])
    aggregated = aggregate_runs(seed_runs)
    assert aggregated["r1_t2i"]["values"] == values and aggregated["r1_t2i"]["seeds"] == [1, 2, 3]
    assert aggregated["r1_t2i"]["mean"] == pytest.approx(statistics.fmean(values))
    assert aggregated["r1_t2i"]["std"] == pytest.approx(statistics.stdev(values))
    table = render_aggregate_table({"tiny": aggregated})
    mean, std = aggregated["rsum"]["mean"], aggregated["rsum"]["std"]
    assert "| tiny |" in table and f"{mean:.1f} ± {std:.1f} | 3 |" in table


def test_the_aggregate_command_prints_groups_and_refuses_repeated_seeds(seed_runs, tmp_path, capsys):
    table = aggregate.main(
        [
            "--group",
            "first two",
            *map(str, seed_runs[:2]),
            "--group",
            "all",
            *map(str, seed_runs),
            "--format",
            "text",
            "--json",
            str(tmp_path / "agg.json"),
        ]
    )
    lines = table.splitlines()
    assert lines[0].startswith("runs") and "I2T R@1" in lines[0] and lines[1].startswith("first two")
    assert json.loads((tmp_path / "agg.json").read_text())["all"]["rsum"]["n"] == 3
    with pytest.raises(SystemExit):
        aggregate.main([str(seed_runs[0]), str(seed_runs[0])])
    assert "given more than once would count twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aggregate.main([str(tmp_path)])
    assert "not a finished run_retrieval.py output folder" in capsys.readouterr().err


def test_one_tower_pretrained_and_the_other_from_scratch(tmp_path, synthetic_dir):
    tokenizer = train_wordpiece_tokenizer(["a big red circle on the left", "a small blue square at the top"], 120)
    text_folder = tmp_path / "bert"
    bert_config = transformers.BertConfig(
        vocab_size=len(tokenizer), **{k: v for k, v in TINY_TOWERS["text_config"].items() if k != "model_type"}
    )
    torch.manual_seed(3)
    pretrained = transformers.BertModel(bert_config, add_pooling_layer=False)
    pretrained.save_pretrained(text_folder)
    tokenizer.save_pretrained(text_folder)
    model_args = ModelArguments(
        vision_config=TINY_TOWERS["vision_config"], text_model_name_or_path=str(text_folder), embed_size=32
    )
    dataset = datasets.load_from_disk(synthetic_dir)
    processor = build_processor(model_args, dataset, "train")
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()  # the text tower's own tokenizer
    model = build_model(model_args, processor)
    for name, weight in pretrained.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], weight), name
    assert model.config.vision_config.image_size == 32
    # a tower built outside the model keeps its attention implementation, so the saved model scores the same
    model.save_pretrained(tmp_path / "saved")
    reloaded = SCTAModel.from_pretrained(tmp_path / "saved").eval()
    pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.randint(5, len(tokenizer), (3, 6))
    with torch.no_grad():
        expected = model.eval()(pixel_values=pixel_values, input_ids=input_ids).logits_per_image
        torch.testing.assert_close(reloaded(pixel_values=pixel_values, input_ids=input_ids).logits_per_image, expected)
    with pytest.raises(ValueError, match="the text tower has --text_model_name_or_path and --text_config"):
        ModelArguments(
            vision_config=TINY_TOWERS["vision_config"],
            text_config=TINY_TOWERS["text_config"],
            text_model_name_or_path=str(text_folder),
        )
    with pytest.raises(ValueError, match="the vision tower has neither"):
        ModelArguments(text_model_name_or_path=str(text_folder))


def test_extra_metrics_reach_the_results_and_the_card(tmp_path, synthetic_dir, monkeypatch):
    calls = []

    def fake_extended(pm_dir):
        def compute(image_to_text, text_to_image, caption_to_image, split):
            calls.append((tuple(image_to_text.shape), len(split)))
            return {"eccv_r1_i2t": 12.5, "eccv_r1_t2i": 25.0}

        return compute

    monkeypatch.setattr(scta_train.pipeline, "coco_metrics_hook", fake_extended)
    monkeypatch.setattr(scta_train.checks, "coco_5k_caption_ids", lambda *args: None)  # accept the synthetic test split
    monkeypatch.setattr(scta_train.checks, "load_eccv_metrics", lambda *args: None)
    results = run(tmp_path, short(synthetic_dir, tmp_path / "out", coco_extended_metrics=True))
    assert calls == [((16, 80), 16)]  # the test split only
    assert results["test_eccv_r1_i2t"] == 12.5
    assert json.loads((tmp_path / "out" / "test_results.json").read_text())["test_eccv_r1_t2i"] == 25.0
    assert "| ECCV Caption R@1 | 12.5 | 25.0 |" in (tmp_path / "out" / "README.md").read_text()


def test_extended_coco_metrics_on_another_split_fail_before_training(tmp_path, synthetic_dir):
    pytest.importorskip("eccv_caption")
    with pytest.raises(ValueError, match="the test split has 80 captions of 16 images; the COCO 5K test has 25000"):
        run(tmp_path, short(synthetic_dir, tmp_path / "out", coco_extended_metrics=True))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_the_ablation_study_runs_resumes_and_reports(tmp_path, synthetic_dir):
    pytest.importorskip("matplotlib")
    tiny = {
        **TINY_TOWERS,
        "embed_size": 32,
        "vocab_size": 400,
        "max_steps": 4,
        "warmup_steps": 1,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "synthetic_train_images": 48,
        "synthetic_dev_images": 8,
        "synthetic_test_images": 8,
        "synthetic_image_size": 32,
        "cache_dir": str(tmp_path / "cache"),
        "use_cpu": True,
        "dataloader_num_workers": 0,
    }
    command = [
        sys.executable,
        "studies/ablation.py",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--work_dir",
        str(tmp_path / "work"),
        "--output",
        str(tmp_path / "report"),
        "--methods",
        "global_infonce",
        "laps",
        "--datasets",
        "default",
        "--seeds",
        "0",
        "1",
        "--jobs",
        "2",
    ]
    for key, value in tiny.items():
        command += ["--override", key, json.dumps(value)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "ablation.json").read_text())
    chosen = report["protocol"]["chosen"]
    assert set(chosen) == {"global_infonce", "laps"}
    runs = sorted(p.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").glob("*/*/*") if p.is_dir())
    key = "-" + hashlib.sha256(json.dumps(tiny, sort_keys=True).encode()).hexdigest()[:8]  # runs keyed by the overrides
    for method in ("global_infonce", "laps"):
        grid = sorted(float(lr) for lr in report["protocol"]["tuning_dev_rsum"][method])
        assert {0.0005, 0.001, 0.002} <= set(grid) and len(grid) <= 5
        # the chosen rate is inside the grid, unless the grid could not be extended further
        assert grid[0] < chosen[method] < grid[-1] or len(grid) == 5
        expected = [f"default/{method}/lr{lr:g}-seed0{key}" for lr in grid]
        expected.append(f"default/{method}/lr{chosen[method]:g}-seed1{key}")
        assert [run for run in runs if f"/{method}/" in run] == sorted(expected)
    config = json.loads((tmp_path / "runs" / "default" / "global_infonce" / f"lr0.001-seed0{key}.json").read_text())
    assert config["training_loss"] == "infonce" and config["scoring_head"] == "global"
    assert "Tuning: dev rsum" in (tmp_path / "report" / "ablation.md").read_text()
    assert report["protocol"]["overrides"] == tiny
    assert "Settings changed from the protocol" in (tmp_path / "report" / "ablation.md").read_text()
    group = report["groups"]["default / global dual encoder, InfoNCE"]
    assert group["rsum"]["n"] == 2 and group["rsum"]["seeds"] == [0, 1]
    assert (tmp_path / "report" / "ablation_recall.png").stat().st_size > 10_000
    assert "± " in (tmp_path / "report" / "ablation.md").read_text()
    # every finished run in the report's table, each at its own rate and seed
    every_run = report["runs"]
    assert len(every_run) == len(runs) and {row["budget"] for row in every_run} == {1}
    assert sorted((row["method"], row["learning_rate"], row["seed"]) for row in every_run) == sorted(
        (run.split("/")[1], float(run.split("/")[2][2:].partition("-seed")[0]), int(run.split("-seed")[1][0]))
        for run in runs
    )
    assert "Every finished run" in (tmp_path / "report" / "ablation.md").read_text()
    # the trainings wrote into --work_dir; a run folder holds its record only, and its config beside it
    for run in runs:
        assert sorted(p.name for p in (tmp_path / "runs" / run).iterdir()) == ["all_results.json", "trainer_state.json"]
        assert (tmp_path / "work" / run / "model.safetensors").is_file()
        recorded = json.loads((tmp_path / "runs" / f"{run}.json").read_text())
        assert recorded["output_dir"] == str(tmp_path / "work" / run)  # outside the repository: kept absolute
    # resumable from the records alone, on a machine without the trainings: a second call trains nothing
    shutil.rmtree(tmp_path / "work")
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and " start " not in second.stderr
    assert json.loads((tmp_path / "report" / "ablation.json").read_text())["groups"] == report["groups"]


def test_a_training_finished_before_its_record_was_kept_is_recorded_not_trained_again(tmp_path, monkeypatch):
    study = study_main()
    runs, work = tmp_path / "runs", tmp_path / "work"
    output = study.run_dir(work, "scta", "default", 5e-4, 0)
    fake_study_run(output, 0, [300.0, 400.0], 450.0)
    config = study.run_config("scta", "default", 5e-4, 0, study.REPO / "outputs" / "x", None)
    (output.parent / f"{output.name}.json").write_text(json.dumps(config))
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: pytest.fail("a finished training ran again"))
    folder = study.train(("scta", "default", 5e-4, 0), runs, 1, None, work)
    assert folder == study.run_dir(runs, "scta", "default", 5e-4, 0) and study.is_finished(folder)
    assert study.dev_curve(folder) == [(400, 300.0), (800, 400.0)]
    assert not list(runs.rglob("*.partial"))
    # a path inside the repository is recorded relative to it, so that records read the same on any machine
    assert json.loads((runs / "default" / "scta" / "lr0.0005-seed0.json").read_text())["output_dir"] == "outputs/x"
    # a record whose results were never written (a killed copy) is not a finished run
    (folder / "all_results.json").unlink()
    assert not study.is_finished(folder)


def test_the_tuning_grid_grows_past_an_edge_and_stops():
    study = study_main()
    assert study.grid_extension({5e-4: 10.0, 1e-3: 20.0}) is None  # the base grid is not finished yet
    assert study.grid_extension({5e-4: 10.0, 1e-3: 30.0, 2e-3: 20.0}) is None  # interior
    assert study.grid_extension({5e-4: 40.0, 1e-3: 30.0, 2e-3: 20.0}) == 2.5e-4
    assert study.grid_extension({5e-4: 10.0, 1e-3: 30.0, 2e-3: 50.0}) == 4e-3
    assert study.grid_extension({5e-4: 1, 1e-3: 2, 2e-3: 3, 4e-3: 4, 8e-3: 5}) is None  # extended twice: no more


def fake_study_run(folder, seed, dev_curve, test_rsum):
    """A finished study run: its results and its dev curve (trainer_state.json), as run_retrieval.py writes them."""
    folder.mkdir(parents=True)
    results = {"seed": seed, "eval_rsum": dev_curve[-1], "test_rsum": test_rsum}
    results.update({f"test_{name}": test_rsum / 6 for name in ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i")})
    results["test_r10_t2i"] = test_rsum / 6
    results.update(train_runtime=100.0, test_runtime=10.0)
    (folder / "all_results.json").write_text(json.dumps(results))
    history = [{"step": 400 * (i + 1), "eval_head_only_rsum": rsum} for i, rsum in enumerate(dev_curve)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_a_run_still_rising_at_its_end_is_trained_again_longer_and_reported_beside(tmp_path, caplog):
    study = study_main()
    runs = tmp_path / "runs"
    demo = json.loads(study.BASE_CONFIG.read_text())
    longer = study.longer_overrides()
    # the whole schedule stretched: steps, warm-up, the hardest-negative switch and the learning-rate step
    assert longer["max_steps"] == 2 * demo["max_steps"] and longer["warmup_steps"] == 2 * demo["warmup_steps"]
    assert longer["lr_decay_epochs"] == [2 * epoch for epoch in demo["lr_decay_epochs"]]
    assert longer["vse_mean_warmup_epochs"] == 2 * demo["vse_mean_warmup_epochs"]
    assert "embedding_warmup_epochs" not in longer  # None in the demo: nothing to stretch
    assert study.longer_overrides({"max_steps": 10, "seed": 3}) == {**longer, "max_steps": 20, "seed": 3}
    assert study.overrides_key(longer) != ""  # longer runs never share the tuned runs' folders

    fake_study_run(study.run_dir(runs, "laps", "default", 5e-4, 0), 0, [300.0, 340.0, 358.0], 280.0)  # rising
    fake_study_run(study.run_dir(runs, "scta", "default", 1e-3, 0), 0, [500.0, 506.0, 506.5], 480.0)  # flat
    chosen = {"laps": 5e-4, "scta": 1e-3}
    assert study.longer_jobs(runs, chosen) == [("laps", "default", 5e-4, 0, longer)]
    assert study.longer_budget_rows(runs, chosen) == []  # not trained yet

    fake_study_run(study.run_dir(runs, "laps", "default", 5e-4, 0, longer), 0, [300.0, 380.0, 400.0, 401.0], 320.0)
    (row,) = study.longer_budget_rows(runs, chosen)
    assert row["method"] == "laps" and row["base"]["steps"] == 1200 and row["longer"]["steps"] == 1600
    assert row["base"]["still_rising"] and not row["longer"]["still_rising"]
    assert (row["base"]["rsum"], row["longer"]["rsum"]) == (280.0, 320.0)
    study.report(runs, ["scta", "laps"], ["default"], [0], tmp_path / "report")
    text = (tmp_path / "report" / "ablation.md").read_text()
    assert "Longer budget (2x the schedule" in text and "300.0 → 380.0 → 400.0 → 401.0" in text
    assert json.loads((tmp_path / "report" / "ablation.json").read_text())["longer_budget"][0]["longer"]["rsum"] == 320
    assert (tmp_path / "report" / "ablation_dev_curves.png").stat().st_size > 10_000


def test_the_small_objects_set_changes_the_images_and_the_tower_together(tmp_path):
    study = study_main()
    config = study.run_config("scta", "small_objects", 1e-3, 0, tmp_path, {"vision_config": {"model_type": "vit"}})
    assert config["synthetic_image_size"] == config["vision_config"]["image_size"] == 128
    assert config["synthetic_object_scale"] == 0.5 and config["vision_config"]["model_type"] == "vit"
    demo = json.loads((study.BASE_CONFIG).read_text())
    assert study.run_config("laps", "none", 1e-3, 0, tmp_path)["vision_config"] == demo["vision_config"]


def test_each_method_trains_with_its_own_loss_whatever_the_demo_config_says(tmp_path):
    study = study_main()
    losses = {
        method: study.run_config(method, "default", 1e-3, 0, tmp_path)["training_loss"] for method in study.METHODS
    }
    assert losses == {
        "scta": "hinge",
        "laps": "hinge",
        "scta_image_selection": "hinge",
        "global": "hinge",
        "global_infonce": "infonce",
        "laps_infonce": "infonce",
    }
    assert study.run_config("scta_minilm", "default", 1e-3, 0, tmp_path)["training_loss"] == "hinge"


def study_main():
    spec = importlib.util.spec_from_file_location("ablation_study", os.path.join(REPO, "studies", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--jobs", "0"], "--jobs: must be >= 1"),
        (["--override", "max_steps", "many"], "the value must be JSON"),
        (["--override", "max_stepz", "2"], "not a setting of run_retrieval.py"),
        (["--datasets", "default", "extreme"], "--datasets extreme: not a synthetic set of the study"),
        (["--methods", "clip"], "unknown methods"),
    ],
)
def test_the_study_checks_its_arguments_before_training(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        study_main().main(["--runs_dir", str(tmp_path / "runs"), "--output", str(tmp_path / "report"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_report_of_no_runs_is_refused_and_the_default_output_is_not_the_committed_report(tmp_path):
    study = study_main()
    with pytest.raises(SystemExit, match="no finished runs"):
        study.main(["--report-only", "--runs_dir", str(tmp_path / "empty"), "--output", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()
    parser_default = study.REPO / "outputs" / "ablation" / "report"
    assert "outputs/ablation/report" in study.__doc__ and parser_default.parts[-3:] == ("outputs", "ablation", "report")


def test_aggregation_refuses_unseeded_runs_mixed_settings_repeated_labels_and_broken_results(
    seed_runs, tmp_path, capsys
):
    copy = tmp_path / "copy"
    shutil.copytree(seed_runs[0], copy)
    with pytest.raises(ValueError, match="same seed \\[1\\] would count twice"):
        aggregate_runs([seed_runs[0], copy])
    with pytest.raises(ValueError, match="given more than once"):
        aggregate_runs([seed_runs[0], seed_runs[0]])
    results = json.loads((copy / "all_results.json").read_text())
    (copy / "all_results.json").write_text(
        json.dumps(
            {
                **results,
                "seed": 9,
                "setting": {**results["setting"], "head": {**results["setting"]["head"], "word_aggregation": False}},
            }
        )
    )
    with pytest.raises(ValueError, match="different settings \\(head.word_aggregation: True vs False\\)"):
        aggregate_runs([seed_runs[0], copy])
    assert aggregate_runs([seed_runs[0], copy], allow_mixed_settings=True)["rsum"]["n"] == 2
    (copy / "all_results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "seed"}))
    with pytest.raises(ValueError, match="has no seed in its results"):
        aggregate_runs([seed_runs[1], copy])
    (copy / "all_results.json").write_text("{broken")
    with pytest.raises(SystemExit):
        aggregate.main([str(copy)])
    assert "is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aggregate.main(["--group", "a", str(seed_runs[0]), "--group", "a", str(seed_runs[1])])
    assert "--group a is given twice" in capsys.readouterr().err


def test_the_laps_gap_study_classifies_every_caption_token():
    """studies/laps_gap.py splits a caption into special tokens, the words that describe objects (colour, shape,
    size, position) and everything else (fillers, joiners), a word piece with its whole word."""
    spec = importlib.util.spec_from_file_location("laps_gap", os.path.join(REPO, "studies", "laps_gap.py"))
    laps_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(laps_gap)
    captions = ["in this picture we can see a small red circle in the top left corner, which looks quite nice"]
    tokenizer = train_wordpiece_tokenizer(captions + ["a big triangle"], vocab_size=120)
    ids = tokenizer(captions[0])["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    classes = laps_gap.token_classes(tokenizer, ids)
    assert classes[0] == classes[-1] == "special"
    words = {}
    for token, kind in zip(tokens[1:-1], classes[1:-1]):
        words.setdefault(kind, []).append(token)
    assert "".join(words["content"]).replace("##", "") == "smallredcircletopleftcorner"
    assert {"in", "this", "we", ",", "which"} <= {t for t in words["filler"]}
