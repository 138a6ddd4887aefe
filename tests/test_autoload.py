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


NOTICES = (
    "Importing from timm.models.layers is deprecated",
    "The anomalib.models.components.dinov2 package is deprecated",
)


def _stderr_of(code: str, **env_extra: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if k != "ANOMALIB_PROTOREFINE_NO_AUTOLOAD"}
    env |= {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", **env_extra}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=False, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_anomalibs_import_notices_about_its_own_code_stay_quiet_and_nothing_else() -> None:
    """Stock anomalib prints two FutureWarnings on import; through the hook or our models' import they are gone,
    while the same messages raised anywhere else, and other warnings, still show."""
    stock = _stderr_of("import anomalib.models", ANOMALIB_PROTOREFINE_NO_AUTOLOAD="1")
    assert all(notice in stock for notice in NOTICES)  # upstream prints them (else this test proves nothing)
    later = "import warnings; warnings.warn('Importing from timm.models.layers is deprecated (later)', FutureWarning)"
    through_hook = _stderr_of(f"import anomalib_protorefine._autoload\nimport anomalib.models\n{later}")
    ours = _stderr_of(f"import anomalib_protorefine.models\n{later}", ANOMALIB_PROTOREFINE_NO_AUTOLOAD="1")
    for stderr in (through_hook, ours):
        assert not any(notice in stderr.replace("(later)", "") for notice in NOTICES[1:])
        assert stderr.count("Importing from timm.models.layers is deprecated") == 1  # only the later one
        assert "(later)" in stderr
