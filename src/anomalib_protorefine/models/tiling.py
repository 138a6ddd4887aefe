"""anomalib's tiler on torch models that cannot tile: refused with one line instead of silently ignored.

anomalib's ``TilerConfigurationCallback`` sets ``model.model.tiler`` on every torch model that has a
``tiler`` attribute and raises a bare "Model does not support tiling." on the others. A model whose
forward does not tile gets :class:`NoTiler`: the attribute exists, always ``None``, and setting a tiler
raises an error naming the model and the alternatives.

Example:
    >>> import torch
    >>> class Plain(NoTiler, torch.nn.Module):
    ...     pass
    >>> Plain().tiler is None
    True
    >>> Plain().tiler = object()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Plain does not tile images ...
"""

from __future__ import annotations

__all__ = ["NoTiler"]


class NoTiler:
    """A ``tiler`` attribute that stays ``None`` (see the module docstring)."""

    @property
    def tiler(self) -> None:
        """No tiler: anomalib's (``TilerConfigurationCallback``, ``model.model.tiler``) is refused when set."""
        return None

    @tiler.setter
    def tiler(self, value: object) -> None:
        if value is not None:
            name = type(self).__name__.removesuffix("Model")
            msg = (
                f"{name} does not tile images (anomalib's tiler would be silently ignored): leave tiling off, or "
                "use PatchCorePlus, which scores tiles against its bank and puts the maps back together; for small "
                "defects on large images raise the pre-processor's image size instead."
            )
            raise ValueError(msg)
