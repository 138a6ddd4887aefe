"""One benchmark process per data set of a results folder: a lock file per data set, held while the run lasts.

Two processes on one ``benchmark.output`` would both see the same jobs as pending and run each of
them twice (duplicate rows in ``results.csv``). Each process therefore locks the data sets it runs
(``.running-<data set>.lock`` in the folder, an OS file lock that also ends when the process dies)
and refuses to start when another process holds one of them, naming that process. Processes with
``--only`` on different data sets still share a folder.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with OutputLock(folder, ["bsdata", "deeppcb"]):
    ...     sorted(p.name for p in folder.iterdir())
    ['.running-bsdata.lock', '.running-deeppcb.lock']
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from types import TracebackType

try:  # POSIX; elsewhere the folder is not locked (a note is logged)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .config import BenchmarkConfigError

logger = logging.getLogger(__name__)


def lock_path(folder: Path, label: str) -> Path:
    """The lock file of data set ``label`` in ``folder`` (the label made safe for a file name).

    Example:
        >>> lock_path(Path("out"), "mvtec/bottle").name
        '.running-mvtec_bottle.lock'
    """
    return folder / f".running-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.lock"


class OutputLock:
    """Hold the lock files of ``labels`` in ``folder`` inside a ``with`` block (the folder is created).

    Args:
        folder: The results folder (``benchmark.output``).
        labels: The data sets this process runs.

    Raises:
        BenchmarkConfigError: On entry, when another process holds the lock of one of the data sets;
            the message names its process id, host and the folder.
    """

    def __init__(self, folder: Path, labels: list[str]) -> None:
        self.folder = Path(folder)
        self.labels = list(labels)
        self._held: list[int] = []

    def __enter__(self) -> OutputLock:
        if fcntl is None:  # pragma: no cover - Windows
            logger.info("No file locks on this platform: %s is not guarded against a second process.", self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for label in self.labels:
            path = lock_path(self.folder, label)
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = Path(path).read_text().strip() or "another process"
                os.close(handle)
                self.release()
                msg = (
                    f"benchmark.output {str(self.folder)!r} is in use: {holder} runs data set {label!r} there. Wait "
                    "for it to end (or stop it), or choose another benchmark.output; processes share a folder only "
                    "with --only on different data sets."
                )
                raise BenchmarkConfigError(msg) from None
            os.ftruncate(handle, 0)
            os.write(handle, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
            self._held.append(handle)
        return self

    def release(self) -> None:
        """Empty and unlock the lock files held (the files stay: removing them would race with a new holder)."""
        while self._held:
            handle = self._held.pop()
            os.ftruncate(handle, 0)
            os.close(handle)  # closing the last descriptor releases the lock

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
