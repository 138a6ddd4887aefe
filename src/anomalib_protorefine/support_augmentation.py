"""Augmented support: rotated and flipped copies of the k support images join the memory bank.

The few-shot models (``support_augmentation=`` of PatchCorePlus, AnomalyDINOPlus and WinClipPlus)
build their bank or reference embeddings from every *view* of the support images: the images
themselves, then each transform of them, in the order given. The transforms are the seven symmetries
of a square besides the identity (the dihedral group: three rotations, four reflections); they are
exact (``torch.rot90``, ``torch.flip``, transposes: no interpolation, no randomness), so the views are
the same on every run; what is
random in the bank (the coreset) is seeded by the model's ``few_shot_seed`` as without augmentation.
Only the support images are transformed, never the test images.

Example:
    >>> import torch
    >>> resolve_support_augmentation("flips")
    ('hflip', 'vflip')
    >>> image = torch.arange(4.0).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    >>> [view.flatten().tolist() for view in support_views(image, ("rot90", "hflip"))]
    [[0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 0.0, 2.0], [1.0, 0.0, 3.0, 2.0]]
    >>> view_names(["a.png"], ("rot90",))
    ('a.png', 'a.png [rot90]')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "SUPPORT_AUGMENTATION_PRESETS",
    "SUPPORT_TRANSFORMS",
    "resolve_support_augmentation",
    "support_views",
    "view_names",
]

#: The exact transforms of a support image batch ``(k, C, H, W)``, by name: rotations (counter-clockwise),
#: the mirror images left-right (``hflip``) and top-bottom (``vflip``), and the reflections across the
#: main diagonal (``transpose``) and the other diagonal (``antitranspose``).
SUPPORT_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rot90": lambda images: torch.rot90(images, 1, dims=(-2, -1)),
    "rot180": lambda images: torch.rot90(images, 2, dims=(-2, -1)),
    "rot270": lambda images: torch.rot90(images, 3, dims=(-2, -1)),
    "hflip": lambda images: torch.flip(images, dims=(-1,)),
    "vflip": lambda images: torch.flip(images, dims=(-2,)),
    "transpose": lambda images: images.transpose(-2, -1).contiguous(),
    "antitranspose": lambda images: torch.rot90(images, 2, dims=(-2, -1)).transpose(-2, -1).contiguous(),
}

#: Named lists of transforms (``support_augmentation="rotations"`` etc.).
SUPPORT_AUGMENTATION_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "flips": ("hflip", "vflip"),
    "rotations": ("rot90", "rot180", "rot270"),
    "rotations_flips": ("rot90", "rot180", "rot270", "hflip", "vflip"),
    "dihedral": ("rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"),
}


def _choices() -> str:
    presets = ", ".join(repr(name) for name in SUPPORT_AUGMENTATION_PRESETS)
    transforms = ", ".join(repr(name) for name in SUPPORT_TRANSFORMS)
    return f"a preset ({presets}) or a list of transforms ({transforms})"


def resolve_support_augmentation(value: str | Sequence[str] | bool | None) -> tuple[str, ...]:
    """The transform names of a ``support_augmentation`` argument, checked.

    Args:
        value: ``None``, ``False``, ``"none"`` or ``[]`` (no augmentation), a preset name, one
            transform name, or a list of transform names (no repeats).

    Returns:
        The transform names, in the order their views join the bank.

    Raises:
        ValueError: An unknown name or a repeated transform (the message lists the choices).
        TypeError: Neither a string nor a list of strings.

    Example:
        >>> resolve_support_augmentation(["rot180", "vflip"])
        ('rot180', 'vflip')
        >>> resolve_support_augmentation(None)
        ()
        >>> resolve_support_augmentation(["rot45"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: support_augmentation has unknown transform(s) ['rot45']: use a preset ('none', 'flips', ...
    """
    if value is None or value is False:
        return ()
    if value is True:
        msg = f"support_augmentation=True is ambiguous: use {_choices()}."
        raise ValueError(msg)
    if isinstance(value, str):
        if value in SUPPORT_AUGMENTATION_PRESETS:
            return SUPPORT_AUGMENTATION_PRESETS[value]
        if value in SUPPORT_TRANSFORMS:
            return (value,)
        msg = f"support_augmentation={value!r} is neither a preset nor a transform: use {_choices()}."
        raise ValueError(msg)
    if not isinstance(value, Sequence) or not all(isinstance(name, str) for name in value):
        msg = (
            f"support_augmentation must be a preset name or a list of transform names, got {value!r}: use {_choices()}."
        )
        raise TypeError(msg)
    unknown = [name for name in value if name not in SUPPORT_TRANSFORMS]
    if unknown:
        msg = f"support_augmentation has unknown transform(s) {unknown}: use {_choices()}."
        raise ValueError(msg)
    repeated = sorted({name for name in value if list(value).count(name) > 1})
    if repeated:
        msg = f"support_augmentation repeats {repeated}: each transform adds one view of every image; list it once."
        raise ValueError(msg)
    return tuple(value)


def support_views(images: torch.Tensor, transforms: Sequence[str]) -> list[torch.Tensor]:
    """The views of support images ``(k, C, H, W)``: the images, then each transform of them.

    A quarter turn or a diagonal reflection of non-square images swaps their height and width, so the
    views are returned as separate batches (each is embedded on its own).

    Example:
        >>> import torch
        >>> [tuple(view.shape) for view in support_views(torch.rand(2, 3, 4, 6), ("rot90", "vflip"))]
        [(2, 3, 4, 6), (2, 3, 6, 4), (2, 3, 4, 6)]
    """
    return [images, *(SUPPORT_TRANSFORMS[name](images) for name in transforms)]


def view_names(paths: Sequence[str], transforms: Sequence[str]) -> tuple[str, ...]:
    """One name per view of the support files, in bank order: ``path``, then ``path [transform]``.

    Example:
        >>> view_names(["a.png", "b.png"], ("hflip",))
        ('a.png', 'b.png', 'a.png [hflip]', 'b.png [hflip]')
    """
    return (*paths, *(f"{path} [{name}]" for name in transforms for path in paths))
