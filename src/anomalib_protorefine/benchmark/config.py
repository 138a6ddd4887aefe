"""The few-shot benchmark's plan: anomalib's benchmark config, read and checked before anything runs.

The config is anomalib's (``accelerator`` plus a ``benchmark`` section whose ``model`` and ``data``
entries are ``class_path``/``init_args`` dicts, lists under ``grid`` expanded by anomalib's
:func:`~anomalib.pipelines.components.utils.get_iterator_from_grid_dict`), with few-shot keys:

* ``k_shot`` and ``few_shot_seed`` (numbers or ``{grid: [...]}``): every method of a (dataset,
  category, k, seed) cell sees the same support draw;
* each ``model`` entry may have a ``name`` (the row of the tables) and a ``base`` (the method it
  is compared with, e.g. PatchCore for PatchCore+); ``class_path: FastRecon`` is the built-in
  FastRecon-style baseline;
* ``shared`` holds PatchCorePlus arguments common to the feature-based methods (``backbone``,
  ``layers``, ``coreset_sampling_ratio``, ``image_size``), so their test features are computed once;
* ``sweeps`` adds one method per value of a parameter of a method (the paper's Fig. 5/8 curves);
* ``decision_rules`` judges other support-threshold rules on every cell
  (:mod:`anomalib_protorefine.benchmark.rules`);
* ``line_simulation`` judges thresholds calibrated on unlabelled streams of test images at
  requested false-alarm rates (:mod:`anomalib_protorefine.benchmark.line`);
* ``output``, ``max_test_images``, ``heatmaps``, ``figure7`` control the results folder.

Example:
    >>> plan = plan_from_config({
    ...     "accelerator": "cpu",
    ...     "benchmark": {
    ...         "k_shot": {"grid": [1, 2]}, "few_shot_seed": {"grid": [0, 1]},
    ...         "model": {"grid": [{"name": "PatchCore", "class_path": "PatchCorePlus",
    ...                             "init_args": {"refiner": False}}]},
    ...         "data": {"class_path": "Folder", "init_args": {"name": "x", "root": ".", "normal_dir": "good"}},
    ...     },
    ... }, check_data=False)
    >>> [m.name for m in plan.methods], plan.k_shots, plan.seeds
    (['PatchCore'], [1, 2], [0, 1])
"""

from __future__ import annotations

import copy
import csv
import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

from .line import LineSimulation, parse_line
from .rules import DecisionRules, parse_rules
from .spec import (
    BenchmarkConfigError,
    DataSpec,
    MethodSpec,
    model_class_of,
    refiner_options,
)

#: Options of ``shared`` (PatchCorePlus arguments that fix the test features, plus the image size).
SHARED_OPTIONS = ("backbone", "layers", "pre_trained", "weights", "coreset_sampling_ratio", "image_size")


#: Keys of the ``benchmark`` section of a few-shot config (anomalib's ``model``/``data``/``seed`` included).
SECTION_KEYS: tuple[str, ...] = (
    "output",
    "k_shot",
    "few_shot_seed",
    "max_test_images",
    "heatmaps",
    "figure7",
    "shared",
    "model",
    "data",
    "sweeps",
    "decision_rules",
    "line_simulation",
    "seed",
)


#: Columns of the long-form results file (``results.csv``).
CSV_COLUMNS = ("dataset", "category", "k_shot", "seed", "method", "metric", "value")
#: Constructor arguments that the benchmark's grid sets for every method (``benchmark.k_shot``/``few_shot_seed``).
GRID_ARGUMENTS = ("k_shot", "few_shot_seed")


