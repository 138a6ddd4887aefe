"""WinCLIP+: few-shot WinCLIP with test-time prototype refinement (see README.md beside this file)."""

from .lightning_model import WinClipPlus
from .torch_model import WinClipPlusModel

__all__ = ["WinClipPlus", "WinClipPlusModel"]
