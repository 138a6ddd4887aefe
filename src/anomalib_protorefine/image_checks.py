"""Reading and checking support and calibration images: one clear error per bad file, before heavy work.

* :func:`read_image_file` reads 16-bit and float grayscale by their range (anomalib's reader flattens them);
* :func:`read_named_image` names the file and the fix when it cannot be read or is degenerate;
* :func:`check_support_images` checks a batch's shape, type and value range (raw or pre-processed).

Example:
    >>> import torch
    >>> degenerate_image_reason(torch.zeros(3, 8, 8)) is not None
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from PIL import Image

__all__ = [
    "FLAT_SPREAD",
    "FLOAT_MODES",
    "INTERPOLATION_OVERSHOOT",
    "MAX_PREPROCESSED_MAGNITUDE",
    "MIN_SUPPORT_SIDE",
    "WIDE_MODES",
    "check_support_images",
    "degenerate_image_reason",
    "read_image_file",
    "read_named_image",
]

#: Largest magnitude a pre-processed (normalised) image plausibly holds; 0-255 pixel values are far above it.
MAX_PREPROCESSED_MAGNITUDE = 20.0
#: How far past ``[0, 1]`` a resized ``[0, 1]`` image may ring: bicubic interpolation (torch's kernel, a = -0.75)
#: overshoots a sharp edge by at most 0.445 in two dimensions (positive lobes 1.1875, negative 0.1875 per axis);
#: 0-255 pixel values exceed it in any image that is not black.
INTERPOLATION_OVERSHOOT = 0.5


def check_support_images(images: torch.Tensor, *, preprocessed: bool) -> None:
    """Raise a clear error unless ``images`` is a float batch ``(k, 3, H, W)`` in the expected range.

    Raw images (``preprocessed=False``) come at the model's input size: the resize there (bicubic,
    antialiased) rings past ``[0, 1]`` at sharp edges, so values up to :data:`INTERPOLATION_OVERSHOOT`
    outside ``[0, 1]`` are accepted as they are (the query images ring alike); 0-255 values are refused.

    Args:
        images: The support images.
        preprocessed: ``True``: after the model's pre-processing (normalised, values of a few units);
            ``False``: raw images in ``[0, 1]`` (resized to the model's input size).

    Example:
        >>> check_support_images(torch.full((1, 3, 8, 8), 200.0), preprocessed=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: images hold values up to 200: they look like 0-255 pixel values, ...
    """
    if images.ndim != 4 or images.shape[0] == 0:
        msg = f"images must be a non-empty batch (k, 3, H, W), got shape {tuple(images.shape)}."
        raise ValueError(msg)
    expected = (
        "pre-processed images (model.pre_processor.transform of float images in [0, 1])"
        if preprocessed
        else "float images in [0, 1] at the model's input size"
    )
    if not images.is_floating_point():
        msg = f"images must be {expected}, got dtype {images.dtype}: convert with images.float() / 255 first."
        raise TypeError(msg)
    if images.shape[1] != 3:
        channels = images.shape[1]
        msg = (
            f"images have {channels} channel(s) (shape {tuple(images.shape)}): the models take RGB batches "
            "(k, 3, H, W): repeat a grayscale channel (images.expand(-1, 3, -1, -1)) or drop an alpha channel "
            "(images[:, :3])."
        )
        raise ValueError(msg)
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        msg = (
            f"images hold {bad} non-finite value(s) (NaN or inf) in {int((~finite).flatten(1).any(1).sum())} "
            f"image(s): expected {expected}; replace or drop those images."
        )
        raise ValueError(msg)
    high, low = float(images.max()), float(images.min())
    if preprocessed and max(abs(high), abs(low)) > MAX_PREPROCESSED_MAGNITUDE:
        msg = (
            f"images hold values up to {max(abs(high), abs(low)):.4g}: they look like 0-255 pixel values, but "
            f"fit_support expects {expected}: divide by 255 and apply model.pre_processor.transform."
        )
        raise ValueError(msg)
    if not preprocessed and (low < -INTERPOLATION_OVERSHOOT or high > 1 + INTERPOLATION_OVERSHOOT):
        msg = (
            f"images hold values in [{low:.4g}, {high:.4g}]: expected {expected} (a resize may ring up to "
            f"{INTERPOLATION_OVERSHOOT} past [0, 1]; divide 0-255 values by 255)."
        )
        raise ValueError(msg)


#: Pillow modes of 16-bit (and 32-bit integer) grayscale images, which anomalib's ``read_image`` flattens.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
#: Pillow modes of floating-point grayscale images (32-bit float TIFF), which ``convert("RGB")`` reads as zeros.
FLOAT_MODES = ("F",)


def read_image_file(path: str | Path) -> torch.Tensor:
    """Read an image as a float tensor ``(3, H, W)`` in ``[0, 1]``; 16-bit and float grayscale by their range.

    anomalib's ``read_image`` converts with Pillow's ``convert("RGB")``, which clips 16-bit values to
    255 and so reads a 16-bit image as (nearly) one flat value; here such an image is scaled by
    65535 and repeated over three channels. The same conversion reads a float image (Pillow mode
    ``"F"``, e.g. a 32-bit float TIFF) as all zeros; here its values are taken as they are when they
    lie in ``[0, 1]``, and any other range is refused. Other images are read as anomalib reads them.

    Raises:
        ValueError: A 16-bit image with values outside ``[0, 65535]``, or a float image with values
            outside ``[0, 1]`` (or not finite); the message names the file.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "wide.png"
        >>> Image.fromarray((np.arange(16, dtype=np.uint16).reshape(4, 4) * 4096)).save(path)
        >>> image = read_image_file(path)
        >>> image.shape, round(float(image.max()), 4), round(float(image[0, 0, 1]), 4)
        (torch.Size([3, 4, 4]), 0.9375, 0.0625)
    """
    with Image.open(path) as image:
        if image.mode not in (*WIDE_MODES, *FLOAT_MODES):
            return read_image(str(path), as_tensor=True)
        floating = image.mode in FLOAT_MODES
        array = np.asarray(image).astype(np.float64)
    if floating:
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            finite = array[np.isfinite(array)]
            span = f"[{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "no finite value"
            msg = (
                f"{str(path)!r} is a float image (Pillow mode 'F') with values {span}"
                f"{'' if finite.size == array.size else ' and NaN or inf'}: float images are read as they are only "
                "with finite values in [0, 1]; scale it to [0, 1], or save it as an 8- or 16-bit image."
            )
            raise ValueError(msg)
        gray = torch.from_numpy(array).float()
    else:
        if array.max() > 65535 or array.min() < 0:
            msg = f"{str(path)!r} holds integer values outside [0, 65535]: save it as an 8- or 16-bit image."
            raise ValueError(msg)
        gray = torch.from_numpy(array / 65535.0).float()
    return gray[None].expand(3, -1, -1).contiguous()


#: Shortest side (pixels) below which a support image is reported: resized to the model's input size, each
#: pixel becomes a flat block, so the image holds no texture to compare query patches with.
MIN_SUPPORT_SIDE = 16
#: Largest spread of values (per channel, in [0, 1] units: one 8-bit grey level) of an image that counts as flat.
FLAT_SPREAD = 1.0 / 255.0


def degenerate_image_reason(image: torch.Tensor) -> str | None:
    """Why a raw image ``(C, H, W)`` in ``[0, 1]`` is useless as a normal reference, or ``None`` when it is not.

    Example:
        >>> degenerate_image_reason(torch.zeros(3, 64, 64))
        'one flat colour in every pixel (channel values 0, 0, 0)'
        >>> degenerate_image_reason(torch.rand(3, 1, 40))
        '1 x 40 px (shorter side below 16 px)'
        >>> degenerate_image_reason(torch.rand(3, 64, 64)) is None
        True
    """
    height, width = image.shape[-2:]
    if min(height, width) < MIN_SUPPORT_SIDE:
        return f"{height} x {width} px (shorter side below {MIN_SUPPORT_SIDE} px)"
    values = image.detach().flatten(1).float()
    spread = values.amax(1) - values.amin(1)
    if float(spread.max()) <= FLAT_SPREAD:
        colour = ", ".join(f"{float(value):.3g}" for value in values.mean(1))
        return f"one flat colour in every pixel (channel values {colour})"
    return None


def read_named_image(path: str | Path, what: str, fix: str) -> torch.Tensor:
    """:func:`read_image_file`, with a file that cannot be read named in an ``OSError`` with ``fix``.

    Example:
        >>> read_named_image("no/such.png", "support image", "replace it.")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        OSError: Could not read support image 'no/such.png' (FileNotFoundError: ...): replace it.
    """
    try:
        return read_image_file(path)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated, corrupt or unreadable files
        msg = f"Could not read {what} {str(path)!r} ({type(error).__name__}: {error}): {fix}"
        raise OSError(msg) from error
