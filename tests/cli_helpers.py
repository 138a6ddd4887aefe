"""Running the stock ``anomalib`` command on a synthetic Folder data set (shared by the CLI tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def anomalib_command() -> list[str]:
    """The stock ``anomalib`` command of this environment (or its entry point through this Python)."""
    script = Path(sys.executable).parent / "anomalib"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from anomalib.cli.cli import main; main()"]


def folder_data_arguments(folder: dict[str, str], root: Path) -> list[str]:
    """``--data`` arguments of anomalib's ``Folder`` for a synthetic data set (``folder_kwargs()`` at ``root``)."""
    arguments = ["--data", "anomalib.data.Folder", "--data.root", str(root)]
    for key in ("name", "normal_dir", "abnormal_dir", "normal_test_dir"):
        arguments += [f"--data.{key}", folder[key]]
    return [*arguments, "--data.num_workers", "0"]


def run_anomalib_test(model_arguments: list[str], folder: dict[str, str], root: Path, results: Path) -> str:
    """Run ``anomalib test`` on CPU with this checkout's package; return its output (failing on a non-zero exit)."""
    command = [
        *anomalib_command(),
        "test",
        *model_arguments,
        *folder_data_arguments(folder, root),
        "--default_root_dir",
        str(results),
        "--trainer.accelerator",
        "cpu",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def run_anomalib(arguments: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run the stock ``anomalib`` command with ``arguments`` and this checkout's package (any exit code)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [*anomalib_command(), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
