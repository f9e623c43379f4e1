"""Run Python code in a fresh process in which this project is not importable (remote-code checks)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PROJECT_MODULES = ("configuration_scta", "modeling_scta", "processing_scta", "run_retrieval")

# Hides the checkout from the child: the repo's folder on sys.path and the import hook of an editable install
# (`pip install -e .` maps each top-level module to its file in the checkout).
_HIDE_PROJECT = textwrap.dedent(
    f"""
    import importlib, importlib.util, os, sys
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != {str(REPO)!r}]
    sys.meta_path[:] = [
        finder for finder in sys.meta_path
        if "modeling_scta" not in getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", {{}})
    ]
    importlib.invalidate_caches()
    for name in {PROJECT_MODULES!r}:
        assert importlib.util.find_spec(name) is None, f"the project must not be importable here: {{name}}"
    """
)


def run_without_project(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` with `cwd` outside the repo, offline, with a private remote-code module cache; assert success."""
    origin = importlib.util.find_spec("modeling_scta").origin
    if Path(origin).resolve().parent != REPO:
        pytest.skip(f"modeling_scta is installed as a copy ({origin}); a fresh process would import it from there")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", _HIDE_PROJECT + textwrap.dedent(script)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
