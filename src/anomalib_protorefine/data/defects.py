"""Synthetic defect painters: scratches, pits and stains, painted into a float RGB image.

Used by the synthetic data set (:mod:`anomalib_protorefine.data.synthetic`, its defective test
images) and by self-calibration (:mod:`anomalib_protorefine.calibration`, defects pasted into real
support images):

* **scratch**: a thin, curved, bright or dark line of varying length and contrast;
* **pit**: a small dark blob with soft, slightly irregular edges;
* **stain**: a low-contrast, irregular colour blotch (some are quite subtle).

Each painter maps ``(image, rng, category)`` to the painted image and the defect's opacity in
``[0, 1]``; :func:`add_defect` thresholds the opacity into a mask and retries defects too small to
annotate.

Example:
    >>> import numpy as np
    >>> from anomalib_protorefine.data.defects import add_defect
    >>> painted, mask = add_defect("scratch", np.full((64, 64, 3), 0.5, np.float32), np.random.default_rng(0))
    >>> painted.dtype, mask.dtype
    (dtype('float32'), dtype('bool'))
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from anomalib_protorefine.data.noise import Array, coords, gaussian_noise, smoothstep

__all__ = ["DEFECT_TYPES", "add_defect"]

#: Defect types the painters know (``add_defect(kind, ...)``).
DEFECT_TYPES: tuple[str, ...] = ("scratch", "pit", "stain")

#: A pixel belongs to the defect mask when the defect's opacity reaches this value.
_MASK_THRESHOLD = 0.25
#: Minimum number of mask pixels (at 256 px, scaled with the image area) for a defect to count.
_MIN_DEFECT_PIXELS = 12


def _scratch(image: Array, rng: np.random.Generator, category: str) -> tuple[Array, Array]:
    size = image.shape[0]
    scale = size / 256.0
    supersample = 4
    length = rng.uniform(0.12, 0.55) * size
    start = rng.uniform(0.1, 0.9, 2) * size
    direction = rng.uniform(0, 2 * np.pi)
    end = start + length * np.array([np.cos(direction), np.sin(direction)])
    bend = rng.uniform(-0.35, 0.35) * length
    control = (start + end) / 2 + bend * np.array([-np.sin(direction), np.cos(direction)])
    t = np.linspace(0.0, 1.0, 96)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    wiggle = rng.normal(0.0, 0.25 * scale, curve.shape).cumsum(axis=0) * 0.15
    points = (curve + wiggle) * supersample  # cv2 clips strokes that leave the canvas
    thickness = max(
        1, round(rng.uniform(0.9, 2.6) * (1.3 if category == "woven_fabric" else 1.0) * scale * supersample)
    )
    # Depth profile: fades in and out, with some variation along the stroke.
    profile = np.sin(np.pi * t[:, 0]) ** 0.35 * rng.uniform(0.75, 1.0, len(t))

    canvas = np.zeros((size * supersample, size * supersample), dtype=np.uint8)
    pts = np.round(points).astype(np.int32)
    for i in range(len(pts) - 1):  # ~100 strokes, not a per-pixel loop
        level = int(255 * 0.5 * (profile[i] + profile[i + 1]))
        cv2.line(canvas, tuple(pts[i]), tuple(pts[i + 1]), level, thickness, lineType=cv2.LINE_AA)
    alpha = cv2.resize(canvas.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)

    bright = rng.random() < (0.65 if category == "brushed_metal" else 0.45)
    contrast = rng.uniform(*_SCRATCH_CONTRAST[category])
    delta = (1.0 if bright else -1.0) * contrast * alpha[..., None]
    return image + delta * (1.0 - image if bright else image), alpha


def _pit(image: Array, rng: np.random.Generator, category: str) -> tuple[Array, Array]:
    size = image.shape[0]
    scale = size / 256.0
    yy, xx = coords(size)
    cy, cx = rng.uniform(0.08, 0.92, 2) * size
    radius = rng.uniform(2.5, 9.0) * scale
    aspect = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    a = dx * np.cos(rot) + dy * np.sin(rot)
    b = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    dist = np.sqrt(a**2 + b**2)
    phi = np.arctan2(b, a)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    edge = radius * wobble
    softness = max(0.8 * scale, 0.35 * radius)
    alpha = smoothstep(-softness, softness, edge - dist)
    # Shading: the side away from the light is darker inside the pit.
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 - 0.35 * np.cos(phi - light) * np.clip(dist / (edge + 1e-6), 0, 1)
    darkness = rng.uniform(0.3, 0.65)
    factor = 1.0 - darkness * alpha * np.clip(shade, 0.0, 1.4)
    return image * factor[..., None], alpha


_SCRATCH_CONTRAST = {"brushed_metal": (0.15, 0.5), "woven_fabric": (0.3, 0.65), "cast_stone": (0.2, 0.5)}

_STAIN_STRENGTH = {"brushed_metal": (0.07, 0.25), "woven_fabric": (0.09, 0.28), "cast_stone": (0.12, 0.3)}

_STAIN_COLOURS = {
    # Multiplicative per-channel attenuation: brown rust/oil, grey grease, yellow residue.
    "brown": np.array([0.55, 0.8, 1.0], dtype=np.float32),
    "grey": np.array([1.0, 1.0, 1.0], dtype=np.float32),
    "yellow": np.array([0.05, 0.25, 1.0], dtype=np.float32),
}


def _stain(image: Array, rng: np.random.Generator, category: str) -> tuple[Array, Array]:
    size = image.shape[0]
    scale = size / 256.0
    yy, xx = coords(size)
    radius = rng.uniform(10.0, 38.0) * scale
    cy, cx = rng.uniform(0.12, 0.88, 2) * size
    aspect = rng.uniform(0.45, 1.0)
    rot = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    a = (dx * np.cos(rot) + dy * np.sin(rot)) / radius
    b = (-dx * np.sin(rot) + dy * np.cos(rot)) / (radius * aspect)
    envelope = 1.0 - (a**2 + b**2)
    blotch = gaussian_noise(rng, size, max(2.0, radius / 4.0), max(2.0, radius / 4.0), 0.0)
    field = envelope + 0.35 * blotch
    alpha = smoothstep(0.0, 0.25, field)
    # Coffee-ring effect: slightly stronger near the boundary.
    ring = np.exp(-(((field - 0.08) / 0.08) ** 2))
    opacity = np.clip(alpha * (0.75 + 0.35 * ring), 0.0, 1.0)

    colour = ("brown", "grey", "yellow")[int(rng.integers(3))]
    strength = rng.uniform(*_STAIN_STRENGTH[category])
    attenuation = 1.0 - strength * opacity[..., None] * _STAIN_COLOURS[colour]
    return image * attenuation, alpha


_DEFECTS: dict[str, Callable[[Array, np.random.Generator, str], tuple[Array, Array]]] = {
    "scratch": _scratch,
    "pit": _pit,
    "stain": _stain,
}


def _add_defect(kind: str, image: Array, rng: np.random.Generator, category: str) -> tuple[Array, Array]:
    """Paint one defect; retry (a few times) if it ends up too small to be annotated."""
    size = image.shape[0]
    min_pixels = max(4, round(_MIN_DEFECT_PIXELS * (size / 256.0) ** 2))
    for _ in range(20):
        painted, alpha = _DEFECTS[kind](image, rng, category)
        mask = alpha >= _MASK_THRESHOLD
        if mask.sum() >= min_pixels:
            return painted.astype(np.float32), mask
    msg = f"Could not place a visible {kind} defect on a {size}px image."  # pragma: no cover - practically unreachable
    raise RuntimeError(msg)  # pragma: no cover


def add_defect(
    kind: str, image: Array, rng: np.random.Generator, category: str = "brushed_metal"
) -> tuple[Array, Array]:
    """Paint one synthetic defect of ``kind`` into a square float image ``(S, S, 3)`` in ``[0, 1]``.

    Used by the generator and by self-calibration (:mod:`anomalib_protorefine.calibration`) to paste
    defects into real support images.

    Args:
        kind: One of :data:`DEFECT_TYPES` (``"scratch"``, ``"pit"``, ``"stain"``).
        image: Square float image, values in ``[0, 1]``.
        rng: Random generator (the defect's position, size and appearance).
        category: Sets the defect contrast range (``"brushed_metal"``, ``"woven_fabric"``, ``"cast_stone"``).

    Returns:
        The painted image (float32) and the defect's boolean mask ``(S, S)``.

    Example:
        >>> import numpy as np
        >>> painted, mask = add_defect("pit", np.full((64, 64, 3), 0.5, np.float32), np.random.default_rng(0))
        >>> painted.shape, bool(mask.any())
        ((64, 64, 3), True)
    """
    if kind not in _DEFECTS:
        msg = f"kind must be one of {', '.join(DEFECT_TYPES)}, got {kind!r}."
        raise ValueError(msg)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
        msg = f"image must be a square (S, S, 3) array, got shape {image.shape}."
        raise ValueError(msg)
    return _add_defect(kind, image, rng, category)
