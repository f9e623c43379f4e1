"""Retrieval results as tables: one run's metrics (the log and the model card) and mean ± std over runs of several
seeds (`python -m scta_train.aggregate`), rendered by one function."""

import json
import os
import statistics
from pathlib import Path


RECALL_COLUMNS = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "rsum")
COLUMN_TITLES = {
    "r1_i2t": "I2T R@1",
    "r5_i2t": "I2T R@5",
    "r10_i2t": "I2T R@10",
    "r1_t2i": "T2I R@1",
    "r5_t2i": "T2I R@5",
    "r10_t2i": "T2I R@10",
    "rsum": "rsum",
}


def render_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A markdown table, or a plain-text one with aligned columns (the first left-aligned, the others right)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header)] + [line(row) for row in rows])


def format_value(value) -> str:
    """`57.2` for a number, `57.2 ± 1.3` for an aggregate `{"mean", "std"}` (no std for a single run)."""
    if isinstance(value, dict):
        if value.get("n", 0) < 2 or value["std"] is None:
            return f"{value['mean']:.1f}"
        return f"{value['mean']:.1f} ± {value['std']:.1f}"
    return f"{value:.1f}"


# The rankings every evaluation reports (SCTATrainer.evaluate), compared in one table.
RANKINGS = (
    ("head only (the paper's protocol)", "head_only"),
    ("first stage alone", "first_stage"),
    ("fused: head + {weight} x first stage", "fused"),
    ("two-stage ({k} head pairs)", "two_stage"),
)

# The extended COCO metrics (scta_train.coco_extended), when a run has them.
EXTENDED_METRICS = (
    ("ECCV Caption mAP@R", "eccv_map_at_r"),
    ("ECCV Caption R-Precision", "eccv_rprecision"),
    ("ECCV Caption R@1", "eccv_r1"),
    ("CxC R@1", "cxc_r1"),
    ("CxC R@5", "cxc_r5"),
    ("CxC R@10", "cxc_r10"),
    ("PMRP", "pmrp"),
)


def recall_rows(metrics: dict, prefix: str, arrow: str = "→") -> list[tuple[str, list[list[str]], float]]:
    """One run's `metrics` (keys `{prefix}_{fold}r1_i2t` ...) as (title, rows of [direction, R@1, R@5, R@10, medr,
    meanr], rsum) for the whole split and, when present, the 5-fold 1K mean."""
    tables = []
    for fold, title in (("", "all images"), ("1k_", "5-fold 1K mean")):
        if f"{prefix}_{fold}r1_i2t" not in metrics:
            continue
        rows = []
        for direction, name in (("i2t", f"image {arrow} text"), ("t2i", f"text {arrow} image")):
            values = [metrics[f"{prefix}_{fold}{stat}_{direction}"] for stat in ("r1", "r5", "r10", "medr", "meanr")]
            rows.append([name] + [format_value(value) for value in values])
        tables.append((title, rows, metrics[f"{prefix}_{fold}rsum"]))
    return tables


def render_run_results(metrics: dict, prefix: str, markdown: bool) -> str:
    """One run's I2T / T2I table(s) with rsum, and the extended COCO metrics when present: the training log
    (`markdown=False`) and the model card (`markdown=True`) both print this."""
    parts = []
    for title, rows, rsum in recall_rows(metrics, prefix, "→" if markdown else "->"):
        table = render_table(["direction", "R@1", "R@5", "R@10", "medr", "meanr"], rows, markdown)
        if markdown:
            parts.append(f"## Results: {prefix} split ({title})\n\n{table}\n\nrsum: {format_value(rsum)}")
        else:
            parts.append(f"{prefix} ({title})\n{table}\nrsum {format_value(rsum)}")
    rankings = [
        [title.format(weight=metrics.get(f"{prefix}_fusion_weight"), k=metrics.get(f"{prefix}_two_stage_head_pairs"))]
        + [format_value(metrics[f"{prefix}_{name}_{column}"]) for column in ("r1_i2t", "r1_t2i", "rsum")]
        for title, name in RANKINGS
        if f"{prefix}_{name}_r1_i2t" in metrics
    ]
    if rankings:
        table = render_table(["ranking", "I2T R@1", "T2I R@1", "rsum"], rankings, markdown)
        parts.append(f"### Rankings: {prefix} split\n\n{table}" if markdown else f"{prefix} rankings\n{table}")
    extended = [
        [title] + [format_value(metrics[f"{prefix}_{name}_{direction}"]) for direction in ("i2t", "t2i")]
        for title, name in EXTENDED_METRICS
        if f"{prefix}_{name}_i2t" in metrics
    ]
    if extended:
        table = render_table(
            [
                "metric",
                "image → text" if markdown else "image -> text",
                "text → image" if markdown else "text -> image",
            ],
            extended,
            markdown,
        )
        parts.append(
            f"## Extended COCO metrics: {prefix} split\n\n{table}"
            if markdown
            else f"{prefix} extended COCO metrics\n{table}"
        )
    return "\n\n".join(parts)


