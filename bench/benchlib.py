"""Helpers shared by the benchmarks: the machine, Flickr30K caption lengths, timing, peak memory, isolation.

Peak memory is measured honestly rather than read off a process-lifetime counter:
- CPU: the peak resident set (`VmHWM` in `/proc/self/status`) is reset to the current resident set just before the
  measured calls (writing "5" to `/proc/self/clear_refs`, Linux >= 4.0) and read after them. Each measurement runs in
  a fresh process by default (`run_isolated`), so memory that an earlier measurement freed but the allocator kept
  cannot hide a later one's growth. Where `/proc` cannot be reset, `ru_maxrss` (lifetime peak) is reported and
  labelled so.
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
"""

import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]

# The token-count histogram of the 5,000 real Flickr30K test captions, shipped with the benchmarks (docs/METHOD.md
# "Data"); --captions-file draws from another one-caption-a-line file instead.
CAPTION_LENGTHS_FILE = Path(__file__).resolve().parent / "f30k_test_caption_lengths.json"
# docs/METHOD.md recipe: "at most 90 tokens kept per caption" at evaluation.
EVAL_MAX_CAPTION_TOKENS = 90

logger = logging.getLogger("bench")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def caption_token_counts(path: str | os.PathLike | None = None, max_tokens: int = EVAL_MAX_CAPTION_TOKENS) -> list[int]:
    """
    Token count of every caption: words + 2 ([CLS] and [SEP]), at most `max_tokens`. Without `path`, the shipped
    Flickr30K test histogram (`CAPTION_LENGTHS_FILE`), in increasing order; with it, a one-caption-a-line file.

    Whitespace words approximate BERT word pieces without needing the vocabulary (the Flickr30K test captions
    have 13.5 words on average, counting the final '.'; word pieces would be slightly more).
    """
    if path is None:
        histogram = json.loads(CAPTION_LENGTHS_FILE.read_text(encoding="utf-8"))["token_counts"]
        return [min(int(count), max_tokens) for count, captions in histogram.items() for _ in range(captions)]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"caption file {path} not found. Pass --captions-file PATH to a one-caption-a-line file, or leave it out "
            f"to draw from the shipped Flickr30K test histogram ({CAPTION_LENGTHS_FILE.name})."
        )
    counts = [min(len(line.split()) + 2, max_tokens) for line in path.read_text(encoding="utf-8").splitlines()]
    counts = [count for count in counts if count > 2]
    if not counts:
        raise ValueError(f"caption file {path} has no non-empty captions.")
    return counts


def draw_lengths(pool: list[int], count: int, seed: int) -> list[int]:
    """`count` caption token counts drawn with replacement from `pool`, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(pool), (count,), generator=generator)
    return [pool[i] for i in index.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", output, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector extensions that matter for fp32 / bf16 matrix products."""
    try:
        flags = set(re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        return []
    return sorted(flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if flag in flags)


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on, including how busy the machine was (load average) when they were."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


# ----------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of `repeats` calls of `fn()`, each ended by a device synchronisation."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def timed(fn, repeats: int, device: torch.device):
    """(the last call's result, median wall seconds of `repeats` calls of `fn()`), as `time_calls` times them."""
    last = []
    seconds = time_calls(lambda: last.__setitem__(slice(None), [fn()]), repeats, device)
    return last[0], statistics.median(seconds)


def summarize_seconds(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "all_s": seconds}


def matmul_peak_gflops(
    device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 3
) -> float:
    """Best GFLOP/s of a plain `size`^3 `torch.matmul` (2 size^3 FLOPs) after one warm-up: the reference peak."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.matmul(a, b)
    best = min(time_calls(lambda: torch.matmul(a, b), repeats, device))
    return 2 * size**3 / best / 1e9


# ----------------------------------------------------------------------------------------------------------------
# Memory


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """
    Peak memory of the code inside the `with` block.

    Attributes after the block (MiB): `start_rss_mb` resident set when entered, `peak_rss_mb` peak resident set
    inside, `growth_rss_mb` their difference, `rss_method` how the peak was read; on CUDA `cuda_start_mb`,
    `cuda_peak_mb` (max allocated) and `cuda_growth_mb`.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.rss_method = "VmHWM reset via /proc/self/clear_refs"
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.rss_method = "ru_maxrss (process-lifetime peak: an upper bound)"
        self.start_rss_mb = (_status_kib("VmRSS") or 0) / 1024
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start_mb = torch.cuda.memory_allocated(self.device) / 2**20
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        peak_kib = _status_kib("VmHWM") if self.rss_method.startswith("VmHWM") else None
        if peak_kib is None:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_rss_mb = peak_kib / 1024
        self.growth_rss_mb = self.peak_rss_mb - self.start_rss_mb
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.cuda_growth_mb = self.cuda_peak_mb - self.cuda_start_mb
        return False

    def as_dict(self) -> dict:
        names = [
            "start_rss_mb",
            "peak_rss_mb",
            "growth_rss_mb",
            "rss_method",
            "cuda_start_mb",
            "cuda_peak_mb",
            "cuda_growth_mb",
        ]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}


# ----------------------------------------------------------------------------------------------------------------
# Isolation


def run_isolated(fn, *args, isolate: bool = True):
    """
    `fn(*args)` in a fresh Python process (spawned, so nothing is inherited from this one's heap) and its result.
    `fn` must be a module-level function and its arguments and result picklable. `isolate=False` calls it here.
    """
    if not isolate:
        return fn(*args)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Output


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain text table; `columns` are (header, key, format spec) and a missing value prints as '-'."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, spec) if spec else str(value)

    cells = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (header, _, _) in enumerate(columns)]
    lines = ["  ".join(header.rjust(width) for (header, _, _), width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2, default=str)
    logger.info("wrote %s", path)
