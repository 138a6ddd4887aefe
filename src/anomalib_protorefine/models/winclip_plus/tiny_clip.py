"""A tiny open_clip architecture for offline tests and timing (random weights, a few MB, ms per image).

It keeps what WinCLIP relies on: 240 x 240 input, 16 px patches (a 15 x 15 grid), a class token and
a projection, and a full 49408-token text vocabulary for open_clip's tokenizer; every width and
depth is tiny. Register it with :func:`register` (in-process) or pass :func:`write_config`'s JSON
path as ``backbone`` (works in subprocesses, e.g. the ``anomalib`` CLI). No CLIP weights are
needed: it is the instrument of the WinClipPlus tests, the GPU check and the WinCLIP timing script.

Example:
    >>> import tempfile
    >>> from anomalib_protorefine.models.winclip_plus import tiny_clip
    >>> tiny_clip.write_config(tempfile.mkdtemp()).name
    'protorefine-tiny-vit-16-240.json'
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TINY_CONFIG", "TINY_NAME", "register", "write_config"]

TINY_NAME = "protorefine-tiny-vit-16-240"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_config(folder: str | Path) -> Path:
    """Write the tiny config as ``<folder>/<TINY_NAME>.json`` and return its path."""
    path = Path(folder) / f"{TINY_NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CONFIG, indent=2))
    return path


def register(folder: str | Path) -> str:
    """Register the tiny config with open_clip (idempotent) and return its model name."""
    import open_clip

    if TINY_NAME not in open_clip.list_models():
        open_clip.add_model_config(write_config(folder))
    return TINY_NAME
