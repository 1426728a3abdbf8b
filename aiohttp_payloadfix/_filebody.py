"""Shared bookkeeping for file bodies: where a body starts, who may read it,
and when it may be closed.

aiohttp resends a request body on 307/308 redirects and (>=3.10) once more for
idempotent methods when a pooled connection turns out to be stale, each time
building a new request from the caller's ``data``. For a file that means:

* a *scope*: one ``ClientSession._request`` call. The file stays open for the
  whole call and is closed when it ends (or when a write still running then
  ends), never between two attempts;
* each rebuild inside the scope rewinds the file to where the request started,
  and bumps the file's *generation* under its lock: a read by a superseded
  attempt (its executor job may still be running) is refused, so it cannot
  move the position under the new attempt;
* a file that cannot be rewound, or that is already closed, makes the resend
  fail with :class:`FileBodyError` instead of sending a truncated body.

On 3.9-3.11 a ``BytesIO`` (never closed here) gets no scope: a *claim* made
when a request is built from it records where its body starts and which call
built it (by the call's timer), and a second build by the same call is the
resend. The claim is cheaper than wrapping every such call in a coroutine
(small concurrent BytesIO requests ran 1-3% faster without it, side by side).
It is a weak reference held by the request, found again through the file's
own list of weak references: no table of claims is kept (one cost 64
concurrent empty BytesIO requests about 1 us each, side by side).

Used by the fixes file-payload-reuse (3.9-3.11) and file-resend (3.12).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import threading
import weakref
from typing import Any, Callable, Dict, Optional, Set, Tuple, TypeVar

T = TypeVar("T")

__all__ = (
    "FileBodyError",
    "FileState",
    "Superseded",
    "build_request_scope",
    "build_rewind",
    "claim_of",
    "close_soon",
    "existing_state",
    "guarded",
    "is_file",
    "payload_generation",
    "read_current",
    "state_of",
    "tell",
)

_LOG = logging.getLogger("aiohttp_payloadfix")

#: Closes scheduled in the executor, kept alive until they have run.
_PENDING_CLOSES: Set[asyncio.Future[None]] = set()


#: Never a file: no ABC instance check for these (io.IOBase is an ABC).
_NOT_FILES = frozenset(
    {type(None), bytes, bytearray, memoryview, str, dict, list, tuple}
)
#: The io classes registered as io.IOBase (io.py registers them).
_FILES = frozenset(
    {
        io.BytesIO,
        io.StringIO,
        io.FileIO,
        io.BufferedReader,
        io.BufferedWriter,
        io.BufferedRandom,
        io.BufferedRWPair,
        io.TextIOWrapper,
    }
)


def is_file(obj: Any) -> bool:
    """``isinstance(obj, io.IOBase)``, without the ABC check for common types."""
    cls = type(obj)
    if cls in _NOT_FILES:
        return False
    if cls in _FILES or io.IOBase in cls.__mro__:
        return True
    return isinstance(obj, io.IOBase)


class FileBodyError(ValueError):
    """A file body cannot be (re)sent as a whole."""


class Superseded(Exception):
    """A newer attempt of the same request owns the file now."""


class FileState:
    """Per file object: where its body starts and who may read it.

    Made by ``_new_state`` only. The defaults are class attributes: a new
    state (one per file-like request) costs no ``__init__`` frame.
    """

    start: Optional[int] = None
    generation = 0
    # Serialises executor reads with the rewind of a resend.
    lock: threading.Lock
    scopes = 0  # ClientSession._request calls using this file as data
    builds = 0  # requests built from it in the current scope
    writers = 0  # writes in progress
    close_wanted = False  # a close deferred until the scope ends


#: id(file) -> (weak reference to the file, its state). Like a
#: WeakKeyDictionary, without a new weak reference for every lookup: this is
#: looked up several times for every file-like request.
_STATES: Dict[int, Tuple[weakref.ref[Any], FileState]] = {}


def existing_state(f: Any) -> Optional[FileState]:
    entry = _STATES.get(id(f))
    if entry is not None and entry[0]() is f:
        return entry[1]
    return None


def _forget(key: int, ref: weakref.ref[Any]) -> None:
    entry = _STATES.get(key)
    if entry is not None and entry[0] is ref:
        del _STATES[key]


def _new_state(f: Any) -> FileState:
    state = FileState()
    state.lock = threading.Lock()
    key = id(f)
    # partial, not a lambda: no Python frame of ours when the file dies.
    _STATES[key] = (weakref.ref(f, functools.partial(_forget, key)), state)
    return state


def state_of(f: Any) -> FileState:
    state = existing_state(f)
    if state is None:
        state = _new_state(f)
    return state


#: For payloads that read the file themselves (3.12): the generation they
#: belong to, taken at their first read or when a redirect reuses them.
_PAYLOAD_GENERATION: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def payload_generation(pl: Any, state: FileState) -> int:
    return _PAYLOAD_GENERATION.setdefault(pl, state.generation)


def tell(f: Any) -> Optional[int]:
    """The position of a seekable file, or None."""
    try:
        if not f.seekable():
            return None
        return int(f.tell())
    except (OSError, ValueError, AttributeError):
        return None


def _log_close_error(fut: asyncio.Future[None]) -> None:
    _PENDING_CLOSES.discard(fut)
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        _LOG.warning("closing a request body file failed: %r", exc)


def _close(f: Any) -> None:
    try:
        f.close()
    except ValueError:
        # aiohttp 3.12 closes the body too, in another executor thread: a
        # buffered file closed under us says "I/O operation on closed file".
        if not f.closed:
            raise


def close_soon(f: Any) -> None:
    """Close ``f`` without making anybody wait for it. BytesIO stays open."""
    if isinstance(f, io.BytesIO) or getattr(f, "closed", True):
        return
    try:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, _close, f)
    except RuntimeError:
        # No running loop, a closed loop or an executor already shut down.
        _close(f)
        return
    _PENDING_CLOSES.add(fut)
    fut.add_done_callback(_log_close_error)


def guarded(state: FileState, generation: int, call: Callable[[], T]) -> T:
    """Run a read for the attempt of ``generation``; refuse a superseded one."""
    with state.lock:
        if state.generation != generation:
            raise Superseded
        return call()


def read_current(f: Any, state: FileState, generation: int, size: int) -> Any:
    """``f.read(size)`` for the attempt of ``generation``, in an executor."""
    return guarded(state, generation, lambda: f.read(size))


def _begin_scope(f: Any) -> FileState:
    state = state_of(f)
    if state.scopes == 0:
        with state.lock:
            # A write left over from an earlier request must not read on.
            state.generation += 1
            state.start = tell(f)
            state.builds = 0
            state.close_wanted = False
    state.scopes += 1
    return state


def _end_scope(f: Any, state: FileState, close: bool) -> None:
    state.scopes -= 1
    if state.scopes == 0 and state.writers == 0 and (close or state.close_wanted):
        state.close_wanted = False
        close_soon(f)


def _closed_after_first(f: Any) -> FileBodyError:
    return FileBodyError(
        f"cannot resend the request body {f!r}: the file was closed after the"
        " first attempt"
    )


def _rewind(f: Any, state: FileState) -> None:
    state.builds += 1
    if state.builds == 1:
        return
    if getattr(f, "closed", False):
        raise _closed_after_first(f)
    with state.lock:
        state.generation += 1
        if state.start is None:
            raise FileBodyError(
                f"cannot resend the request body {f!r}: it is not seekable, so"
                " the part already sent by the first attempt cannot be read again;"
                " send bytes, a seekable file or an async generator that can be"
                " restarted"
            )
        f.seek(state.start)


class Claim(weakref.ref):  # type: ignore[type-arg]
    """3.9-3.11: a claim on a ``BytesIO`` body, made each time a request is
    built from it. A weak reference to the file that records where its body
    starts (``start``; None: the file was closed) and the timer of the
    ``ClientSession._request`` call that built the request (``call``).

    No table is kept: the request built holds its claim (``_payloadfix_claim``;
    so does a write reading the file in parts), and the file lists it among
    its weak references (``weakref.getweakrefs``). A later build from the same
    file sets ``superseded`` on it; at most one claim on a file is current.
    A claim dies with its request, so an idle process holds none.
    """

    __slots__ = ("start", "call", "superseded")
    start: Optional[int]
    call: Any
    superseded: bool


_getweakrefs = weakref.getweakrefs


def claim_of(f: Any) -> Optional[Claim]:
    """The current claim on the BytesIO ``f`` (3.9-3.11), or None."""
    for ref in _getweakrefs(f):
        if type(ref) is Claim and not ref.superseded:
            return ref
    return None


def _take_over(f: io.BytesIO, refs: Any, call: Any) -> Optional[int]:
    """Where the body of a request built from ``f`` starts, when ``f`` already
    has weak references (``refs``): every current claim is superseded (a
    write of an earlier attempt stops at its next read). A claim of the same
    call is a resend, which goes back to where that call's first build
    started; a build by another call takes the file over where it is now."""
    resent: Optional[Claim] = None
    for ref in refs:
        if type(ref) is Claim and not ref.superseded:
            ref.superseded = True
            if call is not None and ref.call is call:
                resent = ref
    if resent is None:
        return tell(f)
    if f.closed:
        raise _closed_after_first(f)
    start = resent.start
    if start is not None:
        f.seek(start)
    return start


def build_request_scope(
    close_after_success: bool, bytes_io: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``ClientSession._request`` holding a file ``data`` open for the call.

    The file is closed when the call ends (or when a write still running then
    ends). With ``close_after_success`` False (3.12, whose ``_request`` closes
    the body itself when it returns) only a failed call, or a close deferred
    during the call, closes it here. With ``bytes_io`` False a ``BytesIO``
    gets no scope (3.9-3.11: it is never closed here, and
    ``build_rewind(by_call=True)`` tells its calls apart by their timers).
    """

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        # A plain function on the fast path: no extra coroutine for other
        # bodies. ``data`` is keyword-only in every release's _request, with
        # None for its default; taken out of ``kwargs``, the usual call
        # (``post(url, data=...)``) is passed on without packing a dict again.
        def _request(
            self: Any, method: str, str_or_url: Any, *, data: Any = None, **kwargs: Any
        ) -> Any:
            cls = type(data)
            if (
                cls in _NOT_FILES
                or (cls is io.BytesIO and not bytes_io)
                or (cls is not io.BytesIO and not is_file(data))
            ):
                if kwargs:
                    return original(self, method, str_or_url, data=data, **kwargs)
                return original(self, method, str_or_url, data=data)
            kwargs["data"] = data
            if cls is io.BytesIO:
                return _in_memory(self, method, str_or_url, data, kwargs)
            return _scoped(self, method, str_or_url, data, kwargs)

        async def _in_memory(
            self: Any, method: str, str_or_url: Any, data: Any, kwargs: Any
        ) -> Any:
            # _scoped for a BytesIO, inline: it is never closed here (see
            # close_soon) and, open, always seekable.
            entry = _STATES.get(id(data))
            if entry is None or entry[0]() is not data:
                # The usual case, a new BytesIO: no earlier write to fence off.
                # (_new_state, inline.)
                state = FileState()
                state.lock = threading.Lock()
                key = id(data)
                _STATES[key] = (
                    weakref.ref(data, functools.partial(_forget, key)),
                    state,
                )
                state.start = None if data.closed else data.tell()
            elif not entry[1].scopes:
                state = entry[1]
                with state.lock:
                    state.generation += 1
                    state.start = None if data.closed else data.tell()
                    state.builds = 0
                    state.close_wanted = False
            else:
                state = entry[1]
            state.scopes += 1
            try:
                return await original(self, method, str_or_url, **kwargs)
            finally:
                # Never closed here (close_soon leaves a BytesIO open).
                state.scopes -= 1

        async def _scoped(
            self: Any, method: str, str_or_url: Any, data: Any, kwargs: Any
        ) -> Any:
            state = _begin_scope(data)
            close = True
            try:
                result = await original(self, method, str_or_url, **kwargs)
                close = close_after_success
                return result
            finally:
                _end_scope(data, state, close)

        return _request

    return build


