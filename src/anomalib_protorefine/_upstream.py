"""anomalib's import-time deprecation notices about its own code, kept out of our users' output.

Importing ``anomalib.models`` (which every use of this package and every ``anomalib`` command does)
prints two ``FutureWarning`` s that no user can act on: anomalib's CFM model imports timm's old
``timm.models.layers`` path, and its Dinomaly model imports anomalib's own deprecated ``dinov2``
package. :func:`quiet_upstream_imports` ignores exactly these two messages while ``anomalib.models``
is imported, through our import (``anomalib_protorefine.models``) or through the autoload hook
(``ANOMALIB_PROTOREFINE_NO_AUTOLOAD=1`` restores anomalib's stock output); every other warning,
and these two raised by any other import, still shows.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     with quiet_upstream_imports():
    ...         warnings.warn("Importing from timm.models.layers is deprecated, please import via timm.layers",
    ...                       FutureWarning)
    ...         warnings.warn("something else", FutureWarning)
    >>> [str(w.message) for w in caught]
    ['something else']
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

#: Messages (regular expressions matched at the start) of the notices ignored while anomalib.models loads.
UPSTREAM_IMPORT_NOTICES: tuple[str, ...] = (
    r"Importing from timm\.models\.layers is deprecated",
    r"The anomalib\.models\.components\.dinov2 package is deprecated",
)


@contextlib.contextmanager
def quiet_upstream_imports() -> Iterator[None]:
    """Ignore :data:`UPSTREAM_IMPORT_NOTICES` (``FutureWarning`` only) inside the block."""
    with warnings.catch_warnings():
        for message in UPSTREAM_IMPORT_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
