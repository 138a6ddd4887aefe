"""Register the models with anomalib as soon as ``anomalib.models`` is imported.

The wheel installs ``anomalib_protorefine_autoload.pth``, which imports this tiny module at
interpreter start. It adds an import hook and nothing else: only when some code imports
``anomalib.models`` (the ``anomalib`` CLI, ``get_model``) are our models imported too, right
after it, so ``anomalib test --model PatchCorePlus`` works with the stock command; and when the
CLI loads its pipelines, ``anomalib benchmark`` gets the few-shot benchmark pipeline; and the CLI reports
a bad value of our models in one line (``_cli``).
Set ``ANOMALIB_PROTOREFINE_NO_AUTOLOAD=1`` to disable it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from types import ModuleType

from anomalib_protorefine.upstream import quiet_upstream_imports

_TRIGGER = "anomalib.models"
_TARGET = "anomalib_protorefine.models"
#: anomalib module -> our module imported right after it.
_TARGETS = {
    _TRIGGER: _TARGET,
    # `anomalib benchmark` runs the few-shot benchmark pipeline (a strict extension of anomalib's).
    "anomalib.cli.pipelines": "anomalib_protorefine.benchmark.register",
    # A bad value of our models on the command line: one error line instead of jsonargparse's union report.
    "anomalib.cli.cli": "anomalib_protorefine._cli",
}


class _RegisteringLoader(importlib.abc.Loader):
    """Run the real loader of ``anomalib.models``, then import our models."""

    def __init__(self, loader: importlib.abc.Loader, target: str = _TARGET) -> None:
        self._loader = loader
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """Delegate module creation."""
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Execute ``anomalib.models`` and register our subclasses after it.

        A failure to import our models (a broken or partial install) must never break anomalib
        itself: it becomes a warning that says how to see the full error.
        """
        # anomalib's notices about its own imports stay quiet while anomalib.models loads (see upstream)
        with quiet_upstream_imports() if module.__name__ == _TRIGGER else contextlib.nullcontext():
            self._loader.exec_module(module)
        try:
            importlib.import_module(self._target)
        except Exception as error:
            warnings.warn(
                f"anomalib-protorefine: could not register {self._target} with anomalib ({error!r}); "
                f"run `python -c 'import {self._target}'` for the full traceback.",
                RuntimeWarning,
                stacklevel=2,
            )


class _AnomalibModelsHook(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loaders of the modules in ``_TARGETS`` once each."""

    def __init__(self) -> None:
        self._pending = set(_TARGETS)

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """Return the real spec of a trigger module with a registering loader."""
        if fullname not in self._pending:
            return None
        self._pending.discard(fullname)
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if self._pending:
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader, _TARGETS[fullname])
        return spec


def install() -> None:
    """Install the hook (idempotent); import our models now if anomalib.models is already loaded."""
    if os.environ.get("ANOMALIB_PROTOREFINE_NO_AUTOLOAD"):
        return
    hook = _AnomalibModelsHook()
    for trigger, target in _TARGETS.items():
        if trigger in sys.modules:
            importlib.import_module(target)
            hook._pending.discard(trigger)
    if hook._pending and not any(isinstance(finder, _AnomalibModelsHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, hook)


install()
