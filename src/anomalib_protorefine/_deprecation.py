"""Deprecation shims for renamed or moved public names: the old name still works, with a ``FutureWarning``.

Example:
    >>> import warnings
    >>> namespace = {"NewName": 42}
    >>> getattr_ = renamed_names("pkg", {"OldName": "NewName"}, namespace)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     getattr_("OldName")
    42
    >>> str(caught[0].message)
    'pkg.OldName is deprecated: use NewName (the same object); the old name will be removed in a future release.'
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names", "renamed_names", "warn_renamed"]


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (``FutureWarning``, shown to users by default) that ``old`` is now called ``new``."""
    msg = f"{old} is deprecated: use {new} (the same object); the old name will be removed in a future release."
    warnings.warn(msg, FutureWarning, stacklevel=stacklevel)


def renamed_names(module: str, renamed: Mapping[str, str], namespace: Mapping[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that serves each old name of ``renamed`` as its new one, with a warning.

    Args:
        module: The module's name (``__name__``), for the messages.
        renamed: Old name -> new name.
        namespace: Where the new names live (the module's ``globals()``).
    """

    def module_getattr(name: str) -> Any:
        if name in renamed:
            warn_renamed(f"{module}.{name}", renamed[name])
            return namespace[renamed[name]]
        msg = f"module {module!r} has no attribute {name!r}"
        raise AttributeError(msg)

    return module_getattr


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that serves names moved to another module, with a warning.

    Args:
        module: The module's name (``__name__``), for the messages.
        moved: Name -> the module it lives in now.

    Example:
        >>> import warnings
        >>> getattr_ = moved_names("old.place", {"sqrt": "math"})
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     getattr_("sqrt")(9.0)
        3.0
    """

    def module_getattr(name: str) -> Any:
        if name in moved:
            warn_renamed(f"{module}.{name}", f"{moved[name]}.{name}")
            return getattr(importlib.import_module(moved[name]), name)
        msg = f"module {module!r} has no attribute {name!r}"
        raise AttributeError(msg)

    return module_getattr
