"""Pictures that show the decision: the models' visualizer for ``anomalib predict`` and ``Engine.test/predict``.

:class:`DecisionVisualizer` is anomalib's :class:`~anomalib.visualization.ImageVisualizer` (same output
folder, ``<default_root_dir>/images``, and file layout) that saves, per image, the demo's panel
(:func:`~anomalib_protorefine.heatmaps.decision_figure`): the original image with the normalised
anomaly map, the outline of the flagged area, ``"defective"`` / ``"OK"`` and the normalised score in
the title, a colour bar ``"normalised score, 0.5 = threshold"``, and a ring at the peak of a part judged
defective whose flagged area is empty or too small to see.

Example:
    >>> import torch
    >>> from anomalib.data import ImageBatch
    >>> batch = ImageBatch(
    ...     image=torch.rand(1, 3, 32, 48),
    ...     anomaly_map=torch.rand(1, 1, 16, 16),
    ...     pred_score=torch.tensor([0.7]),
    ...     pred_label=torch.tensor([True]),
    ...     pred_mask=torch.zeros(1, 1, 16, 16, dtype=torch.bool),
    ... )
    >>> DecisionVisualizer().visualize(batch).size[0] > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from PIL import Image

from anomalib_protorefine.heatmaps import DecisionPanel, decision_figure
from anomalib_protorefine.reporting import threshold_origin

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from matplotlib.figure import Figure

__all__ = ["DecisionVisualizer", "display_image"]


def display_image(item: Any) -> np.ndarray:
    """The picture to draw for a prediction: the original file (RGB, ``[0, 1]``) or the model's input rescaled.

    The model's input is normalised for the backbone (values outside ``[0, 1]``): it is shown with each
    channel stretched to ``[0, 1]``.

    Example:
        >>> import torch
        >>> from anomalib.data import ImageItem
        >>> display_image(ImageItem(image=torch.full((3, 4, 5), 2.0))).shape
        (4, 5, 3)
    """
    path = getattr(item, "image_path", None)
    if path:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=float) / 255.0
    pixels = item.image.detach().float().cpu().numpy()
    pixels = np.moveaxis(pixels, 0, -1) if pixels.shape[0] in (1, 3) else pixels
    if pixels.min() < 0.0 or pixels.max() > 1.0:
        low, high = pixels.min(axis=(0, 1)), pixels.max(axis=(0, 1))
        pixels = (pixels - low) / np.where(high > low, high - low, 1.0)
    return np.broadcast_to(pixels, (*pixels.shape[:2], 3))


def _scalar(value: Any) -> float | None:
    """One image's score or label as a float (anomalib's models give shape ``()`` or ``(1,)``)."""
    if value is None:
        return None
    return float(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value).reshape(-1)[0])


class DecisionVisualizer(ImageVisualizer):
    """anomalib's image visualizer drawing the decision panel (see the module docstring).

    Args:
        output_dir: Folder of the pictures (anomalib's default: ``<default_root_dir>/images``).
        height: Height of a picture in inches.
        dpi: Resolution of the saved PNGs.

    Raises:
        ValueError: If ``height`` or ``dpi`` is not positive.
    """

    def __init__(self, output_dir: str | Path | None = None, height: float = 4.0, dpi: int = 100) -> None:
        if not height > 0 or not dpi > 0:
            msg = f"DecisionVisualizer needs positive height and dpi, got height={height!r}, dpi={dpi!r}."
            raise ValueError(msg)
        super().__init__(output_dir=output_dir)
        self.height = height
        self.dpi = dpi

    def figure(self, item: Any, decided: bool = True) -> Figure:
        """The decision panel of one prediction (an ``ImageItem``); ``decided=False``: no thresholds in force."""
        label = _scalar(item.pred_label)
        decision = "undecided" if not decided or label is None else ("defective" if label else "OK")
        score = _scalar(item.pred_score)
        name = Path(item.image_path).name if getattr(item, "image_path", None) else None
        panel = DecisionPanel(
            image=display_image(item),
            anomaly_map=item.anomaly_map.detach().cpu().numpy(),
            pred_mask=None if item.pred_mask is None else item.pred_mask.detach().cpu().numpy(),
            score=float("nan") if score is None else score,
            decision=decision,
            name=name,
        )
        return decision_figure(panel, self.height)

    def visualize(self, predictions: Any) -> Image.Image | list[Image.Image | None] | None:
        """The decision panels of an item or a batch as PIL images (one image for one item, else a list)."""
        items = [predictions] if not hasattr(predictions, "batch_size") else list(predictions)
        images = [self._render(self.figure(item)) if item.anomaly_map is not None else None for item in items]
        return images[0] if len(images) == 1 else images

    def _render(self, figure: Figure) -> Image.Image:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Save each image's decision panel where anomalib's visualizer saves its picture (as PNG)."""
        del outputs, batch_idx, dataloader_idx
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        decided = threshold_origin(pl_module) != "none"
        for item in batch:
            if item.anomaly_map is None:
                continue
            path = generate_output_filename(
                input_path=item.image_path or f"image_{id(item)}.png",
                output_path=self.output_dir,
                dataset_name=getattr(datamodule, "name", None),
                category=getattr(datamodule, "category", None),
            )
            self.figure(item, decided).savefig(Path(path).with_suffix(".png"), dpi=self.dpi, bbox_inches="tight")
