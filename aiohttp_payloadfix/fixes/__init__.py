"""Every fix this package knows, in the order they are applied."""

from __future__ import annotations

from typing import Tuple

from .._fix import Fix
from . import (
    cancelled_upload_close,
    chunked_file_reads,
    coalesced_headers,
    computed_lengths,
    content_length_limit,
    expect_continue_close,
    file_payload_reuse,
    file_resend,
    overlong_body_warning,
    short_body_error,
    write_bytes_signature,
)

__all__ = ("FIXES", "by_id")

FIXES: Tuple[Fix, ...] = (
    file_payload_reuse.FIX,
    # Replaces write_bytes whole, so it goes before the fixes that wrap it.
    cancelled_upload_close.FIX,
    content_length_limit.FIX,
    chunked_file_reads.FIX,
    file_resend.FIX,
    write_bytes_signature.FIX,
    short_body_error.FIX,
    overlong_body_warning.FIX,
    computed_lengths.FIX,
    # Wraps write_bytes on top of all the others.
    expect_continue_close.FIX,
    # Its own attribute (StreamWriter.write_headers), wrapped by no other fix:
    # last, so applying or reverting it never restacks the others.
    coalesced_headers.FIX,
)


def by_id(fix_id: str) -> Fix:
    for fix in FIXES:
        if fix.id == fix_id:
            return fix
    known = ", ".join(f.id for f in FIXES)
    raise ValueError(f"unknown fix id {fix_id!r} (known: {known})")
