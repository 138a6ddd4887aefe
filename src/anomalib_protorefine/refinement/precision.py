"""Float32 computation whatever ``torch.autocast`` says.

Under ``precision="bf16-mixed"`` / ``"16-mixed"`` Lightning runs the model inside ``torch.autocast``,
which turns matrix products into bfloat16/float16 products even for float32 inputs. The
refinement (Gram solves, Sinkhorn costs, distances from dot products) cancels large terms and
breaks down in half precision, so the refiner and the scoring paths of the models run with
autocast disabled on the tensors' device.

Example:
    >>> import torch
    >>> from anomalib_protorefine.refinement.precision import autocast_disabled
    >>> a = torch.randn(4, 4)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), autocast_disabled(a):
    ...     (a @ a).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["autocast_disabled", "float32_compute"]

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _device_type(value: Any) -> str | None:
    """Device type of a tensor, or of the first tensor attribute of a result object."""
    if isinstance(value, torch.Tensor):
        return value.device.type
    for name in ("transform", "features", "bank"):
        tensor = getattr(value, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.device.type
    return None


@contextlib.contextmanager
def autocast_disabled(reference: Any) -> Iterator[None]:
    """Disable ``torch.autocast`` for the device type of ``reference`` (a tensor) inside the block."""
    device_type = _device_type(reference)
    if device_type is None or not torch.amp.is_autocast_available(device_type):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def float32_compute(method: _Method) -> _Method:
    """Decorate a method so that it runs with autocast disabled for its first tensor argument's device."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        reference = next((value for value in (*args, *kwargs.values()) if _device_type(value) is not None), None)
        with autocast_disabled(reference):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
