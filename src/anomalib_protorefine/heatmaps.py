"""Heat-map panels of defective images: input, ground truth and each method's anomaly map.

One drawing for the demo's heat maps (``make demo``) and the benchmark's heat-map grids
(:mod:`anomalib_protorefine.benchmark.figures`): the input image, the input with the ground-truth
outline (red), then every method's anomaly map over the input (``jet``, half transparent) with the
ground-truth outline (white). Each map has its own colour range: the demo passes ``(0, 1)`` for
maps normalised by the model's post-processor (0.5 = the pixel threshold), the benchmark each
method's range over the images shown, so that the methods are comparable row by row.

Example:
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> import numpy as np
    >>> from anomalib_protorefine.heatmaps import draw_heatmap_row
    >>> figure, axes = plt.subplots(1, 3)
    >>> image, mask = np.zeros((8, 8, 3)), np.eye(8, dtype=bool)
    >>> heat = draw_heatmap_row(axes, image, mask, [("PatchCore", np.random.rand(8, 8), (0.0, 1.0))])
    >>> [axis.get_title() for axis in axes]
    ['input', 'ground truth', 'PatchCore']
    >>> plt.close(figure)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

__all__ = ["draw_heatmap_row"]


def _array(value: Any) -> np.ndarray:
    """A tensor or array as a numpy array (tensors detached and moved to the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def draw_heatmap_row(
    axes: Sequence[Axes],
    image: Any,
    mask: Any,
    maps: Sequence[tuple[str, Any, tuple[float, float]]],
    *,
    titles: tuple[str, str] = ("input", "ground truth"),
    fontsize: float | None = None,
) -> AxesImage:
    """Draw one defective image into ``2 + len(maps)`` axes: input, ground truth, one panel per map.

    Args:
        axes: The row's axes (at least ``2 + len(maps)``).
        image: The input ``(H, W, 3)`` in ``[0, 1]`` (array or tensor), at the maps' size.
        mask: The ground truth ``(H, W)`` (boolean, or values above 0.5 are defective).
        maps: ``(title, anomaly map (H, W), (vmin, vmax))`` for each method.
        titles: Titles of the input and ground-truth panels.
        fontsize: Font size of the titles (matplotlib's default if ``None``).

    Returns:
        The last map's image (for a colour bar).

    Raises:
        ValueError: If there are fewer axes than panels, or a map's shape differs from the image's.
    """
    if len(axes) < 2 + len(maps):
        msg = f"draw_heatmap_row needs {2 + len(maps)} axes (input, ground truth, {len(maps)} maps), got {len(axes)}."
        raise ValueError(msg)
    shown = np.clip(_array(image), 0.0, 1.0)
    outline = (_array(mask) > 0.5).astype(float)
    for name, anomaly_map in ((name, _array(values)) for name, values, _ in maps):
        if anomaly_map.shape != shown.shape[:2]:
            msg = f"anomaly map of {name!r} has shape {anomaly_map.shape}, the image {shown.shape[:2]}: resize one."
            raise ValueError(msg)
    axes[0].imshow(shown)
    axes[1].imshow(shown)
    if outline.any():
        axes[1].contour(outline, levels=[0.5], colors="red", linewidths=1.2)
    heat = None
    for axis, (_, values, (vmin, vmax)) in zip(axes[2:], maps, strict=False):
        axis.imshow(shown)
        heat = axis.imshow(_array(values), cmap="jet", vmin=vmin, vmax=vmax, alpha=0.5)
        if outline.any():
            axis.contour(outline, levels=[0.5], colors="white", linewidths=0.8)
    for axis, title in zip(axes, [*titles, *(name for name, _, _ in maps)], strict=False):
        axis.set_title(title, fontsize=fontsize)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.axis("off")
    return heat if heat is not None else axes[0].images[0]