@dataclass
class BenchmarkPlan:
    """Everything a run needs, checked."""

    accelerator: str
    methods: list[MethodSpec]
    datasets: list[DataSpec]
    k_shots: list[int]
    seeds: list[int]
    output: Path
    seed: int = 42
    max_test_images: int | None = None
    heatmap_images: int = 4
    figure7: bool = True
    shared: dict[str, Any] = field(default_factory=dict)
    decision_rules: DecisionRules | None = None
    line_simulation: LineSimulation | None = None
    data_configs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cells(self) -> list[tuple[DataSpec, int, int]]:
        """``(dataset, k, seed)`` in run order: dataset outermost (its features are computed once), then seed.

        Seeds before k, so that a run stopped early holds whole seeds (every k) rather than missing a k.
        """
        return [(data, k, seed) for data in self.datasets for seed in self.seeds for k in self.k_shots]

    def method(self, name: str) -> MethodSpec:
        """The method called ``name``."""
        return next(m for m in self.methods if m.name == name)


def _values(section: dict[str, Any], key: str, default: list[Any]) -> list[Any]:
    """A number or ``{grid: [...]}`` entry as a list."""
    value = section.get(key, default)
    if isinstance(value, dict):
        if set(value) != {"grid"}:
            msg = f"benchmark.{key} must be a value or {{grid: [...]}}, got {value!r}."
            raise BenchmarkConfigError(msg)
        value = value["grid"]
    return list(value) if isinstance(value, list | tuple) else [value]


def _int_list(section: dict[str, Any], key: str, default: list[int], minimum: int) -> list[int]:
    values = _values(section, key, default)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        msg = f"benchmark.{key} must be integers >= {minimum} (e.g. {{grid: {default}}}), got {values!r}."
        raise BenchmarkConfigError(msg)
    if len(set(values)) != len(values):
        msg = f"benchmark.{key} lists a value twice: {values!r}."
        raise BenchmarkConfigError(msg)
    return values


