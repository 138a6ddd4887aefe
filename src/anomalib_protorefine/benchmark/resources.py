"""Peak memory of a block of code: CUDA allocations, or the growth of the process's resident set on CPU.

Example:
    >>> import torch
    >>> out = {}
    >>> with peak_memory(torch.device("cpu"), out):
    ...     x = torch.ones(1_000_000)
    >>> out["peak_mb"] >= 0
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from collections.abc import Iterator
from pathlib import Path

import torch


def status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or ``None``."""
    try:
        with Path("/proc/self/status").open() as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    """Record in ``out["peak_mb"]`` the peak memory added inside the block (CUDA allocations, or CPU RSS).

    On CPU freed heap pages are handed back (``malloc_trim``) and the process's high-water mark is
    reset (``/proc/self/clear_refs``, Linux >= 4.0) first; the value is then the growth of the
    resident set, which allocator reuse can still make smaller than the bytes allocated. Where the
    reset is impossible the value is the process's peak so far, an upper bound.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap pages back, so RSS counts new ones
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), Path("/proc/self/clear_refs").open("w") as clear:
        clear.write("5")
    before = status_kb("VmRSS") or 0
    yield
    peak = status_kb("VmHWM")
    out["peak_mb"] = (
        (peak - before) if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ) / 1024
