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
