"""Surface textures of the synthetic data set and the camera model that finishes each image.

Each texture is a function ``(rng, size) -> float32 RGB image in [0, 1], shape (size, size, 3)``,
vectorised numpy seeded through :class:`numpy.random.Generator`, with its own nuisance variation
(illumination, texture phase, orientation and colour) so that "normal" is never pixel-identical.
:data:`TEXTURES` maps the categories of :mod:`anomalib_protorefine.data.synthetic` to them;
:func:`finish` turns a float image into the 8-bit image that is written (slight optical blur,
sensor noise, quantisation).

Example:
    >>> import numpy as np
    >>> from anomalib_protorefine.data.textures import TEXTURES, finish
    >>> rng = np.random.default_rng(0)
    >>> image = finish(TEXTURES["cast_stone"](rng, 64), rng)
    >>> image.shape, image.dtype.name
    ((64, 64, 3), 'uint8')
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from anomalib_protorefine.data.noise import Array, coords, fractal_noise, gaussian_noise, smoothstep

__all__ = ["TEXTURES", "finish"]


def _illumination(rng: np.random.Generator, size: int, strength: float) -> Array:
    """Smooth multiplicative lighting field: gain, linear gradient and a soft vignette."""
    yy, xx = coords(size)
    u, v = xx / size - 0.5, yy / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (u * np.cos(angle) + v * np.sin(angle)) * rng.uniform(0.0, 2.0 * strength)
    cy, cx = rng.uniform(-0.25, 0.25, size=2)
    vignette = -((u - cx) ** 2 + (v - cy) ** 2) * rng.uniform(0.0, 1.5 * strength)
    gain = rng.uniform(1.0 - strength, 1.0 + strength)
    return (gain * (1.0 + gradient + vignette)).astype(np.float32)


# --------------------------------------------------------------------------------------
# Textures: (rng, size) -> float32 RGB image in [0, 1], shape (size, size, 3)
# --------------------------------------------------------------------------------------
def _brushed_metal(rng: np.random.Generator, size: int) -> Array:
    scale = size / 256.0
    angle = np.deg2rad(rng.normal(0.0, 2.5))  # brushing direction jitter around horizontal
    fine = gaussian_noise(rng, size, 60.0 * scale, 0.55 * scale, angle)
    medium = gaussian_noise(rng, size, 120.0 * scale, 2.5 * scale, angle)
    broad = gaussian_noise(rng, size, 200.0 * scale, 12.0 * scale, angle)
    grain = gaussian_noise(rng, size, 0.6 * scale, 0.6 * scale, 0.0)
    amp = rng.uniform(0.8, 1.2)
    base = rng.uniform(0.50, 0.60)
    surface = base + amp * (0.045 * fine + 0.03 * medium + 0.02 * broad) + 0.012 * grain

    # Anisotropic highlight: a soft bright band across the brushing direction.
    yy, xx = coords(size)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    centre = rng.uniform(0.15, 0.85) * size
    width = rng.uniform(0.25, 0.45) * size
    highlight = rng.uniform(0.04, 0.14) * np.exp(-(((along - centre) / width) ** 2))
    lum = (surface + highlight) * _illumination(rng, size, 0.06)
    tint = np.array([0.97, 1.0, 1.04], dtype=np.float32) + rng.normal(0.0, 0.01, 3).astype(np.float32)
    return lum[..., None] * tint


def _woven_fabric(rng: np.random.Generator, size: int) -> Array:
    scale = size / 256.0
    period = 11.0 * scale * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.normal(0.0, 1.5))
    yy, xx = coords(size)
    # Low-frequency waviness of the threads.
    warp_x = 0.12 * period * gaussian_noise(rng, size, 40.0 * scale, 40.0 * scale, 0.0)
    warp_y = 0.12 * period * gaussian_noise(rng, size, 40.0 * scale, 40.0 * scale, 0.0)
    u = (xx * np.cos(angle) + yy * np.sin(angle) + warp_x) / period + rng.uniform(0, 1)
    v = (-xx * np.sin(angle) + yy * np.cos(angle) + warp_y) / period + rng.uniform(0, 1)
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - iu, v - iv

    # Cross-section profile of a round thread (dark gaps between threads).
    prof_u = np.sin(np.pi * fu) ** 0.7
    prof_v = np.sin(np.pi * fv) ** 0.7
    warp_on_top = ((iu + iv) % 2) == 0  # plain weave
    # Threads bulge where they pass over a crossing thread.
    warp_shade = prof_u * (0.72 + 0.28 * np.sin(np.pi * fv))
    weft_shade = prof_v * (0.72 + 0.28 * np.sin(np.pi * fu))

    n_threads = 4 * int(np.ceil(size / period)) + 8
    warp_jit = rng.normal(0.0, 0.035, n_threads).astype(np.float32)[iu % n_threads]
    weft_jit = rng.normal(0.0, 0.035, n_threads).astype(np.float32)[iv % n_threads]
    fibre_u = gaussian_noise(rng, size, 0.5 * scale, 5.0 * scale, angle)  # fibres along the warp
    fibre_v = gaussian_noise(rng, size, 5.0 * scale, 0.5 * scale, angle)  # fibres along the weft

    warp_lum = warp_shade * (1.0 + warp_jit + 0.05 * fibre_u)
    weft_lum = weft_shade * (1.0 + weft_jit + 0.05 * fibre_v)
    lum = np.where(warp_on_top, warp_lum, weft_lum)
    lum = 0.35 + 0.65 * lum
    hue = rng.normal(0.0, 0.006, 3).astype(np.float32)
    warp_rgb = np.array([0.60, 0.56, 0.47], dtype=np.float32) + hue
    weft_rgb = np.array([0.66, 0.62, 0.52], dtype=np.float32) + hue
    rgb = np.where(warp_on_top[..., None], warp_rgb, weft_rgb)
    return (lum * _illumination(rng, size, 0.07))[..., None] * rgb


def _cast_stone(rng: np.random.Generator, size: int) -> Array:
    scale = size / 256.0
    mottling = fractal_noise(rng, size, beta=2.2, cutoff=1.0 / (40.0 * scale))
    fine = gaussian_noise(rng, size, 0.7 * scale, 0.7 * scale, 0.0)
    medium = gaussian_noise(rng, size, 1.8 * scale, 1.8 * scale, 0.0)
    lum = 0.6 + 0.028 * mottling + 0.035 * fine + 0.03 * medium

    # Aggregate grains: sparse light and dark specks with their own colour.
    grains = gaussian_noise(rng, size, 1.3 * scale, 1.3 * scale, 0.0)
    light = smoothstep(2.0, 2.8, grains)
    dark = smoothstep(2.2, 3.0, -gaussian_noise(rng, size, 1.1 * scale, 1.1 * scale, 0.0))
    base_rgb = np.array([0.63, 0.61, 0.57], dtype=np.float32) * rng.uniform(0.94, 1.06)
    base_rgb = base_rgb + rng.normal(0.0, 0.003, 3).astype(np.float32)
    image = lum[..., None] * (base_rgb / 0.63)
    image = image * (1.0 - light[..., None]) + light[..., None] * np.array([0.86, 0.84, 0.80], dtype=np.float32)
    image = image * (1.0 - 0.22 * dark[..., None])
    return image * _illumination(rng, size, 0.06)[..., None]


#: Texture painters by category: ``(rng, size) -> float32 RGB image in [0, 1], shape (size, size, 3)``.
TEXTURES: dict[str, Callable[[np.random.Generator, int], Array]] = {
    "brushed_metal": _brushed_metal,
    "woven_fabric": _woven_fabric,
    "cast_stone": _cast_stone,
}


def finish(image: Array, rng: np.random.Generator) -> Array:
    """Camera model: slight optical blur, sensor noise and 8-bit quantisation."""
    size = image.shape[0]
    sigma = 0.5 * size / 256.0
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)
    image = image + rng.normal(0.0, 0.006, image.shape).astype(np.float32)
    return np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
