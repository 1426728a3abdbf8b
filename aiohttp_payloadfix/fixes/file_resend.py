"""file-resend: a resent file body is the whole file, or a clear error (3.12).

Upstream: the retry case is fixed on aiohttp's 3.14 branch, in no release yet;
3.12.14 made 307/308 redirects reuse the first attempt's payload.

Affected: aiohttp >=3.12.0 (3.9-3.11 are covered by file-payload-reuse, whose
write path this release line replaced).

Symptom: aiohttp >=3.10 resends an idempotent request (PUT, DELETE) once when
a pooled connection turns out to be stale, building a new request from the
caller's file object wherever the first attempt left it: 3.12.15 sends an
empty body with ``Content-Length: 0``, or the tail of the file after a partial
first attempt, and reports success. A 307/308 of an unseekable file (a pipe)
sends an empty body. 3.12.0-3.12.7 close a file body (and BytesIO) at the end
of each write, so a redirect fails with "I/O operation on closed file".

Remedy, with the bookkeeping shared with file-payload-reuse (``_filebody``):
``ClientSession._request`` keeps a file ``data`` open for the whole call (the
close 3.12.0-3.12.7 schedule after each write is deferred to the end of the
call); each rebuild of the request rewinds the file to where the request
started, and the reads of a superseded attempt are refused under the file's
lock; a file that cannot be rewound, or that is closed (BytesIO on
3.12.0-3.12.7), fails the resend with ``FileBodyError``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from aiohttp import client, client_reqrep, payload

from .._filebody import (
    Superseded,
    build_request_scope,
    build_rewind,
    existing_state,
    guarded,
    payload_generation,
)
from .._fix import Fix, NotNeeded
from .._ledger import Patch

__all__ = ("FIX",)


def _build_read(name: str) -> Callable[[Callable[..., Any]], Any]:
    superseded: Any = (0, b"") if name == "_read_and_available_len" else b""

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: Any, *args: Any) -> Any:
            state = existing_state(self._value)
            if state is None or not state.scopes:
                return original(self, *args)
            generation = payload_generation(self, state)
            try:
                return guarded(state, generation, lambda: original(self, *args))
            except Superseded:
                # An attempt that was replaced by a resend: end its body here.
                return superseded

        return read

    return build


def _build_schedule_close(original: Callable[..., Any]) -> Callable[..., Any]:
    def _schedule_file_close(self: Any, *args: Any) -> None:
        state = existing_state(self._value)
        if state is not None and state.scopes:
            state.close_wanted = True  # carried out when the request call ends
            return
        original(self, *args)

    return _schedule_file_close


def _probe() -> Optional[str]:
    if "write_with_length" not in vars(payload.IOBasePayload):
        return NotNeeded("on the 3.9-3.11 write path file-payload-reuse does this")
    return (
        "a retried request is rebuilt from the file where the first attempt left"
        " it: an empty or truncated body"
    )


def _patches() -> Sequence[Patch]:
    patches: List[Patch] = [
        Patch(client.ClientSession, "_request", build_request_scope(False)),
        Patch(
            client_reqrep.ClientRequest,
            "update_body_from_data",
            build_rewind(by_call=False),
        ),
    ]
    for cls in (payload.IOBasePayload, payload.TextIOPayload):
        for name in ("_read_and_available_len", "_read"):
            if name in vars(cls):
                patches.append(Patch(cls, name, _build_read(name)))
    if "_schedule_file_close" in vars(payload.IOBasePayload):
        patches.append(
            Patch(payload.IOBasePayload, "_schedule_file_close", _build_schedule_close)
        )
    return patches


FIX = Fix(
    id="file-resend",
    upstream="aiohttp 3.14 branch (unreleased); redirects: 3.12.14",
    summary="retries and 307/308 redirects resend the whole file, or fail clearly",
    affected=((3, 12, 0), None),
    probe=_probe,
    patches=_patches,
)
