"""Helpers shared by the tests of the Content-Length contract (short-body-error,
overlong-body-warning, computed-lengths, and content-length-limit, which must
be tested apart from them): the over-long policy, the package's log records,
a server that never answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import AsyncIterator, Iterator, List, Optional

from conftest import RawHTTPServer, RawRequest, Reply

import aiohttp_payloadfix
from aiohttp_payloadfix import _contract

__all__ = (
    "SIZED",
    "HoldingServer",
    "PayloadfixLog",
    "captured_log",
    "fails_short",
    "holding_server",
    "names_sent",
    "overlong_policy",
    "reports_overlong",
)

#: Body kinds (of test_content_length_limit's catalogue) whose size every
#: release knows before sending, so that a length mismatch is refused before
#: any body byte. (An unbuffered file's size is known from 3.12 on only; a
#: multipart body's when all its parts have one.)
SIZED = frozenset(
    {
        "bytes",
        "bytearray",
        "memoryview",
        "memoryview-int32",
        "str",
        "BytesIO",
        "open-rb",
        "StringIO",
        "json",
    }
)


@contextlib.contextmanager
def overlong_policy(policy: Optional[str]) -> Iterator[None]:
    """The over-long policy inside the block (None: as if never configured),
    then exactly what was configured before."""
    previous = _contract._swap_policy(policy)
    try:
        yield
    finally:
        _contract._swap_policy(previous)


def fails_short() -> bool:
    """A body shorter than its Content-Length fails with ContentLengthError."""
    return aiohttp_payloadfix.is_applied("short-body-error")


def reports_overlong() -> bool:
    """A body longer than its Content-Length is seen (the policy applies)."""
    return aiohttp_payloadfix.is_applied("overlong-body-warning")


def names_sent(message: str, count: int) -> bool:
    """The message of a short body names ``count`` as the bytes it has/sent."""
    return re.search(rf"\b(?:has|sent) {count}\b", message) is not None


class PayloadfixLog(logging.Filter):
    """Takes every record of the ``aiohttp_payloadfix`` logger, at any level,
    before a handler sees it: the test asserts on them instead of conftest's
    check, which fails a test on any WARNING it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    @property
    def messages(self) -> List[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def captured_log() -> Iterator[PayloadfixLog]:
    logger = logging.getLogger("aiohttp_payloadfix")
    capture = PayloadfixLog()
    level = logger.level
    logger.setLevel(logging.DEBUG)  # "no record at all" means at any level
    logger.addFilter(capture)
    try:
        yield capture
    finally:
        logger.removeFilter(capture)
        logger.setLevel(level)


class HoldingServer(RawHTTPServer):
    """The strict raw server, except that requests to a path in ``held`` are
    never answered: it reads the request (its whole body, when it comes) and
    waits for the next one on that connection until the client closes. A
    client that gets anything back from such a request got it from itself;
    bytes it sends afterwards are parsed (and flagged) like any others."""

    def __init__(self) -> None:
        super().__init__()
        self.held = {"/upload"}

    async def _answer(
        self, writer: asyncio.StreamWriter, request: RawRequest, reply: Reply
    ) -> None:
        if request.target.split("?")[0] in self.held:
            return
        await super()._answer(writer, request, reply)


@contextlib.asynccontextmanager
async def holding_server() -> AsyncIterator[HoldingServer]:
    server = HoldingServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
