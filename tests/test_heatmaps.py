"""The heat-map drawing shared by the demo and the benchmark."""

from __future__ import annotations

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from anomalib_protorefine.heatmaps import draw_heatmap_row


def test_row_shows_input_ground_truth_and_each_map_in_its_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((12, 16, 3))
    mask = np.zeros((12, 16), dtype=bool)
    mask[3:6, 4:9] = True
    first, second = rng.random((12, 16)), torch.rand(12, 16)
    figure, axes = plt.subplots(1, 4)
    heat = draw_heatmap_row(axes, image, torch.from_numpy(mask), [("a", first, (0.0, 1.0)), ("b", second, (0.2, 0.7))])
    assert [axis.get_title() for axis in axes] == ["input", "ground truth", "a", "b"]
    np.testing.assert_array_equal(axes[0].images[0].get_array(), image)
    # Each map lies over the input, in its own colour range.
    for axis, values, limits in ((axes[2], first, (0.0, 1.0)), (axes[3], second.numpy(), (0.2, 0.7))):
        underlay, overlay = axis.images
        np.testing.assert_array_equal(underlay.get_array(), image)
        np.testing.assert_array_equal(overlay.get_array(), values)
        assert overlay.get_clim() == limits
        assert overlay.get_alpha() == 0.5
    assert heat is axes[3].images[1]
    # The ground-truth outline on the ground-truth panel and on every map.
    assert all(len(axis.collections) == 1 for axis in axes[1:])
    assert not axes[0].collections
    plt.close(figure)


def test_row_without_defect_pixels_draws_no_outline() -> None:
    figure, axes = plt.subplots(1, 3)
    draw_heatmap_row(axes, np.zeros((8, 8, 3)), np.zeros((8, 8)), [("a", np.zeros((8, 8)), (0.0, 1.0))])
    assert not any(axis.collections for axis in axes)
    plt.close(figure)


def test_bad_shapes_and_too_few_axes_are_errors() -> None:
    figure, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="needs 4 axes"):
        draw_heatmap_row(axes, np.zeros((8, 8, 3)), np.zeros((8, 8)), [("a", np.zeros((8, 8)), (0, 1))] * 2)
    with pytest.raises(ValueError, match="anomaly map of 'a' has shape"):
        draw_heatmap_row(axes, np.zeros((8, 8, 3)), np.zeros((8, 8)), [("a", np.zeros((4, 4)), (0, 1))])
    plt.close(figure)
