"""The refiner's options are defined once, by the fields of ``RefinerOptions``: the refiner's signature and
docs, the choices and the E-step/M-step tables all follow from them (and the models' option names, which
they read from the same fields)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from anomalib_protorefine.refinement import PrototypeRefiner, RefinerOptions
from anomalib_protorefine.refinement.e_step import E_STEPS
from anomalib_protorefine.refinement.em import M_STEPS
from anomalib_protorefine.refinement.options import OPTION_CHOICES, option_docs, option_signature

FIELDS = [option.name for option in dataclasses.fields(RefinerOptions)]


def test_every_list_of_options_is_the_field_list() -> None:
    assert list(inspect.signature(PrototypeRefiner).parameters) == FIELDS
    assert list(option_signature().parameters) == FIELDS
    assert set(option_docs()) == set(FIELDS)  # every option is documented, and nothing else
    for option in dataclasses.fields(RefinerOptions):
        assert inspect.signature(PrototypeRefiner).parameters[option.name].default == option.default
        assert f"\n        {option.name}: " in PrototypeRefiner.__doc__


def test_choices_are_the_literal_types_and_documented() -> None:
    hints = typing.get_type_hints(RefinerOptions)
    literal = [name for name in FIELDS if typing.get_origin(hints[name]) is typing.Literal]
    assert list(OPTION_CHOICES) == literal
    assert len(literal) >= 7
    defaults = RefinerOptions()
    for name, choices in OPTION_CHOICES.items():
        assert getattr(defaults, name) in choices, name
        for choice in choices:
            assert f'``"{choice}"``' in option_docs()[name], (name, choice)
        with pytest.raises(ValueError, match=f"{name} must be one of {', '.join(repr(c) for c in choices)}"):
            RefinerOptions(**{name: "no such choice"})


def test_every_choice_has_its_solver() -> None:
    assert set(E_STEPS) == set(OPTION_CHOICES["sinkhorn_method"])
    assert set(M_STEPS) == set(OPTION_CHOICES["m_step"])


def test_refiner_takes_the_options_by_position_and_by_name() -> None:
    assert PrototypeRefiner(0.2, 3).options == RefinerOptions(lambda_=0.2, num_iterations=3)
    assert PrototypeRefiner(0.2, num_iterations=3, distance="cosine").options == RefinerOptions(
        0.2, 3, distance="cosine"
    )
    with pytest.raises(TypeError, match="no_such_option"):
        PrototypeRefiner(no_such_option=1)
