"""Register the models with anomalib as soon as ``anomalib.models`` is imported.

The wheel installs ``anomalib_protorefine_autoload.pth``, which imports this tiny module at
interpreter start. It adds an import hook and nothing else: only when some code imports
``anomalib.models`` (the ``anomalib`` CLI, ``get_model``) are our models imported too, right
after it, so ``anomalib test --model PatchCorePlus`` works with the stock command.
Set ``ANOMALIB_PROTOREFINE_NO_AUTOLOAD=1`` to disable it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from types import ModuleType

_TRIGGER = "anomalib.models"
_TARGET = "anomalib_protorefine.models"


class _RegisteringLoader(importlib.abc.Loader):
    """Run the real loader of ``anomalib.models``, then import our models."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """Delegate module creation."""
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Execute ``anomalib.models`` and register our subclasses after it.

        A failure to import our models (a broken or partial install) must never break anomalib
        itself: it becomes a warning that says how to see the full error.
        """
        self._loader.exec_module(module)
        try:
            importlib.import_module(_TARGET)
        except Exception as error:
            warnings.warn(
                f"anomalib-protorefine: could not register PatchCorePlus/WinClipPlus with anomalib ({error!r}); "
                f"run `python -c 'import {_TARGET}'` for the full traceback.",
                RuntimeWarning,
                stacklevel=2,
            )


class _AnomalibModelsHook(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of ``anomalib.models`` once."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """Return the real spec of ``anomalib.models`` with a registering loader."""
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Install the hook (idempotent); import our models now if anomalib.models is already loaded."""
    if os.environ.get("ANOMALIB_PROTOREFINE_NO_AUTOLOAD"):
        return
    if _TRIGGER in sys.modules:
        importlib.import_module(_TARGET)
        return
    if not any(isinstance(finder, _AnomalibModelsHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsHook())


install()
