"""What the demo writes besides its table: heat maps, the decisions it would make and predict's report.

* :func:`write_heatmaps`: one PNG per defective test image, baseline and refined map side by side.
* :func:`decision_counter`: a test-time callback counting the decisions of the model's thresholds
  (good parts flagged, defects found), as a line of parts would see them.
* :func:`write_predictions`: ``anomalib``'s predict on the test images with the model's decision
  pictures (:class:`~anomalib_protorefine.visualization.DecisionVisualizer`) and per-image report
  (:class:`~anomalib_protorefine.reporting.PredictionReport`, ``predictions.csv`` / ``.json``), the
  files ``anomalib predict`` writes.

Lightning and torch are imported where they are used, so that importing this module (as the demo
does before it quiets the libraries' loggers) imports neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import torch
    from anomalib.data import Folder
    from lightning.pytorch import Callback
    from rich.console import Console
    from rich.table import Table

    from anomalib_protorefine.models import PatchCorePlus

__all__ = [
    "FILE_WIDTH",
    "METHODS",
    "METRICS",
    "NUM_HEATMAPS",
    "RunResult",
    "batch_timer",
    "decision_counter",
    "demo_console",
    "format_value",
    "render_table",
    "write_heatmaps",
    "write_predictions",
]

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
        decisions: Test decisions at the calibrated thresholds: ``good_flagged`` of ``num_good``,
            ``defects_found`` of ``num_defects`` (:class:`~anomalib_protorefine.demo_outputs.DecisionCounter`).
    """

    k: int
    method: str
    metrics: dict[str, float]
    ms_per_image: float
    num_test_images: int
    bank_size: int
    support_paths: tuple[str, ...] = field(default_factory=tuple)
    decisions: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- setup


def batch_timer() -> Callback:
    """A Lightning callback timing the test batches (from batch start to batch end).

    Example:
        >>> timer = batch_timer()
        >>> timer.seconds, timer.images
        (0.0, 0)
    """
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


def decision_counter() -> Callback:
    """A test-time callback counting the decisions against the labels: good parts flagged and defects found.

    The model's post-processor labels the batch (``pred_label``) in its own ``on_test_batch_end``,
    which Lightning calls after the trainer's callbacks: the batches are kept and read at the end
    (``counts()``). Lightning is imported here, not with the module, so the demo can quiet it first.

    Example:
        >>> decision_counter().counts()
        {'good_flagged': 0, 'num_good': 0, 'defects_found': 0, 'num_defects': 0}
    """
    from lightning.pytorch import Callback

    class DecisionCounter(Callback):
        """Keep the test batches; count their decisions on demand."""

        def __init__(self) -> None:
            self._batches: list[Any] = []

        def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any) -> None:
            """Keep the batch; its labels are read once the post-processor has decided."""
            del trainer, pl_module, batch, args
            self._batches.append(outputs)

        def counts(self) -> dict[str, int]:
            """``good_flagged`` of ``num_good`` good parts, ``defects_found`` of ``num_defects`` defective ones."""
            counts = dict.fromkeys(("good_flagged", "num_good", "defects_found", "num_defects"), 0)
            for outputs in self._batches:
                if outputs.pred_label is None:
                    continue
                truths, flags = outputs.gt_label.bool().tolist(), outputs.pred_label.bool().tolist()
                for truth, flagged in zip(truths, flags, strict=True):
                    counts["num_defects" if truth else "num_good"] += 1
                    counts["defects_found" if truth else "good_flagged"] += flagged
            return counts

    return DecisionCounter()


def write_predictions(model: PatchCorePlus, datamodule: Folder, folder: Path) -> Path:
    """Predict the test images as ``anomalib predict`` does: decision pictures and the per-image report.

    Returns:
        The report (``predictions.csv``); the pictures are in ``images/`` beside it.
    """
    from anomalib.engine import Engine

    from anomalib_protorefine.visualization import DecisionVisualizer

    model.visualizer = DecisionVisualizer(output_dir=folder / "images")
    engine = Engine(default_root_dir=folder, logger=False, enable_progress_bar=False, enable_model_summary=False)
    engine.predict(model, dataloaders=datamodule.test_dataloader(), return_predictions=False)
    return folder / "predictions.csv"


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


def format_value(value: float | None, digits: int = 3) -> str:
    """A table cell: ``value`` to ``digits`` decimals, ``"-"`` when missing.

    Example:
        >>> format_value(0.91234), format_value(None)
        ('0.912', '-')
    """
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
    table.add_column("good flagged", justify="right")
    table.add_column("defects found", justify="right")
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
            text = format_value(value)
            ties = sum(1 for r in results if r.k == result.k and r.metrics.get(metric) is not None) > 1
            cells.append(f"[bold]{text}[/bold]" if ties and value == best.get((result.k, metric)) else text)
        counts = result.decisions
        cells.append(f"{counts['good_flagged']} / {counts['num_good']}" if counts else "-")
        cells.append(f"{counts['defects_found']} / {counts['num_defects']}" if counts else "-")
        cells.append(f"{result.ms_per_image:.0f}")
        refined = "refinement/em_iterations" in result.metrics
        cells.append(format_value(result.metrics.get("refinement/em_iterations"), 1) if refined else "-")
        cells.append(format_value(result.metrics.get("refinement/sinkhorn_iterations"), 0) if refined else "-")
        last_of_k = index + 1 == len(results) or results[index + 1].k != result.k
        table.add_row(*cells, end_section=last_of_k)
    return table


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
