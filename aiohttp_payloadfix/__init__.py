"""Backports of aiohttp's request-body fixes to aiohttp 3.9-3.12, plus guards.

Importing this package patches aiohttp for the whole process (applications
import it; libraries should not). Set ``AIOHTTP_PAYLOADFIX_DISABLE=1`` to apply
nothing, or to a comma-separated list of fix ids to skip those.
"""

from ._api import FixStatus, Status, apply, is_applied, revert, status
from ._contract import ContentLengthError, configure
from ._filebody import FileBodyError
from ._ledger import PayloadFixWarning

__all__ = (
    "ContentLengthError",
    "FileBodyError",
    "FixStatus",
    "PayloadFixWarning",
    "Status",
    "__version__",
    "apply",
    "configure",
    "is_applied",
    "revert",
    "status",
)

__version__ = "0.1.0"

from ._api import apply_from_env as _apply_from_env  # noqa: E402

_apply_from_env()
