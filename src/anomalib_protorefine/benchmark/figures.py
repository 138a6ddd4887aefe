"""Heat-map grids and the paper's Fig. 7 for the benchmark report.

For each dataset, on its first cell (smallest k, first seed), the first refined method (a
PatchCorePlus whose ``base`` is a method too) is compared with its base:

* ``heatmaps_<dataset>.png``: rows = defective test images, columns = input, ground truth, base
  map, refined map (:func:`~anomalib_protorefine.heatmaps.draw_heatmap_row`, the demo's drawing;
  each method's maps share one colour scale over the shown images);
* ``figure7_<dataset>.png``: for one query, the transform W (patches x bank entries) as a heat
  map, and for three of its patches the top-3 prototypes (bank entries with the largest weight)
  drawn as crops of the support images they come from.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import torch
from anomalib.data.utils import read_image
from PIL import Image
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from anomalib_protorefine.heatmaps import draw_heatmap_row

from .config import BenchmarkPlan, DataSpec, MethodSpec
from .features import CachedTestSet, feature_model_args
from .job import RunContext
from .methods import build_feature_model

if TYPE_CHECKING:
    from anomalib_protorefine.models import PatchCorePlus

logger = logging.getLogger(__name__)


def _save(figure: plt.Figure, path: Path) -> None:
    """Save a figure as a small PNG (256-colour palette: heat maps compress poorly in full colour)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=64, format="png")
    plt.close(figure)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def _pair(plan: BenchmarkPlan) -> tuple[MethodSpec, MethodSpec] | None:
    """(base, refined): the first cached-feature model with a refiner whose base is in the run."""
    for method in plan.methods:
        if (
            method.uses_cached_features
            and method.refines_with_options
            and method.base is not None
            and method.sweep is None
            and plan.method(method.base).uses_cached_features
            and _same_features(plan.method(method.base), method)
        ):
            return plan.method(method.base), method
    return None


def _same_features(first: MethodSpec, second: MethodSpec) -> bool:
    """Whether two cached-feature methods score the same test features (same encoder, weights and size)."""
    return first.model_class is second.model_class and feature_model_args(
        first.init_args, first.model_class
    ) == feature_model_args(second.init_args, second.model_class)


