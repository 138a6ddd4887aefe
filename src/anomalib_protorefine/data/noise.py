"""Noise and shape primitives of the synthetic images: correlated noise fields, coordinates, smoothstep.

Vectorised numpy (FFT-based noise), seeded through :class:`numpy.random.Generator`; shared by the
surface textures (:mod:`anomalib_protorefine.data.textures`) and the defect painters
(:mod:`anomalib_protorefine.data.defects`).

Example:
    >>> import numpy as np
    >>> from anomalib_protorefine.data.noise import gaussian_noise
    >>> field = gaussian_noise(np.random.default_rng(0), 32, 4.0, 1.0, 0.0)
    >>> field.shape, round(float(field.std()), 3)
    ((32, 32), 1.0)
"""

from __future__ import annotations

import numpy as np

__all__ = ["Array", "coords", "fractal_noise", "gaussian_noise", "smoothstep"]

Array = np.ndarray


def _freq_grid(size: int) -> tuple[Array, Array]:
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    return fy, fx


def _normalise(field: Array) -> Array:
    field = field - field.mean()
    return (field / (field.std() + 1e-8)).astype(np.float32)


def gaussian_noise(rng: np.random.Generator, size: int, sigma_along: float, sigma_across: float, angle: float) -> Array:
    """Zero-mean, unit-std noise with an anisotropic Gaussian correlation (pixels).

    ``angle`` (radians) is the direction of the long correlation axis.
    """
    fy, fx = _freq_grid(size)
    f_along = fx * np.cos(angle) + fy * np.sin(angle)
    f_across = -fx * np.sin(angle) + fy * np.cos(angle)
    transfer = np.exp(-2.0 * np.pi**2 * ((sigma_along * f_along) ** 2 + (sigma_across * f_across) ** 2))
    white = rng.standard_normal((size, size), dtype=np.float32)
    return _normalise(np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size)))


def fractal_noise(rng: np.random.Generator, size: int, beta: float, cutoff: float) -> Array:
    """Zero-mean, unit-std 1/f^beta noise; ``cutoff`` (cycles/pixel) flattens the low end."""
    fy, fx = _freq_grid(size)
    radius = np.sqrt(fx**2 + fy**2)
    transfer = (radius**2 + cutoff**2) ** (-beta / 2.0)
    transfer[0, 0] = 0.0
    white = rng.standard_normal((size, size), dtype=np.float32)
    return _normalise(np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size)))


def coords(size: int) -> tuple[Array, Array]:
    """Row and column coordinates ``(size, size)`` of every pixel, float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def smoothstep(edge0: float, edge1: float, x: Array) -> Array:
    """Hermite step from 0 (``x <= edge0``) to 1 (``x >= edge1``), smooth in between."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
