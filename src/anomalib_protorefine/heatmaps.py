"""Heat-map panels: the demo's rows of defective images, and the decision panel of a prediction.

One drawing for the demo's heat maps (``make demo``) and the benchmark's heat-map grids
(:mod:`anomalib_protorefine.benchmark.figures`): the input image, the input with the ground-truth
outline (red), then every method's anomaly map over the input (``jet``, half transparent) with the
ground-truth outline (white). Each map has its own colour range: the demo passes ``(0, 1)`` for
maps normalised by the model's post-processor (0.5 = the pixel threshold), the benchmark each
method's range over the images shown, so that the methods are comparable row by row.

:func:`draw_decision` / :func:`decision_figure` draw one prediction as the models' visualizer saves it
(:mod:`anomalib_protorefine.visualization`): the image with its normalised anomaly map, the outline of
the flagged area (``pred_mask``), the decision and score in the title, a ring at the peak of a part
judged defective whose flagged area is too small to see (or empty), and a colour bar labelled
:data:`COLORBAR_LABEL`.

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
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colorbar import Colorbar
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = [
    "COLORBAR_LABEL",
    "PEAK_MARK_BELOW",
    "DecisionPanel",
    "add_score_colorbar",
    "decision_figure",
    "draw_decision",
    "draw_heatmap_row",
    "overlay_heatmap",
]

#: Label of the colour bar of maps normalised by the models' post-processor.
COLORBAR_LABEL = "normalised score, 0.5 = threshold"
#: A defective part whose flagged share of the image is below this gets a ring at its peak (else it looks clean).
PEAK_MARK_BELOW = 0.002
#: Title colours of the decisions.
DECISION_COLOURS = {"defective": "tab:red", "OK": "tab:green", "undecided": "black"}


def _array(value: Any) -> np.ndarray:
    """A tensor or array as a numpy array (tensors detached and moved to the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def overlay_heatmap(
    axis: Axes,
    image: np.ndarray,
    values: Any,
    value_range: tuple[float, float],
    outline: np.ndarray | None = None,
    outline_colour: str = "white",
    linewidth: float = 0.8,
) -> AxesImage:
    """Draw ``image``, the map ``values`` over it (``jet``, half transparent) and the ``outline`` of a mask.

    The map and the mask are stretched over the whole image, whatever their size (a map at the model's
    input size over the original file, for instance).

    Returns:
        The map's image (for a colour bar).
    """
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    axis.imshow(image)
    heat = axis.imshow(_array(values), cmap="jet", vmin=value_range[0], vmax=value_range[1], alpha=0.5, extent=extent)
    if outline is not None and outline.any():
        # contour puts outline[0, 0] at (x0, y0) and outline[-1, -1] at (x1, y1): the centres of the
        # mask's corner pixels, in the image's pixels
        x_step, y_step = width / outline.shape[1], height / outline.shape[0]
        centres = (0.5 * x_step - 0.5, width - 0.5 * x_step - 0.5, 0.5 * y_step - 0.5, height - 0.5 * y_step - 0.5)
        axis.contour(outline.astype(float), levels=[0.5], colors=outline_colour, linewidths=linewidth, extent=centres)
    axis.set_xlim(extent[0], extent[1])
    axis.set_ylim(extent[2], extent[3])
    return heat


def add_score_colorbar(figure: Figure, heat: AxesImage, axes: Any, label: str = COLORBAR_LABEL) -> Colorbar:
    """A slim colour bar for normalised maps beside ``axes``, labelled ``label``."""
    colorbar = figure.colorbar(heat, ax=axes, fraction=0.025 if np.ndim(axes) else 0.046, pad=0.02, label=label)
    colorbar.solids.set_alpha(1.0)  # the scale itself opaque, although the maps are drawn half transparent
    return colorbar


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
    for axis, (_, values, value_range) in zip(axes[2:], maps, strict=False):
        heat = overlay_heatmap(axis, shown, values, value_range, outline)
    for axis, title in zip(axes, [*titles, *(name for name, _, _ in maps)], strict=False):
        axis.set_title(title, fontsize=fontsize)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.axis("off")
    return heat if heat is not None else axes[0].images[0]


class DecisionPanel(NamedTuple):
    """One prediction as :func:`draw_decision` draws it.

    Attributes:
        image: The image ``(H, W, 3)`` in ``[0, 1]`` (any size: the map and mask are stretched over it).
        anomaly_map: The normalised anomaly map ``(h, w)`` (0.5 = the pixel threshold).
        pred_mask: The flagged pixels ``(h, w)``, or ``None``.
        score: The normalised image score (0.5 = the image threshold).
        decision: ``"defective"``, ``"OK"`` or ``"undecided"``.
        name: The image's name, shown above the decision.
    """

    image: Any
    anomaly_map: Any
    pred_mask: Any
    score: float
    decision: str
    name: str | None = None


def draw_decision(axis: Axes, panel: DecisionPanel) -> AxesImage:
    """Draw one prediction: image, normalised map, flagged-area outline, decision and score, peak ring.

    Args:
        axis: The axes to draw into.
        panel: The prediction.

    Returns:
        The map's image (for a colour bar).

    Raises:
        ValueError: If the decision is not one of the three, or the mask's shape differs from the map's.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> figure, axis = plt.subplots()
        >>> panel = DecisionPanel(np.zeros((8, 12, 3)), np.eye(4), np.zeros((4, 4), bool), 0.62, "defective")
        >>> _ = draw_decision(axis, panel)
        >>> axis.get_title(), [line.get_gid() for line in axis.lines]
        ('defective · score 0.62', ['peak'])
        >>> plt.close(figure)
    """
    if panel.decision not in DECISION_COLOURS:
        msg = f"decision must be one of {tuple(DECISION_COLOURS)}, got decision={panel.decision!r}."
        raise ValueError(msg)
    shown = np.clip(_array(panel.image).astype(float), 0.0, 1.0)
    values = _array(panel.anomaly_map).astype(float).squeeze()
    mask = None if panel.pred_mask is None else _array(panel.pred_mask).squeeze() > 0.5
    if mask is not None and mask.shape != values.shape:
        msg = f"pred_mask has shape {mask.shape}, the anomaly map {values.shape}: pass both at the map's size."
        raise ValueError(msg)
    heat = overlay_heatmap(axis, shown, values, (0.0, 1.0), mask, linewidth=1.2)
    flagged = float(mask.mean()) if mask is not None else 0.0
    if panel.decision == "defective" and flagged < PEAK_MARK_BELOW and np.isfinite(values).any():
        row, col = np.unravel_index(int(np.nanargmax(values)), values.shape)
        height, width = shown.shape[:2]
        axis.plot(
            (col + 0.5) * width / values.shape[1] - 0.5,
            (row + 0.5) * height / values.shape[0] - 0.5,
            marker="o",
            markersize=14,
            markerfacecolor="none",
            markeredgecolor="magenta",
            markeredgewidth=2.0,
            gid="peak",
            clip_on=False,  # a peak on the border keeps its whole ring
        )
    title = f"{panel.decision} · score {panel.score:.2f}"
    axis.set_title(title if panel.name is None else f"{panel.name}\n{title}", color=DECISION_COLOURS[panel.decision])
    axis.set_xticks([])
    axis.set_yticks([])
    return heat


def decision_figure(panel: DecisionPanel, height: float = 4.0) -> Figure:
    """A figure of one prediction (:func:`draw_decision`) with its colour bar (:data:`COLORBAR_LABEL`).

    The figure keeps the image's aspect ratio, ``height`` inches high. It is a plain matplotlib
    ``Figure`` (no pyplot, so nothing to close and any backend): ``figure.savefig(path)``.

    Example:
        >>> figure = decision_figure(DecisionPanel(np.zeros((8, 8, 3)), np.zeros((4, 4)), None, 0.3, "OK"))
        >>> figure.axes[1].get_ylabel()
        'normalised score, 0.5 = threshold'
    """
    from matplotlib.figure import Figure

    rows, cols = np.shape(_array(panel.image))[:2]
    figure = Figure(figsize=(height * cols / rows + 1.2, height + 0.6))
    axis = figure.subplots()
    add_score_colorbar(figure, draw_decision(axis, panel), axis)
    return figure
