"""One error line for a bad value of our models on the stock ``anomalib`` command line.

anomalib's CLI builds the model through jsonargparse, whose ``model`` type is ``AnomalibModule | None``:
a ``ValueError`` of our constructor (``--model.threshold bogus``, ``--model.k_shot 0``) is folded into
jsonargparse's "Does not validate against any of the Union subtypes" error, whose first line is
"Expected a <class 'NoneType'>", under a 180-line traceback. The autoload hook imports this module
right after ``anomalib.cli.cli`` and wraps ``AnomalibCLI.instantiate_classes``: when building the
classes fails and the model is one of ours, the model is built again from the parsed arguments
alone; if that raises the very error folded into jsonargparse's, the CLI stops with that one
line (``error: PatchCorePlus: threshold='bogus' is not a threshold source: use one of ...``,
exit code 2, as for any other argument error). Every other failure is raised unchanged.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

#: Errors of our constructors' checks that are turned into one CLI line.
CHECK_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _model_class(spec: Any) -> type | None:
    """The class of a parsed ``--model`` value when it is one of our refined few-shot models."""
    from anomalib_protorefine.models.base import FewShotModel

    class_path = getattr(spec, "class_path", None)
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, FewShotModel) else None


def model_error_line(config: Any, subcommand: str, error: BaseException) -> str | None:
    """The one-line error of our model's constructor behind ``error``, or ``None`` when it is not ours.

    Args:
        config: The CLI's parsed configuration.
        subcommand: The subcommand (its section holds ``model``).
        error: The error raised while building the classes.

    Returns:
        ``"<Model>: <the constructor's message>"``, or ``None``.
    """
    section = config.get(subcommand) if hasattr(config, "get") else None
    spec = section.get("model") if section is not None and hasattr(section, "get") else None
    cls = _model_class(spec)
    if cls is None:
        return None
    init_args = spec.get("init_args")
    arguments = dict(vars(init_args)) if init_args is not None else {}
    if any(hasattr(value, "class_path") for value in arguments.values()):
        return None  # nested class specs are built by jsonargparse only: leave the original error
    try:
        cls(**arguments)
    except CHECK_ERRORS as own:
        message = str(own)
        if message and message in str(error):
            return f"{cls.__name__}: {message}"
    return None


def wrap_instantiate_classes(method: Callable[[Any], None]) -> Callable[[Any], None]:
    """``AnomalibCLI.instantiate_classes`` that reports our models' argument errors in one line."""

    @functools.wraps(method)
    def instantiate_classes(self: Any) -> None:
        try:
            method(self)
        except Exception as error:
            subcommand = self.config.get("subcommand") if hasattr(self.config, "get") else None
            line = model_error_line(self.config, subcommand, error) if subcommand else None
            if line is None:
                raise
            self.parser.error(line)

    instantiate_classes.__protorefine_wrapped__ = True  # type: ignore[attr-defined]
    return instantiate_classes


def install() -> None:
    """Wrap ``AnomalibCLI.instantiate_classes`` once (idempotent)."""
    from anomalib.cli.cli import AnomalibCLI

    if not getattr(AnomalibCLI.instantiate_classes, "__protorefine_wrapped__", False):
        AnomalibCLI.instantiate_classes = wrap_instantiate_classes(AnomalibCLI.instantiate_classes)


install()
