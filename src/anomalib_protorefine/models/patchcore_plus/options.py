"""Stateless checks of PatchCorePlus's arguments and checkpoints (each error names the parameter and the fix).

Example:
    >>> validate_layers(["layer2", "layer3"])
    ('layer2', 'layer3')
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AUGMENTED_BANKS",
    "check_architecture",
    "validate_augmented_bank",
    "validate_image_size",
    "validate_layers",
    "validate_online_options",
]

#: Sizes of a bank built from augmented support (``augmented_bank``).
AUGMENTED_BANKS = ("grow", "constant")


def check_architecture(checkpoint: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise one clear error when a checkpoint cannot fit this PatchCorePlus (before any state is loaded).

    Example:
        >>> check_architecture({"hyper_parameters": {"backbone": "resnet18", "layers": ["layer2"]}},
        ...                    {"backbone": "resnet18", "layers": ("layer2",)})
        >>> check_architecture({"hyper_parameters": {"backbone": "resnet18", "layers": ["layer2"]}},
        ...                    {"backbone": "wide_resnet50_2", "layers": ("layer2", "layer3")})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the checkpoint was made with backbone='resnet18', layers=['layer2'] ...
    """
    stored = checkpoint.get("hyper_parameters") or {}
    state = checkpoint.get("state_dict") or {}
    if "layers" not in stored or any(key.startswith("model.clip.") for key in state):
        kind = "a WinClipPlus checkpoint" if any(key.startswith("model.clip.") for key in state) else "not one"
        msg = (
            f"this is not a PatchCorePlus checkpoint ({kind}: no backbone layers in its hyper_parameters): load it "
            "with the model that wrote it (e.g. --model WinClipPlus), or pass a PatchCorePlus checkpoint."
        )
        raise ValueError(msg)
    made = {"backbone": stored.get("backbone"), "layers": list(stored.get("layers") or [])}
    wanted = {"backbone": current.get("backbone"), "layers": list(current.get("layers") or [])}
    if made != wanted:
        layers = ", ".join(made["layers"])
        msg = (
            f"the checkpoint was made with backbone={made['backbone']!r}, layers={made['layers']} but this model has "
            f"backbone={wanted['backbone']!r}, layers={wanted['layers']}: its memory bank holds those features. Build "
            f"the model with them (CLI: --model.backbone {made['backbone']} --model.layers '[{layers}]'), or use a "
            "checkpoint made with this backbone."
        )
        raise ValueError(msg)


def validate_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """Return ``layers`` as a tuple of layer names, or raise an error that names ``layers`` and the fix.

    Example:
        >>> validate_layers(["layer2", "layer3"])
        ('layer2', 'layer3')
        >>> validate_layers("layer2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: layers must be a list of layer names, got the string 'layer2': pass ['layer2'] ...
    """
    if isinstance(layers, str):
        msg = (
            f"layers must be a list of layer names, got the string {layers!r}: pass [{layers!r}] "
            f"(CLI: --model.layers '[{layers}]')."
        )
        raise ValueError(msg)
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(layer, str) and layer for layer in layers):
        msg = (
            f"layers must be a non-empty list of layer names, got {layers!r}. Use e.g. layers=['layer2', 'layer3'] "
            "(CLI: --model.layers '[layer2, layer3]')."
        )
        raise ValueError(msg)
    return tuple(layers)


def validate_online_options(online: bool, online_capacity: int | None) -> None:
    """Raise an error naming the option unless ``online`` is a bool and ``online_capacity`` a positive int or None.

    Example:
        >>> validate_online_options(True, 2.5)
        Traceback (most recent call last):
        ...
        TypeError: online_capacity must be a positive integer or None, got float 2.5. Use e.g. online_capacity=1000.
    """
    if not isinstance(online, bool):
        msg = f"online must be True or False, got {online!r}."
        raise TypeError(msg)
    if online_capacity is None:
        return
    if isinstance(online_capacity, bool) or not isinstance(online_capacity, numbers.Integral):
        msg = (
            f"online_capacity must be a positive integer or None, got {type(online_capacity).__name__} "
            f"{online_capacity!r}. Use e.g. online_capacity=1000."
        )
        raise TypeError(msg)
    if online_capacity < 1:
        msg = f"online_capacity must be a positive integer or None, got {online_capacity!r}. Use e.g. 1000."
        raise ValueError(msg)


def validate_augmented_bank(augmented_bank: object) -> str:
    """``augmented_bank``, checked: ``"grow"`` or ``"constant"``.

    Example:
        >>> validate_augmented_bank("constant")
        'constant'
        >>> validate_augmented_bank("fixed")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: augmented_bank must be 'grow' or 'constant', got 'fixed': ...
    """
    if augmented_bank not in AUGMENTED_BANKS:
        msg = (
            f"augmented_bank must be 'grow' or 'constant', got {augmented_bank!r}: 'constant' keeps the bank of "
            "augmented support at the size of the unaugmented one (CLI --model.augmented_bank constant)."
        )
        raise ValueError(msg)
    return str(augmented_bank)


def validate_image_size(image_size: object, pre_processor: object) -> tuple[int, int] | None:
    """``image_size`` as ``(height, width)``, checked (``None``: the default pre-processor's 256 x 256).

    Example:
        >>> validate_image_size(512, True), validate_image_size([256, 624], True), validate_image_size(None, False)
        ((512, 512), (256, 624), None)
        >>> validate_image_size(0, True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: image_size must be a positive integer or [height, width] of positive integers, got 0: ...
    """
    if image_size is None:
        return None
    pair = isinstance(image_size, Sequence) and not isinstance(image_size, str)
    sizes = list(image_size) if pair else [image_size]  # type: ignore[call-overload]
    valid = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in sizes)
    if len(sizes) != (2 if pair else 1) or not valid:
        msg = (
            f"image_size must be a positive integer or [height, width] of positive integers, got {image_size!r}: "
            "e.g. image_size=512 (CLI --model.image_size 512) or image_size=[256, 624]."
        )
        raise ValueError(msg)
    if pre_processor is not True:
        msg = (
            "image_size sets the size of the default pre-processor, but pre_processor was given too: drop image_size "
            "and build the pre-processor at that size (PatchCorePlus.configure_pre_processor(image_size=...)), "
            "or drop pre_processor."
        )
        raise ValueError(msg)
    height, width = (int(v) for v in sizes) if pair else (int(sizes[0]), int(sizes[0]))
    return height, width
