"""What a benchmark run is made of: its methods and data sets, and what the model class of a method says.

A method names a model by class path; :func:`model_class_of` finds this package's few-shot model
behind it (``FastRecon`` is the benchmark's FastRecon-style baseline on PatchCorePlus's bank), and
the benchmark asks that class what it needs (cached features, feature arguments, presets).

Example:
    >>> MethodSpec("PatchCore+", "PatchCorePlus", {"refiner": "fused"}).uses_cached_features
    True
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FASTRECON",
    "BenchmarkConfigError",
    "DataSpec",
    "MethodSpec",
    "default_refiner",
    "model_class_of",
    "parameter_value",
    "refiner_options",
]


#: The FastRecon-style baseline: a benchmark method on PatchCorePlus's bank and features (not a model class).
FASTRECON = "FastRecon"


class BenchmarkConfigError(ValueError):
    """A benchmark config that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class MethodSpec:
    """One method (a row of the tables).

    Attributes:
        name: Display name, unique in the run.
        class_path: ``PatchCorePlus``, ``FastRecon``, ``AnomalyDINOPlus`` or any anomalib model class path.
        init_args: Constructor arguments (``shared`` merged in for feature methods).
        base: Name of the method it is compared with, or ``None``.
        sweep: ``(method, parameter, value)`` when the method is a point of a sweep.
    """

    name: str
    class_path: str
    init_args: dict[str, Any]
    base: str | None = None
    sweep: tuple[str, str, Any] | None = None

    @property
    def model_class(self) -> type | None:
        """The few-shot model of the method (FastRecon: PatchCorePlus), ``None`` for any other anomalib model."""
        return model_class_of(self.class_path)

    @property
    def is_fastrecon(self) -> bool:
        """Whether the method is the FastRecon-style baseline (PatchCorePlus's bank, its own scoring)."""
        return self.class_path == FASTRECON

    @property
    def refiner(self) -> Any:
        """The ``refiner`` argument: as given, else the model's default (``False`` for FastRecon and other models)."""
        model = self.model_class
        if model is None or self.is_fastrecon:
            return False
        return self.init_args.get("refiner", default_refiner(model))

    @property
    def refines_with_options(self) -> bool:
        """Whether the method refines with fixed options (neither off nor chosen per task by ``"auto"``)."""
        return self.refiner is not False and self.refiner not in ("off", "auto")

    @property
    def uses_cached_features(self) -> bool:
        """Whether the method is scored on the cached test features (else: anomalib's Engine)."""
        model = self.model_class
        return model is not None and model.cached_features


@dataclass(frozen=True)
class DataSpec:
    """One dataset (and category) of the grid.

    Attributes:
        label: ``name`` or ``name/category``, as in the tables.
        config: The datamodule config (``class_path``/``init_args``), grids expanded.
    """

    label: str
    config: dict[str, Any]


def model_class_of(class_path: str) -> type | None:
    """The few-shot model behind a method's class path (FastRecon: PatchCorePlus), ``None`` for other models.

    Example:
        >>> model_class_of("FastRecon").__name__, model_class_of("Padim")
        ('PatchCorePlus', None)
    """
    from anomalib_protorefine.models import PatchCorePlus, few_shot_model_class

    return PatchCorePlus if class_path == FASTRECON else few_shot_model_class(class_path)


def default_refiner(model: type) -> Any:
    """The ``refiner`` a model gets when none is given (its constructor's default).

    Example:
        >>> from anomalib_protorefine.models import AnomalyDINOPlus, PatchCorePlus
        >>> default_refiner(PatchCorePlus), default_refiner(AnomalyDINOPlus)
        (True, 'off')
    """
    return inspect.signature(model.__init__).parameters["refiner"].default


def refiner_options(method: MethodSpec) -> dict[str, Any]:
    """All options of ``method``'s refiner (a preset name or a partial dict resolved with the model's presets)."""
    from anomalib_protorefine.models.refiner_config import make_refiner

    model = method.model_class
    module = None
    if method.refines_with_options:
        module = make_refiner(method.refiner, model.refiner_presets, model.refiner_default_preset)
    if module is None:
        msg = f"benchmark.sweeps: {method.name!r} has no refiner to sweep (refiner={method.refiner!r})."
        raise BenchmarkConfigError(msg)
    return module.options.as_dict()


def parameter_value(method: MethodSpec, parameter: str) -> Any:
    """The value of ``parameter`` in ``method`` (a refiner option or a constructor argument), or ``None``.

    Example:
        >>> parameter_value(MethodSpec("m", "PatchCorePlus", {"refiner": "paper"}), "lambda_")
        0.3
    """
    from anomalib_protorefine.models.refiner_config import refiner_option_names

    if parameter in refiner_option_names():
        try:
            return refiner_options(method)[parameter]
        except BenchmarkConfigError:
            return None
    return method.init_args.get(parameter)
