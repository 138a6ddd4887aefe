"""Pre-processing whose exported form matches ``Engine.predict`` in every runtime.

anomalib's :class:`~anomalib.pre_processing.PreProcessor` applies ``transform`` in the Lightning
loops (``Engine.test/predict``) but an *export transform* in ``forward``, which is what an exported
model runs (``anomalib export``, ``TorchInferencer``, ``OpenVINOInferencer``, ONNX Runtime). anomalib
builds the export transform with ``get_exportable_transform``, which switches ``Resize`` antialiasing
off: downsampled inputs then differ, and so do the scores and the decisions. Exporting the
antialiased ``Resize`` itself is no better: ONNX's antialiased ``Resize`` is computed differently by
OpenVINO, so its scores and decisions on images of another size than the model's input differ from
torch's (README.md, "ONNX and OpenVINO").

:class:`AntialiasPreProcessor` therefore exports the antialiased resize as :class:`SeparableResize`:
the very filter weights torch uses (triangle for bilinear, Keys cubic with ``a = -0.5`` for bicubic,
stretched by the downscale factor, normalised per output pixel), computed in the graph from the
input's height and width and applied as two matrix products. Torch, ONNX Runtime and OpenVINO
compute matrix products alike, so every export decides like ``Engine.predict``, which keeps
torchvision's ``Resize`` (the two agree up to float rounding). ``CenterCrop`` becomes anomalib's
exportable crop, which computes the same.

Example:
    >>> from torchvision.transforms.v2 import Compose, Resize
    >>> pre = AntialiasPreProcessor(Compose([Resize((64, 64), antialias=True)]))
    >>> type(pre.export_transform.transforms[0]).__name__, pre.export_transform.transforms[0].antialias
    ('SeparableResize', True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import convert_center_crop_transform
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform

__all__ = ["AntialiasPreProcessor", "SeparableResize", "antialias_weights", "exportable_transform", "separable_resize"]

#: Interpolations :class:`SeparableResize` computes (torch's antialiased kernels).
SEPARABLE_INTERPOLATIONS = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


def _mode(interpolation: InterpolationMode | str | int) -> InterpolationMode | None:
    """``interpolation`` as an ``InterpolationMode`` (torchvision may store its string value), ``None`` if unknown."""
    try:
        return InterpolationMode(interpolation)
    except ValueError:
        return None


def _filter(distance: torch.Tensor, interpolation: InterpolationMode | str) -> torch.Tensor:
    """Torch's antialiasing filter at ``distance`` (in filter units): triangle, or Keys cubic with ``a = -0.5``."""
    distance = distance.abs()
    if _mode(interpolation) == InterpolationMode.BILINEAR:
        return torch.relu(1.0 - distance)
    a = -0.5
    near = ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0
    far = (((distance - 5.0) * distance + 8.0) * distance - 4.0) * a
    return torch.where(distance < 1.0, near, torch.where(distance < 2.0, far, torch.zeros_like(distance)))


def antialias_weights(line: torch.Tensor, size: int, interpolation: InterpolationMode) -> torch.Tensor:
    """The ``(size, n)`` weights of torch's antialiased resize of ``n`` input pixels to ``size`` pixels.

    ``line`` is any 1-D float tensor of length ``n`` (a row or column of the input): the weights are
    built from it with tensor operations only, so an exported graph computes them for any input size.
    Output pixel ``i`` weighs input pixel ``j`` by the filter at ``(j + 0.5 - s (i + 0.5)) / max(s, 1)``
    with ``s = n / size``, the row normalised to sum 1 (torch's ``_upsample_*_aa`` kernels).

    Example:
        >>> (7 * antialias_weights(torch.zeros(4), 2, InterpolationMode.BILINEAR)).round().tolist()
        [[3.0, 3.0, 1.0, 0.0], [0.0, 1.0, 3.0, 3.0]]
    """
    ones = torch.ones_like(line)
    length = ones.sum()
    source = torch.cumsum(ones, 0) - 0.5
    target = torch.arange(size, dtype=line.dtype, device=line.device) + 0.5
    scale = length / size
    stretch = torch.clamp(scale, min=1.0)
    weights = _filter((source[None, :] - scale * target[:, None]) / stretch, interpolation)
    return weights / weights.sum(1, keepdim=True)