def _entries(section: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The ``model``/``data`` entries: one dict, or a ``grid`` list of dicts."""
    value = section.get(key)
    if value is None:
        msg = f"benchmark.{key} is missing: give one {key} (class_path, init_args) or {{grid: [...]}}."
        raise BenchmarkConfigError(msg)
    entries = value["grid"] if isinstance(value, dict) and set(value) == {"grid"} else [value]
    if not entries or not all(isinstance(e, dict) and "class_path" in e for e in entries):
        msg = f"every benchmark.{key} entry needs a class_path (e.g. class_path: Folder), got {value!r}."
        raise BenchmarkConfigError(msg)
    return entries


def _methods(section: dict[str, Any], shared: dict[str, Any]) -> list[MethodSpec]:
    methods: list[MethodSpec] = []
    for entry in _entries(section, "model"):
        unknown = set(entry) - {"class_path", "init_args", "name", "base"}
        if unknown:
            msg = f"benchmark.model entry {entry.get('name', entry['class_path'])!r}: unknown keys {sorted(unknown)}."
            raise BenchmarkConfigError(msg)
        class_path = str(entry["class_path"])
        name = str(entry.get("name") or class_path)
        init_args = copy.deepcopy(entry.get("init_args") or {})
        _check_init_args(name, class_path, init_args)
        if _takes_shared(class_path):
            init_args = {**shared, **init_args}
        if entry.get("base") is not None and str(entry["base"]) == name:
            msg = (
                f"benchmark.model entry {name!r} has itself as base: base names the method it is compared with "
                "(e.g. base: PatchCore for PatchCore+); name another method or drop base."
            )
            raise BenchmarkConfigError(msg)
        methods.append(MethodSpec(name, class_path, init_args, entry.get("base")))
    methods += _sweeps(section.get("sweeps") or [], methods)
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        msg = f"method names must be unique, {duplicates} appear twice: give the entries a `name`."
        raise BenchmarkConfigError(msg)
    for method in methods:
        if method.base is not None and method.base not in names:
            msg = f"method {method.name!r} has base {method.base!r}, which is not a method of the run ({names})."
            raise BenchmarkConfigError(msg)
    return methods


def _check_init_args(name: str, class_path: str, init_args: Any) -> None:
    """A method's own ``init_args``: a mapping, without the grid's arguments, with a valid ``image_size``."""
    if not isinstance(init_args, dict):
        msg = f"benchmark.model entry {name!r}: init_args must map argument names to values, not {init_args!r}."
        raise BenchmarkConfigError(msg)
    set_by_grid = sorted(set(init_args) & set(GRID_ARGUMENTS))
    if set_by_grid:
        msg = (
            f"benchmark.model entry {name!r}: init_args sets {set_by_grid}, which the benchmark sets for every method "
            "from its grid: move the values to benchmark.k_shot / benchmark.few_shot_seed and drop them from init_args."
        )
        raise BenchmarkConfigError(msg)
    model = model_class_of(class_path)
    if "image_size" in init_args and model is not None and model.cached_features:
        _check_image_size(init_args["image_size"], f"benchmark.model entry {name!r}: init_args.image_size")
    if init_args.get("tiling") is not None:
        _check_tiling(init_args["tiling"], class_path, f"benchmark.model entry {name!r}: init_args.tiling")


def _takes_shared(class_path: str) -> bool:
    """Whether ``shared`` (a backbone, its layers, the image size) goes into the method: cached-feature backbones."""
    model = model_class_of(class_path)
    return model is not None and model.cached_features and "backbone" in model.feature_arguments


def _check_tiling(value: Any, class_path: str, where: str) -> None:
    """``tiling: {tile_size, stride}``: anomalib's tiler on a PatchCore method, sizes positive integers."""
    model = model_class_of(class_path)
    if model is None or not model.tiles:
        msg = f"{where}: {class_path} does not tile images (PatchCorePlus and FastRecon do): drop tiling."
        raise BenchmarkConfigError(msg)
    if not isinstance(value, dict) or "tile_size" not in value or set(value) - {"tile_size", "stride"}:
        msg = (
            f"{where} must be {{tile_size: int, stride: int}} (anomalib's Tiler), e.g. "
            f"{{tile_size: 256, stride: 256}}, got {value!r}."
        )
        raise BenchmarkConfigError(msg)
    for key, size in value.items():
        _check_image_size(size, f"{where}.{key}")


def _check_image_size(value: Any, where: str) -> None:
    """An image size: a positive integer, or ``[height, width]`` of positive integers."""
    pair = isinstance(value, list | tuple)
    sizes = list(value) if pair else [value]
    positive = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
    if len(sizes) != (2 if pair else 1) or not positive:
        msg = f"{where} must be a positive integer or [height, width] of positive integers (e.g. 256), got {value!r}."
        raise BenchmarkConfigError(msg)


def _heatmap_images(value: Any) -> int:
    """``heatmaps: {images: n}``: the number of defective test images shown per heat-map figure (0: none)."""
    if value is None:
        return 4
    if not isinstance(value, dict) or set(value) - {"images"}:
        msg = (
            f"benchmark.heatmaps must be a mapping with the one key images (e.g. heatmaps: {{images: 4}}; 0 for no "
            f"figures), got {value!r}."
        )
        raise BenchmarkConfigError(msg)
    images = value.get("images", 4)
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        msg = f"benchmark.heatmaps.images must be an integer >= 0 (0: no heat-map figures), got {images!r}."
        raise BenchmarkConfigError(msg)
    return images


def _output_folder(value: Any) -> Path:
    """``benchmark.output``: a non-empty folder path whose ``results.csv``, if any, is a benchmark results file."""
    if not isinstance(value, str | Path) or not str(value).strip():
        msg = f"benchmark.output must name a results folder (e.g. output: results/benchmark), got {value!r}."
        raise BenchmarkConfigError(msg)
    folder = Path(value).expanduser()
    results = folder / "results.csv"
    if results.is_file():
        with results.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if not set(CSV_COLUMNS) <= set(header):
            msg = (
                f"{results} is not a results file of this benchmark (its columns are {header}, expected "
                f"{list(CSV_COLUMNS)}): choose another benchmark.output, or move that file away."
            )
            raise BenchmarkConfigError(msg)
    return folder


def _sweeps(sweeps: list[dict[str, Any]], methods: list[MethodSpec]) -> list[MethodSpec]:
    """One method per swept value: refiner options go into ``refiner``, others are constructor arguments."""
    from anomalib_protorefine.models.refiner_config import refiner_option_names

    added = []
    by_name = {m.name: m for m in methods}
    for sweep in sweeps:
        if set(sweep) != {"method", "parameter", "values"}:
            msg = f"each benchmark.sweeps entry needs exactly method, parameter, values; got {sweep!r}."
            raise BenchmarkConfigError(msg)
        base = by_name.get(sweep["method"])
        if base is None:
            msg = f"benchmark.sweeps: unknown method {sweep['method']!r}; methods: {sorted(by_name)}."
            raise BenchmarkConfigError(msg)
        parameter = sweep["parameter"]
        if parameter in GRID_ARGUMENTS:
            msg = (
                f"benchmark.sweeps: {parameter} is swept by the benchmark's own grid: list the values under "
                f"benchmark.{parameter} ({{grid: [...]}}) instead of a sweep."
            )
            raise BenchmarkConfigError(msg)
        for value in sweep["values"]:
            init_args = copy.deepcopy(base.init_args)
            if parameter in refiner_option_names():
                init_args["refiner"] = {**refiner_options(base), parameter: value}
            else:
                init_args[parameter] = value
            name = f"{base.name} [{parameter}={value}]"
            added.append(MethodSpec(name, base.class_path, init_args, base.base, (base.name, parameter, value)))
    return added


def _label(config: dict[str, Any]) -> str:
    init_args = config.get("init_args") or {}
    name = init_args.get("name") or Path(str(init_args.get("root", config["class_path"]))).name
    category = init_args.get("category")
    return f"{name}/{category}" if category else str(name)


def _datasets(section: dict[str, Any]) -> list[DataSpec]:
    datasets = []
    for entry in _entries(section, "data"):
        for expanded in get_iterator_from_grid_dict({"data": entry}):
            config = expanded["data"]
            datasets.append(DataSpec(_label(config), config))
    labels = [d.label for d in datasets]
    if len(set(labels)) != len(labels):
        msg = f"datasets must have distinct names/categories, got {labels}."
        raise BenchmarkConfigError(msg)
    return datasets


def _check_data(data: DataSpec) -> None:
    """Missing roots and unseeded random splits, before anything runs."""
    init_args = data.config.get("init_args") or {}
    root = init_args.get("root")
    folder = data.config["class_path"].endswith("Folder")  # the public data sets download when missing
    if folder and root is not None and not Path(root).is_dir():
        msg = (
            f"dataset {data.label!r}: root {str(root)!r} does not exist (relative paths are read from the "
            f"current folder {Path.cwd()}): fix benchmark.data.init_args.root or run from the project root."
        )
        raise BenchmarkConfigError(msg)
    random_split = str(init_args.get("val_split_mode", "from_test")).lower() in {"from_test", "valsplitmode.from_test"}
    if folder and random_split and init_args.get("seed") is None:
        msg = (
            f"dataset {data.label!r}: Folder splits validation images off the test set at random without a seed, so "
            "the test set would change between runs: set init_args.val_split_mode: none (the benchmark needs no "
            "validation set) or init_args.seed."
        )
        raise BenchmarkConfigError(msg)


def plan_from_config(config: dict[str, Any], *, check_data: bool = True) -> BenchmarkPlan:
    """Read and check a benchmark config (the YAML as a dict).

    Args:
        config: The whole config: ``accelerator`` and the ``benchmark`` section.
        check_data: Check that dataset roots exist (off for unit tests of the parsing).

    Returns:
        The plan.

    Raises:
        BenchmarkConfigError: A key is missing or wrong; the message names it and the fix.
    """
    section = config.get("benchmark")
    if not isinstance(section, dict):
        msg = "the config needs a `benchmark:` section (anomalib's benchmark config format)."
        raise BenchmarkConfigError(msg)
    accelerators = config.get("accelerator", "cpu")
    accelerator = accelerators[0] if isinstance(accelerators, list) else accelerators
    if accelerator not in {"cpu", "cuda", "gpu"}:
        msg = f"accelerator must be cpu or cuda, got {accelerator!r}."
        raise BenchmarkConfigError(msg)
    unknown_keys = sorted(set(section) - set(SECTION_KEYS))
    if unknown_keys:
        hints = {key: difflib.get_close_matches(key, SECTION_KEYS, n=1) for key in unknown_keys}
        named = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        msg = f"benchmark: unknown key(s) {named}; the few-shot benchmark knows {list(SECTION_KEYS)}."
        raise BenchmarkConfigError(msg)
    shared = dict(section.get("shared") or {})
    unknown = set(shared) - set(SHARED_OPTIONS)
    if unknown:
        msg = f"benchmark.shared: unknown options {sorted(unknown)}; allowed: {list(SHARED_OPTIONS)}."
        raise BenchmarkConfigError(msg)
    if "image_size" in shared:
        _check_image_size(shared["image_size"], "benchmark.shared.image_size")
    figure7 = section.get("figure7", True)
    if not isinstance(figure7, bool):
        msg = f"benchmark.figure7 must be true or false, got {figure7!r}."
        raise BenchmarkConfigError(msg)
    seed = section.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int):
        msg = f"benchmark.seed must be an integer (e.g. 42), got {seed!r}."
        raise BenchmarkConfigError(msg)
    max_test = section.get("max_test_images")
    if max_test is not None and (isinstance(max_test, bool) or not isinstance(max_test, int) or max_test < 2):
        msg = f"benchmark.max_test_images must be an integer >= 2 or null (all), got {max_test!r}."
        raise BenchmarkConfigError(msg)
    try:
        rules = parse_rules(section.get("decision_rules"))
        line = parse_line(section.get("line_simulation"))
    except ValueError as error:
        raise BenchmarkConfigError(str(error)) from None
    plan = BenchmarkPlan(
        accelerator="cuda" if accelerator == "gpu" else accelerator,
        methods=_methods(section, shared),
        datasets=_datasets(section),
        k_shots=_int_list(section, "k_shot", [1, 2, 4], minimum=1),
        seeds=_int_list(section, "few_shot_seed", [0, 1, 2, 3, 4], minimum=0),
        output=_output_folder(section.get("output", "results/benchmark")),
        seed=seed,
        max_test_images=max_test,
        heatmap_images=_heatmap_images(section.get("heatmaps")),
        figure7=figure7,
        shared=shared,
        decision_rules=rules,
        line_simulation=line,
    )
    plan.data_configs = [data.config for data in plan.datasets]  # all of them, whatever --only runs
    if check_data:
        for data in plan.datasets:
            _check_data(data)
    return plan


def describe(plan: BenchmarkPlan) -> str:
    """One JSON line that identifies what a results folder holds (checked on resume).

    Everything that changes a row: the methods, every data set's config (all of them, also when a
    process runs ``--only`` some), k, the seeds, the shared settings and the test subset.
    """
    described: dict[str, Any] = {
        "methods": [[m.name, m.class_path, m.init_args] for m in plan.methods],
        "max_test_images": plan.max_test_images,
        "data": plan.data_configs,
        "k_shot": plan.k_shots,
        "few_shot_seed": plan.seeds,
        "shared": plan.shared,
        "seed": plan.seed,
    }
    if plan.decision_rules is not None:  # absent otherwise, so that folders of runs without rules still match
        described["decision_rules"] = asdict(plan.decision_rules)
    if plan.line_simulation is not None:
        described["line_simulation"] = asdict(plan.line_simulation)
    return json.dumps(described, sort_keys=True, default=str)
