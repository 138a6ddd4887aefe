"""The ``refiner`` argument of the models: presets, partial overrides and the CLI's preset type.

Example:
    >>> make_refiner("paper", {"paper": {"lambda_": 0.1}}, default="paper").options.lambda_
    0.1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jsonargparse.typing import register_type

from anomalib_protorefine.refinement import PrototypeRefiner, RefinerOptions

__all__ = ["RefinerPreset", "make_refiner", "plain_refiner", "refiner_option_names"]


def refiner_option_names() -> tuple[str, ...]:
    """Names of the :class:`PrototypeRefiner` options (derived from :class:`RefinerOptions`, never hard-coded).

    Example:
        >>> "lambda_" in refiner_option_names()
        True
    """
    return tuple(field.name for field in dataclasses.fields(RefinerOptions))


class RefinerPreset(dict):
    """A preset name given on the command line (``--model.refiner paper``), held as ``{"preset": "paper"}``.

    jsonargparse replaces a string value by a new dict when nested options follow
    (``--model.refiner paper --model.refiner.lambda_ 1.0`` would give ``{"lambda_": 1.0}``: the
    default form with lambda 1). It merges nested options into a previous dict value, so the models
    list this type, registered with jsonargparse, before ``str`` in their ``refiner`` type: a preset
    name is parsed into this dict and the options after it are added to it
    (``{"preset": "paper", "lambda_": 1.0}``, the paper form with lambda 1). Saved configurations
    hold the plain name again. In Python, pass the name itself.

    Example:
        >>> RefinerPreset.parse("paper")
        {'preset': 'paper'}
        >>> RefinerPreset.dump(RefinerPreset.parse("paper"))
        'paper'
    """

    __slots__ = ()  # no instance __dict__: jsonargparse copies dicts through it when a dict has one

    @classmethod
    def parse(cls, value: Any) -> RefinerPreset:
        """A preset name as this dict; any other value is left to the other types of ``refiner``."""
        if not isinstance(value, str) or not value.strip() or value.strip()[0] in "{[":
            msg = f"not a refiner preset name: {value!r}"
            raise TypeError(msg)
        return cls(preset=value.strip())

    @staticmethod
    def dump(value: Any) -> Any:
        """The preset name of this dict (as the user wrote it); other values unchanged."""
        return value["preset"] if isinstance(value, RefinerPreset) else value


register_type(RefinerPreset, serializer=RefinerPreset.dump, deserializer=RefinerPreset.parse)


def plain_refiner(refiner: Any) -> Any:
    """A ``{"preset": name}`` dict without options as the plain name (other values unchanged).

    Example:
        >>> plain_refiner(RefinerPreset.parse("auto")), plain_refiner({"preset": "paper", "lambda_": 1.0})
        ('auto', {'preset': 'paper', 'lambda_': 1.0})
    """
    if isinstance(refiner, dict) and set(refiner) == {"preset"}:
        return refiner["preset"]
    return refiner


def _refiner_arguments(refiner: dict[str, Any]) -> dict[str, Any]:
    """The refiner options of a dict: plain options, or a jsonargparse ``class_path``/``init_args`` spec."""
    if "class_path" in refiner:
        class_name = str(refiner["class_path"]).rsplit(".", 1)[-1]
        if class_name != PrototypeRefiner.__name__:
            msg = f"refiner class_path must name PrototypeRefiner, got {refiner['class_path']!r}."
            raise ValueError(msg)
        refiner = dict(refiner.get("init_args") or {})
    refiner = {key: value for key, value in refiner.items() if key != "preset"}
    unknown = sorted(set(refiner) - set(refiner_option_names()))
    if unknown:
        msg = (
            f"refiner has unknown option(s) {unknown}: valid PrototypeRefiner options are "
            f"{list(refiner_option_names())} (e.g. --model.refiner.lambda_ 0.2)."
        )
        raise ValueError(msg)
    return dict(refiner)


def make_refiner(
    refiner: bool | str | dict[str, Any] | PrototypeRefiner,
    presets: Mapping[str, dict[str, Any]],
    default: str,
    other_names: Sequence[str] = (),
) -> PrototypeRefiner | None:
    """Turn the ``refiner`` argument of a model into a refiner (or ``None`` for the baseline).

    A dict is a *partial override* of a preset: its ``"preset"`` key (default: the model's default
    preset) with only the options it names changed. ``--model.refiner paper --model.refiner.lambda_ 1.0``
    gives ``{"preset": "paper", "lambda_": 1.0}`` (see :class:`RefinerPreset`), and
    ``--model.refiner.lambda_ 0.2`` on the command line gives (the models list ``dict``
    before ``PrototypeRefiner`` in their ``refiner`` type, so jsonargparse collects nested options
    into a dict instead of building a ``PrototypeRefiner`` whose unnamed options would take the
    class defaults rather than the model's). A ``PrototypeRefiner`` is used as given: all its
    options are explicit.

    Args:
        refiner: ``True`` (the model's ``default`` preset), ``False`` or ``"off"`` (no refinement),
            a preset name (e.g. ``"paper"``), a dict of :class:`PrototypeRefiner` options over the
            default preset (as stored in checkpoints, or a jsonargparse ``class_path``/``init_args``
            spec), or a refiner.
        presets: The model's named settings (preset name -> refiner options).
        default: The preset of ``True`` and the base of a dict.
        other_names: Other string values the model accepts (e.g. ``"auto"``), listed in the error.

    Returns:
        The refiner or ``None``.

    Example:
        >>> presets = {"paper": {"lambda_": 0.1, "distance": "cosine"}}
        >>> make_refiner({"lambda_": 0.2}, presets, default="paper").options.distance
        'cosine'
        >>> make_refiner("paper", presets, default="paper").options.lambda_
        0.1
    """
    refiner = plain_refiner(refiner)
    if isinstance(refiner, PrototypeRefiner):
        return refiner
    if isinstance(refiner, bool):
        return PrototypeRefiner(**presets[default]) if refiner else None
    if isinstance(refiner, str):
        if refiner == "off":
            return None
        if refiner not in presets:
            names = ", ".join(repr(name) for name in (*presets, *other_names, "off"))
            msg = f"refiner={refiner!r} is not a preset: use one of {names}, True, False or a dict of options."
            raise ValueError(msg)
        return PrototypeRefiner(**presets[refiner])
    if isinstance(refiner, dict):
        preset = refiner.get("preset", default)
        if preset not in presets:
            names = ", ".join(repr(name) for name in presets)
            takes = "takes no options" if preset in (*other_names, "off") else "is not a preset"
            msg = f"refiner preset {preset!r} {takes}: give options over one of {names} (e.g. --model.refiner paper)."
            raise ValueError(msg)
        return PrototypeRefiner(**{**presets[preset], **_refiner_arguments(refiner)})
    msg = (
        "refiner must be True, False, a preset name, a dict of PrototypeRefiner options or a PrototypeRefiner, "
        f"got {type(refiner).__name__}."
    )
    raise TypeError(msg)