def build_rewind(by_call: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``ClientRequest.update_body_from_data`` rewinding a resent file body.

    With ``by_call`` (3.9-3.11) a ``BytesIO`` needs no request scope: every
    ``ClientSession._request`` call makes one timer and passes it to each
    request it builds (``_timer``, set before the body on every release), so
    a second build with the same timer is a resend of the same call. Saves a
    coroutine around every BytesIO request.
    """

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        return _build_rewind(original, by_call)

    return build


def _build_rewind(original: Callable[..., Any], by_call: bool) -> Callable[..., Any]:
    def update_body_from_data(self: Any, body: Any, *args: Any, **kwargs: Any) -> None:
        cls = type(body)
        if cls is io.BytesIO and by_call:  # the common file-like body, first
            # A request is built from the BytesIO in the _request call whose
            # timer is ``call``. The first build of a call takes the file over
            # where it is now; a later one in the same call is a resend. Either
            # way the claim is a new object, so a write of an earlier attempt,
            # which compares its claim with the current one before each read,
            # stops. (Inline: this runs for every BytesIO request.)
            try:
                call = self._timer
            except AttributeError:  # (set before the body on every release)
                call = None
            refs = _getweakrefs(body)  # (usually none)
            if refs:
                start = _take_over(body, refs, call)
            else:
                try:
                    start = body.tell()
                except ValueError:  # closed
                    start = None
            claim = Claim(body)
            claim.start = start
            claim.call = call
            claim.superseded = False
            self._payloadfix_claim = claim
        elif cls in _NOT_FILES:  # bytes, str, None, ...: nothing to track
            pass
        elif cls is io.BytesIO:
            entry = _STATES.get(id(body))
            if entry is not None and entry[1].scopes and entry[0]() is body:
                state = entry[1]
                if state.builds:
                    _rewind(body, state)
                else:
                    state.builds = 1  # the first build: nothing to rewind
        else:
            if is_file(body):
                f = body
            else:
                # 3.12.14+ hands a redirect the payload of the first attempt.
                f = getattr(body, "_value", None)
                if not is_file(f):
                    f = None
            if f is not None:
                entry = _STATES.get(id(f))
                if entry is not None and entry[0]() is f and entry[1].scopes:
                    state = entry[1]
                    if state.builds:
                        _rewind(f, state)
                    else:
                        state.builds = 1  # the first build: nothing to rewind
                    if f is not body:
                        _PAYLOAD_GENERATION[body] = state.generation
        if args or kwargs:
            original(self, body, *args, **kwargs)
        else:
            original(self, body)  # a plain call is cheaper than f(*a, **kw)

    return update_body_from_data
