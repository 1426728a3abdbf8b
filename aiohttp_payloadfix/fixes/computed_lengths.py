"""computed-lengths: the Content-Length aiohttp computes itself is true.

Upstream: none; no aiohttp release has this (beyond upstream).

Affected: every release.

Symptom: a text file's Content-Length is its size on disk, but the re-encoded
text is what is sent: a Latin-1 file with non-ASCII characters overruns on
3.11.18 and is cut silently on 3.12.15, and a CRLF file opened in text mode
sends fewer bytes than declared, so both releases hang. A file that reports
size 0 although it has content (/proc and /sys files, some FUSE files) is
declared empty: 3.11.18 then sends the content anyway (garbage on the
connection), 3.12.15 sends an empty body.

Remedy: a text file's size is unknown (so, without an explicit Content-Length,
it is sent chunked, exactly as encoded); a file whose size is reported as 0 is
of unknown size too (sent chunked: an empty file costs a few bytes, a /proc
file arrives whole). BytesIO sizes are exact and stay as they are.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from aiohttp import payload

from .._fix import Fix
from .._ledger import Patch

__all__ = ("FIX",)


def _unknown_text_size(original: Any) -> Any:
    def size(self: Any) -> Optional[int]:
        return None

    return property(size)


def _zero_is_unknown(original: Any) -> Any:
    fget = original.fget

    def size(self: Any) -> Optional[int]:
        value: Optional[int] = fget(self)
        return None if value == 0 else value

    return property(size)


def _probe() -> Optional[str]:
    return "a text file is declared by its size on disk, a /proc file as empty"


def _patches() -> Sequence[Patch]:
    # 3.9-3.11 give BufferedReaderPayload and TextIOPayload their own fstat
    # size; 3.12 has one on IOBasePayload that both inherit.
    patches: List[Patch] = [Patch(payload.TextIOPayload, "size", _unknown_text_size)]
    for cls in (payload.BufferedReaderPayload, payload.IOBasePayload):
        if "size" in vars(cls):
            patches.append(Patch(cls, "size", _zero_is_unknown))
            break
    return patches


FIX = Fix(
    id="computed-lengths",
    upstream="beyond upstream (no aiohttp release)",
    summary="text files and files reporting size 0 are sent chunked, exactly",
    affected=((3, 9, 0), None),
    probe=_probe,
    patches=_patches,
)
