"""The autoload hook installed with the wheel (``anomalib_protorefine_autoload.pth``)."""

from __future__ import annotations

import importlib.abc
import types

import pytest

from anomalib_protorefine import _autoload


class _RecordingLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.ran = True


def test_registration_failure_never_breaks_anomalib() -> None:
    module = types.ModuleType("anomalib.models")
    with pytest.warns(RuntimeWarning, match="could not register"):
        _autoload._RegisteringLoader(_RecordingLoader(), "anomalib_protorefine._no_such_module").exec_module(module)
    assert module.ran  # anomalib.models itself still loaded


def test_registration_imports_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    imported: list[str] = []
    monkeypatch.setattr(_autoload.importlib, "import_module", imported.append)
    _autoload._RegisteringLoader(_RecordingLoader()).exec_module(types.ModuleType("anomalib.models"))
    assert imported == ["anomalib_protorefine.models"]


def test_cli_pipelines_get_the_few_shot_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    imported: list[str] = []
    monkeypatch.setattr(_autoload.importlib, "import_module", imported.append)
    target = _autoload._TARGETS["anomalib.cli.pipelines"]
    _autoload._RegisteringLoader(_RecordingLoader(), target).exec_module(types.ModuleType("anomalib.cli.pipelines"))
    assert imported == ["anomalib_protorefine.benchmark.register"]


def test_a_first_import_of_backbones_leaves_the_registration_whole() -> None:
    """A script whose first import is ``anomalib_protorefine.backbones`` (which needs anomalib) must not meet
    the registration hook's import of the models half way (a circular import, once a RuntimeWarning)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
        "import anomalib_protorefine.backbones\n"
        "from anomalib.models import get_model\n"
        "print(type(get_model('PatchCorePlus', backbone='resnet18', layers=['layer2'], pre_trained=False)).__name__)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "PatchCorePlus"
