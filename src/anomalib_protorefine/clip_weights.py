"""open_clip weights, offline first: model names, pretrained tags, local checkpoint files.

The CLIP side of the package's weight resolution (:mod:`anomalib_protorefine.backbones` resolves the
timm backbones and DINO encoders). ``backbone`` is an open_clip model name or the path of a
model-config JSON; ``pretrained`` an open_clip tag, the path of a local checkpoint file, or ``None``
for random weights. A tag that cannot be downloaded (an air-gapped machine) is an error that names
the file to fetch and how to pass it.

Example:
    >>> from anomalib_protorefine.clip_weights import resolve_pretrained
    >>> resolve_pretrained("ViT-B-16-plus-240", None) is None
    True
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAINED",
    "create_clip",
    "pretrained_source",
    "resolve_backbone",
    "resolve_pretrained",
]

logger = logging.getLogger(__name__)

#: The CLIP architecture of WinCLIP (paper Sec. 6: ViT-B/16+ at 240 x 240 pixels).
DEFAULT_BACKBONE = "ViT-B-16-plus-240"
#: The open_clip pretrained tag of the WinCLIP weights.
DEFAULT_PRETRAINED = "laion400m_e31"
#: File suffixes taken as local checkpoint files when given as ``pretrained``.
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


def _import_open_clip() -> Any:
    """Import open_clip or explain how to install it."""
    try:
        import open_clip
    except ImportError as error:  # pragma: no cover - open_clip is a dependency of the clip extra
        msg = "WinClipPlus needs open_clip: install it with `pip install 'anomalib-protorefine[clip]'`."
        raise ImportError(msg) from error
    return open_clip


def resolve_backbone(backbone: str | Path) -> str:
    """Return the open_clip model name of ``backbone``, registering a configuration file if given one.

    Args:
        backbone: An open_clip model name (e.g. ``"ViT-B-16-plus-240"``) or the path of an open_clip
            model configuration JSON (registered with ``open_clip.add_model_config``; its file stem is
            the model name).

    Returns:
        The model name.

    Raises:
        FileNotFoundError: A ``.json`` path that does not exist.
        ValueError: An unknown model name.

    Example:
        >>> resolve_backbone("ViT-B-16-plus-240")
        'ViT-B-16-plus-240'

    """
    open_clip = _import_open_clip()
    text = str(backbone)
    if text.lower().endswith(".json"):
        path = Path(text).expanduser()
        if not path.is_file():
            msg = f"backbone={text!r} is not a file: pass an open_clip model name or an existing model-config JSON."
            raise FileNotFoundError(msg)
        open_clip.add_model_config(path)
        return path.stem
    if text not in open_clip.list_models():
        msg = (
            f"backbone={text!r} is not an open_clip model. WinCLIP uses backbone={DEFAULT_BACKBONE!r}; "
            "for a custom architecture pass the path of an open_clip model-config JSON."
        )
        raise ValueError(msg)
    return text


def pretrained_source(backbone: str, tag: str) -> tuple[str, str]:
    """Where open_clip downloads the weights ``tag`` of ``backbone`` from: ``(url, file name)``.

    Example:
        >>> url, name = pretrained_source("ViT-B-16-plus-240", "laion400m_e31")
        >>> name.endswith((".pt", ".bin"))
        True

    """
    open_clip = _import_open_clip()
    cfg = open_clip.pretrained.get_pretrained_cfg(backbone, tag)
    if cfg.get("url"):
        return cfg["url"], os.path.basename(cfg["url"])
    hub = cfg.get("hf_hub", "")
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    return f"https://huggingface.co/{repo}/resolve/main/{filename}", filename


def resolve_pretrained(backbone: str, pretrained: str | Path | None, cache_dir: str | None = None) -> str | None:
    """Turn ``pretrained`` into a local checkpoint file, downloading a tag if needed (and possible).

    Args:
        backbone: open_clip model name (see :func:`resolve_backbone`).
        pretrained: ``None`` (random weights), an open_clip pretrained tag of ``backbone`` (e.g.
            ``"laion400m_e31"``) or the path of a local checkpoint file.
        cache_dir: open_clip download cache (default: open_clip's).

    Returns:
        The checkpoint path, or ``None`` for random weights.

    Raises:
        FileNotFoundError: A checkpoint path that does not exist.
        ValueError: A tag that open_clip does not know for ``backbone``.
        RuntimeError: The tag could not be downloaded (offline); the message names the file to
            download and how to pass it.

    """
    if pretrained is None or str(pretrained).strip().lower() in {"", "none", "null", "random"}:
        return None
    open_clip = _import_open_clip()
    text = str(pretrained)
    path = Path(text).expanduser()
    if path.is_file():
        return str(path)
    looks_like_path = os.sep in text or text.startswith(("~", ".")) or text.lower().endswith(CHECKPOINT_SUFFIXES)
    cfg = open_clip.pretrained.get_pretrained_cfg(backbone, text)
    if not cfg:
        if looks_like_path:
            msg = f"pretrained={text!r} does not exist: pass the path of an existing open_clip checkpoint file."
            raise FileNotFoundError(msg)
        tags = open_clip.pretrained.list_pretrained_tags_by_model(backbone)
        msg = (
            f"pretrained={text!r} is neither a file nor an open_clip tag of {backbone}: use one of {tags}, "
            "a local checkpoint path, or None for random weights."
        )
        raise ValueError(msg)
    try:
        return open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as error:
        url, filename = pretrained_source(backbone, text)
        msg = (
            f"Could not get the CLIP weights {backbone!r} / pretrained={text!r} ({type(error).__name__}: {error}). "
            f"Offline? Download {url} (file {filename!r}) on a machine with internet access, copy it here and pass "
            f'its path: pretrained="/path/to/{filename}" (CLI: --model.pretrained /path/to/{filename}).'
        )
        raise RuntimeError(msg) from error


def create_clip(
    backbone: str | Path = DEFAULT_BACKBONE,
    pretrained: str | Path | None = DEFAULT_PRETRAINED,
    cache_dir: str | None = None,
) -> tuple[nn.Module, Any, str]:
    """Build an open_clip model offline-first: ``(clip, eval transform, model name)``.

    Example:
        >>> clip, _, name = create_clip("ViT-B-16-plus-240", pretrained=None)  # doctest: +SKIP

    """
    open_clip = _import_open_clip()
    name = resolve_backbone(backbone)
    checkpoint = resolve_pretrained(name, pretrained, cache_dir)
    if checkpoint is None:
        logger.warning("WinClipPlus: %s with RANDOM weights (pretrained=None): scores are meaningless.", name)
    clip, _, transform = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
    return clip, transform, name
