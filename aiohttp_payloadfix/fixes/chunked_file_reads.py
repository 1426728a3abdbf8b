"""chunked-file-reads: file uploads are read in bounded chunks again.

Upstream: aio-libs/aiohttp issue #11138, PR #11139, released in 3.12.9.

Affected: aiohttp >=3.12.0,<3.12.9 (a regression of PR #10915).

Symptom: when the file's size or the Content-Length is known, the first read
asks for the whole remaining size and later reads for the whole remaining
Content-Length: a 200 MiB upload grows the process by about 600 MiB.

Remedy: ``IOBasePayload._read_and_available_len`` and ``_read`` (and the
``TextIOPayload`` overrides) are asked for at most 64 KiB per call; the write
loop around them already continues until the size or Content-Length is done.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from aiohttp import payload

from .._fix import Fix
from .._ledger import LEDGER, Patch

__all__ = ("FIX",)

_READ_SIZE = 2**16


def _bounded(remaining: Optional[int]) -> int:
    if not remaining or remaining > _READ_SIZE:
        return _READ_SIZE
    return remaining


def _build(original: Callable[..., Any]) -> Callable[..., Any]:
    def read(self: Any, remaining_content_len: Optional[int]) -> Any:
        return original(self, _bounded(remaining_content_len))

    return read


class _Recorder:
    """A file stand-in that records how much each read asked for."""

    def __init__(self) -> None:
        self.asked: List[int] = []

    def read(self, size: int = -1) -> bytes:
        self.asked.append(size)
        return b""

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0


def _probe() -> Optional[str]:
    try:
        # As released, not as this package may have patched it already.
        first_read = LEDGER.get_original(
            payload.IOBasePayload, "_read_and_available_len"
        )
    except AttributeError:
        return None  # before 3.12: a fixed 64 KiB per read

    class _Huge(payload.BufferedReaderPayload):
        @property
        def size(self) -> Optional[int]:
            return 1 << 30

    fake = object.__new__(_Huge)
    recorder = _Recorder()
    fake._value = recorder  # type: ignore[assignment]
    first_read(fake, 1 << 30)
    if recorder.asked and recorder.asked[0] > _READ_SIZE:
        return (
            f"the first read of a file body asks for {recorder.asked[0]} bytes"
            " (the whole remaining size)"
        )
    return None


def _patches() -> Sequence[Patch]:
    return tuple(
        Patch(cls, name, _build)
        for cls in (payload.IOBasePayload, payload.TextIOPayload)
        for name in ("_read_and_available_len", "_read")
        if name in vars(cls)
    )


FIX = Fix(
    id="chunked-file-reads",
    upstream="aio-libs/aiohttp#11138, PR #11139 (3.12.9)",
    summary="file uploads are read 64 KiB at a time, not whole",
    affected=((3, 12, 0), (3, 12, 9)),
    probe=_probe,
    patches=_patches,
)
