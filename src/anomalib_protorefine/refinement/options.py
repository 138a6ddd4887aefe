"""Validated options of the prototype refiner: the one list of their names, defaults, choices and docs.

The fields of :class:`RefinerOptions` are the single definition of the options: their types give the
choices of the string options (:data:`OPTION_CHOICES`, from the ``Literal`` types), their defaults the
defaults, and the class docstring's ``Args`` section their documentation (:func:`option_docs`).
:class:`~anomalib_protorefine.refinement.refiner.PrototypeRefiner` takes the same arguments
(:func:`option_signature`, :func:`takes_options`) and the models derive their option names from the fields.

All checks run in :class:`RefinerOptions.__post_init__`, before any heavy work, and every error
names the parameter and says how to fix it. Nothing is silently clamped.

Example:
    >>> from anomalib_protorefine.refinement.options import RefinerOptions
    >>> RefinerOptions(lambda_=0.3, epsilon=0.05).m_step
    'closed_form'
    >>> RefinerOptions(epsilon=0.0)
    Traceback (most recent call last):
    ...
    ValueError: epsilon must be finite and > 0.0, got 0.0. Use e.g. epsilon=0.05.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import textwrap
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Literal, TypeVar

__all__ = [
    "MAX_ADAM_LR",
    "OPTION_CHOICES",
    "CostNormalization",
    "Distance",
    "MStep",
    "Optimizer",
    "RefinerOptions",
    "ScoreFusion",
    "ScoringBank",
    "SinkhornMethod",
    "document_options",
    "option_docs",
    "option_signature",
    "takes_options",
]

Distance = Literal["euclidean", "cosine"]
MStep = Literal["closed_form", "gradient"]
Optimizer = Literal["sgd", "adam"]
CostNormalization = Literal["mean", "max", "none"]
SinkhornMethod = Literal["auto", "sinkhorn", "sinkhorn_log", "fixed"]
ScoringBank = Literal["refined", "matched", "union"]
ScoreFusion = Literal["none", "geometric"]

#: Largest Adam step size of the gradient M-step: Adam moves each weight by about ``lr`` times 1% of the mean
#: weight per step, so beyond 100 one step exceeds the weights' own size (the refined prototypes leave the bank).
MAX_ADAM_LR = 100.0

_Init = TypeVar("_Init", bound=Callable[..., None])


def _check_number(name: str, value: Any, *, minimum: float, inclusive: bool, example: str) -> None:
    """Raise a ``ValueError``/``TypeError`` unless ``value`` is a finite real number above ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a number, got {type(value).__name__} {value!r}. Use e.g. {name}={example}."
        raise TypeError(msg)
    ok = value >= minimum if inclusive else value > minimum
    if not math.isfinite(value) or not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        msg = f"{name} must be finite and {bound}, got {value!r}. Use e.g. {name}={example}."
        raise ValueError(msg)