def load_run_results(folder: str | os.PathLike) -> dict:
    """`all_results.json` of a `run_retrieval.py` output folder; a missing or malformed file is an error naming it."""
    path = Path(folder) / "all_results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a finished run_retrieval.py output folder.")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): re-run the evaluation into a new output folder."
        ) from error
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds {type(results).__name__}, not the results object run_retrieval.py writes.")
    return results


def aggregate_runs(folders, prefix: str = "test", names=RECALL_COLUMNS, allow_mixed_settings: bool = False) -> dict:
    """
    Mean and sample standard deviation (ddof 1) of `{prefix}_{name}` over the runs in `folders`:
    `{name: {"mean", "std", "n", "values", "seeds"}}`. Refused: the same folder twice, runs without a seed (one
    training could then count twice), two runs of one seed, and runs of different settings (data or head settings,
    which the results carry) unless `allow_mixed_settings`; a metric missing from a run is an error naming the run.
    """
    folders = [Path(folder) for folder in folders]
    if not folders:
        raise ValueError("aggregate_runs needs at least one run folder.")
    resolved = [folder.resolve() for folder in folders]
    twice = sorted({str(f) for f in resolved if resolved.count(f) > 1})
    if twice:
        raise ValueError(f"run folder(s) given more than once would count twice: {twice}.")
    results = [(folder, load_run_results(folder)) for folder in folders]
    seeds = [result.get("seed") for _, result in results]
    unseeded = [str(folder) for folder, result in results if result.get("seed") is None]
    if unseeded:
        raise ValueError(
            f"{unseeded[0]} has no seed in its results (an evaluation of a model whose training run is "
            "unknown): it cannot be told apart from another evaluation of the same training, which would "
            "count twice. Aggregate runs trained by run_retrieval.py."
        )
    if len(set(seeds)) < len(seeds):
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        raise ValueError(f"runs with the same seed {repeated} would count twice: {[str(f) for f, _ in results]}.")
    settings = {json.dumps(result.get("setting"), sort_keys=True, default=str): folder for folder, result in results}
    if len(settings) > 1 and not allow_mixed_settings:
        (first, a), (second, b) = list(settings.items())[:2]
        difference = describe_difference(json.loads(first), json.loads(second))
        raise ValueError(
            f"{a} and {b} were run in different settings ({difference}): their mean would mix them. Group "
            "them separately (--group), or pass --allow_mixed_settings if that is what you want."
        )
    aggregate = {}
    for name in names:
        key = f"{prefix}_{name}" if prefix else name
        values = []
        for folder, result in results:
            if key not in result:
                raise KeyError(f"{folder} has no {key!r} in all_results.json (was it evaluated with --do_predict?).")
            values.append(float(result[key]))
        aggregate[name] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "values": values,
            "seeds": seeds,
        }
    return aggregate


def describe_difference(first, second, where: str = "") -> str:
    """The first place two settings differ, e.g. `head.word_aggregation: True vs False`."""
    if isinstance(first, dict) and isinstance(second, dict):
        for key in sorted(set(first) | set(second)):
            if first.get(key) != second.get(key):
                return describe_difference(first.get(key), second.get(key), f"{where}.{key}" if where else key)
    return f"{where or 'setting'}: {first!r} vs {second!r}"


def render_aggregate_table(groups: dict, prefix: str = "test", markdown: bool = True, columns=RECALL_COLUMNS) -> str:
    """One row per group of runs (`{label: aggregate_runs(...)}`): mean ± std of each recall column, seed count."""
    header = ["runs"] + [COLUMN_TITLES.get(name, name) for name in columns] + ["seeds"]
    rows = [
        [label] + [format_value(aggregate[name]) for name in columns] + [str(aggregate[columns[0]]["n"])]
        for label, aggregate in groups.items()
    ]
    return render_table(header, rows, markdown)


def format_results(metrics: dict, prefix: str) -> str:
    """The plain-text tables of one run's `metrics` (keys `{prefix}_r1_i2t` ...), as printed to the training log."""
    return render_run_results(metrics, prefix, markdown=False)
