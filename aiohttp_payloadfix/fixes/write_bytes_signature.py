"""write-bytes-signature: ``write_bytes(writer, conn)`` works again on 3.12.

Upstream: aio-libs/aiohttp PR #11336, released in 3.12.15 (the default).

Affected: aiohttp >=3.12.0. 3.12.0 added a third parameter, ``content_length``,
to ``ClientRequest.write_bytes``; 3.12.15 gave it a default of None, but
``ClientRequest.send`` still passes three arguments, so a ``request_class``
subclass that overrides ``write_bytes`` with the 3.11 signature
``(self, writer, conn)`` fails with a TypeError on every 3.12 release.

Symptom: ``TypeError: write_bytes() missing 1 required positional argument:
'content_length'`` when code written for 3.11 calls ``write_bytes(writer,
conn)`` (3.12.0-3.12.14), and ``write_bytes() takes 3 positional arguments but
4 were given`` for a 3.11-style override (3.12.0 and newer).

Remedy: ``ClientRequest.write_bytes`` takes ``content_length=None`` and,
called without it, uses the length ``send()`` would have passed (so the
declared length is still enforced), and ``ClientRequest.send`` calls an
override that takes two arguments with two.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Optional, Sequence

from aiohttp import client_reqrep

from .._fix import Fix
from .._ledger import Patch
from .content_length_limit import BELOW, below

__all__ = ("FIX",)

_TWO_ARGS: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _takes_two(cls: type) -> bool:
    """Whether ``cls.write_bytes`` only accepts (self, writer, conn)."""
    known = _TWO_ARGS.get(cls)
    if known is None:
        try:
            params = inspect.signature(cls.write_bytes).parameters.values()  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            known = False
        else:
            kinds = [p.kind for p in params]
            known = inspect.Parameter.VAR_POSITIONAL not in kinds and (
                sum(
                    k
                    in (
                        inspect.Parameter.POSITIONAL_ONLY,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    )
                    for k in kinds
                )
                < 4
            )
        _TWO_ARGS[cls] = known
    return known


def _build_write_bytes(original: Callable[..., Any]) -> Callable[..., Any]:
    # A plain function returning the original's coroutine: no extra frame.
    def write_bytes(
        self: Any, writer: Any, conn: Any, content_length: Optional[int] = None
    ) -> Any:
        if content_length is None:
            # Called the 3.11 way: the length send() would have passed.
            content_length = self._get_content_length()
        return original(self, writer, conn, content_length)

    # Given a length it only passes the call on: the contract wrappers above
    # may go past it (content-length-limit.bypass).
    setattr(write_bytes, BELOW, below(original))
    return write_bytes


def _build_send(original: Callable[..., Any]) -> Callable[..., Any]:
    # A plain function returning the original's coroutine: no extra frame.
    def send(self: Any, conn: Any) -> Any:
        cls = type(self)
        if cls is not client_reqrep.ClientRequest and _takes_two(cls):
            override = cls.write_bytes

            def write_bytes(writer: Any, conn: Any, *_: Any) -> Any:
                return override(self, writer, conn)

            self.write_bytes = write_bytes
        return original(self, conn)

    return send


def _content_length_param() -> Optional[inspect.Parameter]:
    method = inspect.unwrap(client_reqrep.ClientRequest.write_bytes)
    return inspect.signature(method).parameters.get("content_length")


def _probe() -> Optional[str]:
    param = _content_length_param()
    if param is None:
        return None
    if param.default is inspect.Parameter.empty:
        return "write_bytes requires content_length; send() passes it to overrides"
    return "send() passes content_length to write_bytes overrides that lack it"


def _patches() -> Sequence[Patch]:
    return (
        Patch(client_reqrep.ClientRequest, "send", _build_send),
        Patch(client_reqrep.ClientRequest, "write_bytes", _build_write_bytes),
    )


FIX = Fix(
    id="write-bytes-signature",
    upstream="aio-libs/aiohttp PR #11336 (3.12.15, default only)",
    summary="3.11-style write_bytes(writer, conn) calls and overrides work",
    affected=((3, 12, 0), None),
    probe=_probe,
    patches=_patches,
)