def _check_int(name: str, value: Any, *, minimum: int, example: str) -> None:
    """Raise unless ``value`` is an ``int`` (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be an integer, got {type(value).__name__} {value!r}. Use e.g. {name}={example}."
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}. Use e.g. {name}={example}."
        raise ValueError(msg)


@dataclass(frozen=True)
class RefinerOptions:
    """Hyper-parameters of the EM prototype refinement (see ``docs/method.md``).

    Args:
        lambda_: Weight of the optimal-transport term. The fidelity term is the *mean* squared
            distance over the m query patches, so ``lambda_`` does not depend on m. Paper:
            0.3 (PatchCore+), 0.1 (WinCLIP+).
        num_iterations: Maximum number of EM iterations N (paper: 10).
        em_tol: Stop the EM early once no query's plan moves by more than this in total
            variation (plans sum to 1); ``0`` always runs ``num_iterations``.
        epsilon: Sinkhorn entropy weight, relative to the transport-cost scale chosen by
            ``cost_normalization`` (so it does not depend on the feature scale).
        transport: ``False`` drops the OT term: the "W only" ablation, whose minimiser is the
            ridge least-squares projection ``W0``.
        distance: ``"euclidean"`` (PatchCore+) or ``"cosine"`` (WinCLIP+; features are
            L2-normalised and the chordal form of the objective is used).
        m_step: ``"closed_form"`` (exact minimiser with T fixed) or ``"gradient"`` (the paper:
            a torch optimizer on W with T fixed).
        optimizer: Optimizer of the gradient M-step, ``"sgd"`` or ``"adam"``.
        lr: Step size of the gradient M-step, in units of 1/L (L: Lipschitz constant of the
            gradient), so ``lr=1`` is the classical safe step for SGD.
        gradient_steps: Optimizer steps per M-step.
        ridge: Tikhonov weight added to ``M M^T``, relative to its mean diagonal. Must be > 0:
            ``M M^T`` is singular whenever the bank has duplicate rows or more rows than channels.
        cost_normalization: Scale the transport cost by its ``"mean"`` or ``"max"`` at the
            initial W (per query), or ``"none"`` (then ``epsilon`` is in feature units).
        sinkhorn_method: ``"auto"`` (default) solves the queries of a batch at once with
            stabilised, over-relaxed scaling iterations (``transport.solve_plans``);
            ``"sinkhorn"`` and ``"sinkhorn_log"`` call POT's scaling or log-domain solver once per
            query (the reference). In every mode a plan that comes back non-finite or far from its
            marginals is recomputed in the log domain, and one that still misses its marginals
            raises ``SinkhornMarginalError`` (an ``epsilon`` far below the safe range).
            ``"fixed"`` runs exactly ``sinkhorn_max_iter`` log-domain iterations per E-step, in pure
            torch, with no convergence check and no fallback (``transport.solve_plans_fixed``): the
            static graph that ONNX/OpenVINO export traces (a plan that misses its marginals still
            raises outside an export).
        sinkhorn_max_iter: Maximum Sinkhorn iterations per E-step (with ``"fixed"``: the exact number).
        sinkhorn_tol: Stop when the L2 marginal violation, relative to the marginal's norm,
            is below this value.
        scoring_bank: Which prototypes a query patch is scored against: ``"refined"`` (nearest
            of the m refined prototypes, paper Eq. 6), ``"matched"`` (its own refined prototype
            only) or ``"union"`` (nearest of the refined prototypes and the original bank).
        neighbors: Locality: each query patch's row of W may only use its ``neighbors`` nearest
            bank prototypes (``None``: the whole bank, the paper). A refined prototype then stays
            in the span of a few normal prototypes and cannot rebuild a defect from the whole bank.
        affine: With ``neighbors``, constrain each row of W to sum to one, so a refined prototype
            lies on the affine hull of its neighbours (``neighbors=1`` is then plain PatchCore).
        score_fusion: ``"geometric"`` scores a patch with the geometric mean of its refined
            distance (``scoring_bank``) and its plain nearest-neighbour distance to the original
            bank; ``"none"`` (the paper) uses the refined distance alone.
        sinkhorn_overrelaxation: Over-relaxation factor ``omega`` in ``[1, 2)`` of the batched
            Sinkhorn of ``sinkhorn_method="auto"`` (``1``: plain Sinkhorn). Same plan (fixed point),
            fewer iterations when the plan is nearly deterministic (large ``lambda_``; see
            docs/benchmarks.md); a query whose marginal violation grows falls back to ``omega = 1``.

    Example:
        >>> opts = RefinerOptions(distance="cosine", lambda_=0.1)
        >>> opts.as_dict()["distance"]
        'cosine'
    """

    lambda_: float = 0.3
    num_iterations: int = 10
    em_tol: float = 0.0
    epsilon: float = 0.05
    transport: bool = True
    distance: Distance = "euclidean"
    m_step: MStep = "closed_form"
    optimizer: Optimizer = "sgd"
    lr: float = 1.0
    gradient_steps: int = 5
    ridge: float = 1e-3
    cost_normalization: CostNormalization = "mean"
    sinkhorn_method: SinkhornMethod = "auto"
    sinkhorn_max_iter: int = 1000
    sinkhorn_tol: float = 1e-3
    scoring_bank: ScoringBank = "refined"
    neighbors: int | None = None
    affine: bool = False
    sinkhorn_overrelaxation: float = 1.7
    score_fusion: ScoreFusion = "none"

    def __post_init__(self) -> None:
        """Validate every field; raise with the parameter name and a fix."""
        _check_number("lambda_", self.lambda_, minimum=0.0, inclusive=True, example="0.3")
        _check_int("num_iterations", self.num_iterations, minimum=1, example="10")
        _check_number("em_tol", self.em_tol, minimum=0.0, inclusive=True, example="1e-3")
        _check_number("epsilon", self.epsilon, minimum=0.0, inclusive=False, example="0.05")
        if not isinstance(self.transport, bool):
            msg = f"transport must be True or False, got {self.transport!r}."
            raise TypeError(msg)
        _check_number("lr", self.lr, minimum=0.0, inclusive=False, example="1.0")
        if self.optimizer == "sgd" and self.lr >= 2.0:
            msg = (
                f"lr={self.lr:g} with optimizer='sgd': lr is in units of 1/L (L: the Lipschitz constant of the "
                "M-step gradient), and gradient descent diverges for lr >= 2. Use lr in (0, 2), e.g. lr=1.0."
            )
            raise ValueError(msg)
        if self.optimizer == "adam" and self.lr > MAX_ADAM_LR:
            msg = (
                f"lr={self.lr:g} with optimizer='adam': lr is in units of 1% of the mean prototype weight per step, so "
                f"lr > {MAX_ADAM_LR:g} moves every weight by more than its mean size in one step (and overflows "
                f"in float32 from about 1e38). Use lr in (0, {MAX_ADAM_LR:g}], e.g. lr=1.0."
            )
            raise ValueError(msg)
        _check_int("gradient_steps", self.gradient_steps, minimum=1, example="5")
        _check_number("ridge", self.ridge, minimum=0.0, inclusive=False, example="1e-3")
        _check_int("sinkhorn_max_iter", self.sinkhorn_max_iter, minimum=1, example="1000")
        _check_number("sinkhorn_tol", self.sinkhorn_tol, minimum=0.0, inclusive=False, example="1e-3")
        if self.neighbors is not None:
            _check_int("neighbors", self.neighbors, minimum=1, example="16 (or None for the whole bank)")
        if not isinstance(self.affine, bool):
            msg = f"affine must be True or False, got {self.affine!r}."
            raise TypeError(msg)
        if self.affine and self.m_step != "closed_form":
            msg = "affine=True needs m_step='closed_form' (the gradient M-step has no constraint): change one of them."
            raise ValueError(msg)
        if self.affine and self.neighbors is None:
            msg = "affine=True needs neighbors: set e.g. neighbors=16, or affine=False for the whole bank."
            raise ValueError(msg)
        for name, choices in OPTION_CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                msg = f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}."
                raise ValueError(msg)
        _check_number(
            "sinkhorn_overrelaxation", self.sinkhorn_overrelaxation, minimum=1.0, inclusive=True, example="1.7"
        )
        if self.sinkhorn_overrelaxation >= 2.0:
            msg = f"sinkhorn_overrelaxation must be < 2 (Sinkhorn diverges beyond), got {self.sinkhorn_overrelaxation}."
            raise ValueError(msg)
        # numpy scalars pass the checks but are stored as Python numbers: hparams.yaml and torch take those only.
        for option in fields(self):
            value = getattr(self, option.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            plain = int(value) if isinstance(value, numbers.Integral) else float(value)
            object.__setattr__(self, option.name, plain)

    def as_dict(self) -> dict[str, Any]:
        """Return the options as a plain dictionary (for logging and hyper-parameters)."""
        return asdict(self)


def _literal_choices(hint: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` type (``None`` for any other type)."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


_HINTS = typing.get_type_hints(RefinerOptions)

#: The allowed values of every option with a fixed set of values, read from its ``Literal`` type, in field order.
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    option.name: choices
    for option in fields(RefinerOptions)
    if (choices := _literal_choices(_HINTS[option.name])) is not None
}


def option_docs() -> dict[str, str]:
    """The documentation of every option, read from the ``Args`` section of :class:`RefinerOptions`.

    Returns:
        Option name -> its description on one line, in the docstring's order.

    Example:
        >>> option_docs()["num_iterations"]
        'Maximum number of EM iterations N (paper: 10).'
    """
    docs: dict[str, str] = {}
    name = None
    inside = False
    for line in inspect.cleandoc(RefinerOptions.__doc__ or "").splitlines():
        if not inside:
            inside = line == "Args:"
            continue
        if line and not line.startswith(" "):  # the next section
            break
        entry = re.fullmatch(r" {4}(\w+): (.*)", line)
        if entry is not None:
            name = entry[1]
            docs[name] = entry[2]
        elif name is not None and line.strip():
            docs[name] += " " + line.strip()
    return docs


def option_signature() -> inspect.Signature:
    """The signature of a constructor taking the options: :class:`RefinerOptions`'s, with ``str`` for a choice.

    The string options are annotated ``str`` rather than their ``Literal`` so that a wrong value reaches
    :class:`RefinerOptions`, whose error names the option and its choices (a command-line parser
    reading the signature would otherwise reject it with a message of its own).

    Example:
        >>> str(option_signature().parameters["distance"])
        "distance: str = 'euclidean'"
    """
    parameters = [
        inspect.Parameter(
            option.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=option.default if option.default is not MISSING else inspect.Parameter.empty,
            annotation=str if option.name in OPTION_CHOICES else _HINTS[option.name],
        )
        for option in fields(RefinerOptions)
    ]
    return inspect.Signature(parameters, return_annotation=None)


def takes_options(init: _Init) -> _Init:
    """Give a constructor ``init(self, *args, **options)`` that passes both to :class:`RefinerOptions` its signature.

    ``inspect.signature`` (and so jsonargparse and ``help``) then lists every option with its type and
    default, in field order, as if the constructor named them one by one.

    Args:
        init: The ``__init__`` to decorate.

    Returns:
        ``init`` itself, with ``__signature__`` set.
    """
    signature = option_signature()
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()]
    init.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return init


def document_options(doc: str, width: int = 110) -> str:
    """Add one entry per option (from :func:`option_docs`, in field order) to the ``Args`` section of ``doc``.

    The entries go at the end of the section (its first blank line), indented like its other entries,
    so that ``help`` and command-line parsers that read docstrings describe every option.

    Args:
        doc: A Google-style docstring with an ``Args`` section.
        width: Line width to wrap the entries at.

    Returns:
        The docstring with the entries added.

    Example:
        >>> def build(**options: object) -> None:
        ...     '''Build it.
        ...
        ...     Args:
        ...         **options: The options.
        ...     '''
        >>> document_options(build.__doc__).splitlines()[4].split(".")[0]
        '        lambda_: Weight of the optimal-transport term'
    """
    lines = doc.splitlines(keepends=True)
    args = next(number for number, line in enumerate(lines) if line.strip() == "Args:")
    end = next((number for number in range(args + 1, len(lines)) if not lines[number].strip()), len(lines))
    indent = lines[args][: len(lines[args]) - len(lines[args].lstrip())] + "    "
    docs = option_docs()
    entries = [
        textwrap.fill(
            f"{name}: {docs[name]}",
            width,
            initial_indent=indent,
            subsequent_indent=indent + "    ",
            break_on_hyphens=False,
            break_long_words=False,
        )
        + "\n"
        for name in (option.name for option in fields(RefinerOptions))
    ]
    return "".join([*lines[:end], *entries, *lines[end:]])