def _image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image file as ``(H, W, 3)`` in [0, 1] at ``size`` (for display)."""
    image = read_image(path, as_tensor=True)
    return TF.resize(image, list(size), antialias=True).permute(1, 2, 0).clamp(0, 1)


def _shown(labels: torch.Tensor, masks: torch.Tensor, count: int) -> list[int]:
    """Indices of up to ``count`` defective test images with a mask, spread over the test order."""
    candidates = [i for i in range(len(labels)) if labels[i] == 1 and masks[i].any()]
    if len(candidates) <= count:
        return candidates
    step = len(candidates) / count
    return [candidates[int(j * step)] for j in range(count)]


def _first_cell_model(context: RunContext, data: DataSpec, method: MethodSpec) -> PatchCorePlus:
    """``method``'s model on the run's first cell (smallest k, first seed), support drawn from ``data``."""
    model = build_feature_model(method, context.plan.k_shots[0], context.plan.seeds[0], context.device)
    model.prepare_support(context.datamodule(data))
    return model


def heatmap_grid(
    context: RunContext, data: DataSpec, models: dict[str, PatchCorePlus], test: CachedTestSet, path: Path
) -> Path:
    """Input, ground truth, base and refined maps of a few defective test images (``models``: base, refined)."""
    plan = context.plan
    k, seed = plan.k_shots[0], plan.seeds[0]
    shown = _shown(test.labels, test.masks, plan.heatmap_images)
    maps = {}
    for name, model in models.items():
        with torch.inference_mode():
            out = model.model.score_embedding(test.embeddings[shown].to(context.device), test.grid, test.image_size)
        maps[name] = out.anomaly_map.squeeze(1).cpu()
    # Each method's maps share one colour range over the images shown.
    ranges = {name: (float(values.min()), float(values.max())) for name, values in maps.items()}
    figure, axes = plt.subplots(len(shown), 2 + len(models), figsize=(9, 2.2 * len(shown)), squeeze=False)
    for row, index in enumerate(shown):
        panels = [(name, maps[name][row], ranges[name]) for name in models]
        draw_heatmap_row(axes[row], _image(test.paths[index], test.image_size), test.masks[index], panels, fontsize=8)
    figure.suptitle(f"{data.label}, {k}-shot, seed {seed}", fontsize=9)
    figure.tight_layout()
    _save(figure, path)
    return path


def figure7(
    context: RunContext, data: DataSpec, name: str, model: PatchCorePlus, test: CachedTestSet, path: Path
) -> Path:
    """W of one query as a heat map, and the top-3 prototypes of three of its patches as support-image crops.

    ``model`` is the refined method ``name`` on the run's first cell (its bank and support images).
    """
    plan = context.plan
    k, seed = plan.k_shots[0], plan.seeds[0]
    shown = _shown(test.labels, test.masks, 1) or [0]
    query = shown[0]
    bank = model.model.memory_bank
    with torch.inference_mode():
        result = model.model.refiner.refine(test.embeddings[query : query + 1].to(context.device), bank)
        scores = model.model.refiner.score_result(result)[0].cpu()
        weights = result.transform[0].cpu()
        paths = list(model.support_paths)
        support = torch.stack([model.pre_processor.transform(read_image(p, as_tensor=True)) for p in paths])
        embedding, _ = model.model.embed(support.to(context.device))
    flat = embedding.reshape(-1, embedding.shape[-1]).cpu()
    source = torch.cdist(bank.cpu().float(), flat.float()).argmin(1)  # bank entry -> (support image, patch)
    height, width = test.grid
    patch_h, patch_w = test.image_size[0] / height, test.image_size[1] / width
    order = scores.argsort(descending=True)
    patches = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]  # most, median, least anomalous
    figure = plt.figure(figsize=(10, 6))
    grid = figure.add_gridspec(3, 6)
    axis = figure.add_subplot(grid[0:2, 0:2])
    axis.imshow(_image(test.paths[query], test.image_size))
    for number, patch in enumerate(patches):
        y, x = divmod(patch, width)
        axis.add_patch(plt.Rectangle((x * patch_w, y * patch_h), patch_w, patch_h, fill=False, color="red", lw=1.5))
        axis.text(x * patch_w, y * patch_h - 2, str(number + 1), color="red", fontsize=8)
    axis.set_title("query (marked patches)", fontsize=8)
    axis.axis("off")
    axis = figure.add_subplot(grid[0:2, 2:6])
    axis.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xlabel("bank entry")
    axis.set_ylabel("query patch")
    axis.set_title(f"W ({weights.shape[0]} x {weights.shape[1]})", fontsize=8)
    images = [_image(p, test.image_size) for p in paths]
    for number, patch in enumerate(patches):
        top = weights[patch].topk(min(3, weights.shape[1]))
        for rank, (weight, entry) in enumerate(zip(top.values, top.indices, strict=True)):
            image_index, location = divmod(int(source[entry]), height * width)
            y, x = divmod(location, width)
            cy, cx = int((y + 0.5) * patch_h), int((x + 0.5) * patch_w)
            half = int(1.5 * max(patch_h, patch_w))
            crop = images[image_index][max(0, cy - half) : cy + half, max(0, cx - half) : cx + half]
            axis = figure.add_subplot(grid[2, number * 2 : number * 2 + 2]) if rank == 0 else axis
            if rank == 0:
                axis.axis("off")
                axis.set_title(f"patch {number + 1}: top-3 prototypes (W)", fontsize=8)
            inset = axis.inset_axes([rank / 3, 0, 0.31, 0.9])
            inset.imshow(crop)
            inset.set_xticks([])
            inset.set_yticks([])
            inset.set_xlabel(f"{float(weight):.2f}", fontsize=7)
    figure.suptitle(f"{data.label}: {name}, {k}-shot, seed {seed} (paper Fig. 7)", fontsize=9)
    figure.tight_layout()
    _save(figure, path)
    return path


def write_figures(plan: BenchmarkPlan) -> list[Path]:
    """Heat-map grids (and Fig. 7) of every dataset; nothing when the run has no refined/base pair."""
    pair = _pair(plan)
    if pair is None or plan.heatmap_images <= 0:
        return []
    context = RunContext(plan)
    paths = []
    for data in plan.datasets:
        slug = data.label.replace("/", "_")
        try:
            test = context.test_features(data, pair[1])
            models = {method.name: _first_cell_model(context, data, method) for method in pair}
            paths.append(heatmap_grid(context, data, models, test, plan.output / f"heatmaps_{slug}.png"))
            if plan.figure7:
                name = pair[1].name
                paths.append(figure7(context, data, name, models[name], test, plan.output / f"figure7_{slug}.png"))
        except (OSError, RuntimeError, ValueError) as error:
            logger.warning("no figures for %s: %s", data.label, error)
    return paths
