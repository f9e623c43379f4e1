"""Mean ± standard deviation of the results of several `run_retrieval.py` runs (e.g. one per seed).

    python -m scta_train.aggregate outputs/f30k-seed0 outputs/f30k-seed1 outputs/f30k-seed2
    python -m scta_train.aggregate --group SCTA out/scta-s* --group LAPS out/laps-s* --prefix test --format text

Each run folder's `all_results.json` carries its seed and its setting (data and head settings); a group that repeats
a folder or a seed, holds a run without a seed, or mixes settings is refused (pass --allow_mixed_settings to mix on
purpose); so is a repeated --group label. The table is rendered by `scta_train.results`, as the model card's; `--json` also writes the numbers.
"""

import argparse
import json
import sys
from pathlib import Path

from scta_train.results import aggregate_runs, render_aggregate_table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders forming one group")
    parser.add_argument(
        "--group",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "RUN"),
        help="a labelled group: its label, then its run folders (repeatable)",
    )
    parser.add_argument("--prefix", default="test", help="which evaluation: 'test' (default) or 'eval' (dev)")
    parser.add_argument("--format", choices=("markdown", "text"), default="markdown")
    parser.add_argument("--json", type=Path, help="also write the means, deviations and per-seed values here")
    parser.add_argument("--allow_mixed_settings", action="store_true", help="average runs of different settings")
    args = parser.parse_args(argv)
    groups = {}
    if args.runs:
        groups[f"{len(args.runs)} runs"] = args.runs
    for label, *runs in args.group:
        if not runs:
            parser.error(f"--group {label} has no run folders")
        if label in groups:
            parser.error(f"--group {label} is given twice: each group needs its own label")
        groups[label] = [Path(run) for run in runs]
    if not groups:
        parser.error("give run folders, or --group LABEL RUN [RUN ...]")
    try:
        aggregates = {
            label: aggregate_runs(runs, prefix=args.prefix, allow_mixed_settings=args.allow_mixed_settings)
            for label, runs in groups.items()
        }
    except (FileNotFoundError, KeyError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    table = render_aggregate_table(aggregates, prefix=args.prefix, markdown=args.format == "markdown")
    print(table)
    if args.json:
        args.json.write_text(json.dumps(aggregates, indent=2), encoding="utf-8")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