def separable_resize(
    images: torch.Tensor, size: Sequence[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR
) -> torch.Tensor:
    """Torch's antialiased resize of ``(..., H, W)`` float images to ``size``, as two matrix products.

    Example:
        >>> import torch.nn.functional as F
        >>> images = torch.rand(2, 3, 37, 53)
        >>> reference = F.interpolate(images, (16, 16), mode="bicubic", antialias=True)
        >>> bool((separable_resize(images, (16, 16), InterpolationMode.BICUBIC) - reference).abs().max() < 1e-5)
        True
    """
    plane = images.reshape(-1, images.shape[-2], images.shape[-1])[0]
    rows = antialias_weights(plane[:, 0], int(size[0]), interpolation)
    cols = antialias_weights(plane[0, :], int(size[1]), interpolation)
    return rows @ images @ cols.transpose(0, 1)


class SeparableResize(Resize):
    """torchvision's antialiased ``Resize`` computed by :func:`separable_resize` (for export).

    Float images (plain tensors or ``tv_tensors.Image``) are resized as matrix products, which every
    runtime computes alike; anything else (masks, integer images) goes through torchvision's kernel.

    Args:
        size: Output ``(height, width)``.
        interpolation: ``BILINEAR`` or ``BICUBIC``.

    Raises:
        ValueError: If ``size`` is not two integers or ``interpolation`` is another mode.

    Example:
        >>> SeparableResize((8, 6))(torch.rand(3, 20, 30)).shape
        torch.Size([3, 8, 6])
    """

    def __init__(self, size: Sequence[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        if len(size) != 2:
            msg = f"SeparableResize needs size=(height, width), got size={size!r}: pass both sides."
            raise ValueError(msg)
        if _mode(interpolation) not in SEPARABLE_INTERPOLATIONS:
            msg = (
                f"SeparableResize computes interpolation BILINEAR or BICUBIC, got interpolation={interpolation!r}: "
                "keep torchvision's Resize for other modes."
            )
            raise ValueError(msg)
        super().__init__(list(size), interpolation=_mode(interpolation), antialias=True)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize float images as matrix products, anything else as torchvision does."""
        if not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point() or inpt.ndim < 2:
            return super().transform(inpt, params)
        if isinstance(inpt, tv_tensors.Image):
            resized = separable_resize(inpt.as_subclass(torch.Tensor), self.size, self.interpolation)
            return tv_tensors.wrap(resized, like=inpt)
        if not isinstance(inpt, tv_tensors.TVTensor):  # a plain tensor: an image, as torchvision reads it
            return separable_resize(inpt, self.size, self.interpolation)
        return super().transform(inpt, params)


def _separable(transform: Transform) -> Transform:
    """``transform`` with each antialiased two-sided bilinear or bicubic ``Resize`` made a :class:`SeparableResize`."""
    if isinstance(transform, Compose):
        transform.transforms = [_separable(item) for item in transform.transforms]
        return transform
    if (
        type(transform) is Resize
        and transform.antialias
        and transform.size is not None
        and len(transform.size) == 2
        and transform.max_size is None
        and _mode(transform.interpolation) in SEPARABLE_INTERPOLATIONS
    ):
        return SeparableResize(transform.size, transform.interpolation)
    return transform


def exportable_transform(transform: Transform | None) -> Transform | None:
    """A copy of ``transform`` for ``forward``/export that computes what ``transform`` computes, in every runtime.

    Unlike anomalib's ``get_exportable_transform`` it keeps the resize antialiased, as
    :class:`SeparableResize` (same weights as torch, agreeing up to float rounding).

    Example:
        >>> from torchvision.transforms.v2 import Normalize
        >>> exported = exportable_transform(Compose([Resize((8, 8)), Normalize([0.5] * 3, [0.5] * 3)]))
        >>> [type(item).__name__ for item in exported.transforms]
        ['Normalize', 'SeparableResize']
    """
    if transform is None:
        return None
    return _normalize_first(_separable(convert_center_crop_transform(copy.deepcopy(transform))))


def _normalize_first(transform: Transform) -> Transform:
    """A ``Normalize`` right after a :class:`SeparableResize` moved before it: the same values, one graph fewer bug.

    Each output pixel of the resize is a weighted mean of input pixels (weights summing to 1), so a
    per-channel affine step commutes with it. OpenVINO's CPU plugin fails to compile a static-size
    graph in which the affine step follows the resize's matrix products (it fuses the step into the
    first convolution with the wrong channel count: ``Check 'data.size() == OC' failed``).

    Example:
        >>> from torchvision.transforms.v2 import Normalize
        >>> steps = _normalize_first(Compose([SeparableResize((8, 8)), Normalize([0.5] * 3, [0.5] * 3)])).transforms
        >>> [type(item).__name__ for item in steps]
        ['Normalize', 'SeparableResize']
    """
    if not isinstance(transform, Compose):
        return transform
    steps = list(transform.transforms)
    for index in range(len(steps) - 1):
        if isinstance(steps[index], SeparableResize) and isinstance(steps[index + 1], Normalize):
            steps[index], steps[index + 1] = steps[index + 1], steps[index]
    transform.transforms = steps
    return transform


class AntialiasPreProcessor(PreProcessor):
    """A :class:`~anomalib.pre_processing.PreProcessor` whose export transform keeps resize antialiasing.

    Every exported model (torch, ONNX, OpenVINO; ``model(images)``) then scores like ``Engine.predict``
    on images of any size: ``Engine.predict`` resizes with torchvision, the exports with
    :class:`SeparableResize` (the same weights; see the module docstring).

    Args:
        transform: The transform applied to the images (and masks).
    """

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        self.export_transform = exportable_transform(self.transform)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the transform from a checkpoint, keeping antialiasing in the export transform too."""
        super().load_checkpoint_config(config)
        self.export_transform = exportable_transform(self.transform)
