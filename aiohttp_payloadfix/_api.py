"""apply / revert / status: deciding which fixes the installed aiohttp needs."""

from __future__ import annotations

import os
import platform
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, FrozenSet, Iterable, Optional, Set, Tuple

import aiohttp

from ._fix import AIOHTTP_VERSION, Fix, NotNeeded
from ._ledger import LEDGER, PayloadFixWarning
from .fixes import FIXES, by_id

__all__ = (
    "ENV_DISABLE",
    "FixStatus",
    "Status",
    "apply",
    "apply_from_env",
    "is_applied",
    "revert",
    "status",
)

ENV_DISABLE = "AIOHTTP_PAYLOADFIX_DISABLE"
#: The first release that has every upstream fix; from here on nothing is patched.
FIXED_UPSTREAM = (3, 13, 0)
OLDEST_SUPPORTED = (3, 9, 0)
_ALL_WORDS = frozenset({"1", "true", "yes", "all", "on"})
_NONE_WORDS = frozenset({"0", "false", "no", "none", "off"})

_lock = threading.RLock()
_failed: Dict[str, str] = {}
_reverted: Set[str] = set()
_warned: Set[str] = set()
_blocked: Dict[str, str] = {}


def _active_or_unneeded(fix_id: str) -> bool:
    return LEDGER.is_applied(fix_id) or not _need(by_id(fix_id))[0]


@dataclass(frozen=True)
class FixStatus:
    id: str
    upstream: str
    summary: str
    releases: str
    needed: bool
    applied: bool
    # applied, not-needed, unsupported, disabled, failed, reverted, available
    state: str
    reason: str


@dataclass(frozen=True)
class Status:
    version: str
    aiohttp_version: str
    python_version: str
    supported: bool
    fixes: Tuple[FixStatus, ...]

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def supported() -> bool:
    """3.9.0 and newer; on 3.13+ "supported" means: correctly left alone."""
    return AIOHTTP_VERSION >= OLDEST_SUPPORTED


def _disabled_by_env() -> FrozenSet[str]:
    raw = os.environ.get(ENV_DISABLE, "").strip()
    if not raw:
        return frozenset()
    if raw.lower() in _ALL_WORDS:
        return frozenset(f.id for f in FIXES)
    if raw.lower() in _NONE_WORDS:
        return frozenset()
    ids = frozenset(part.strip() for part in raw.split(",") if part.strip())
    unknown = sorted(ids - {f.id for f in FIXES})
    if unknown:
        _warn_once(
            f"env:{raw}",
            f"{ENV_DISABLE} names unknown fix ids {unknown}; known ids:"
            f" {', '.join(f.id for f in FIXES)}",
        )
    return ids


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"aiohttp_payloadfix: {message}", PayloadFixWarning, stacklevel=4)


def _need(fix: Fix) -> Tuple[bool, str]:
    """Whether ``fix`` is needed here, and why (probe first, range as cross-check)."""
    if AIOHTTP_VERSION < OLDEST_SUPPORTED:
        return False, f"aiohttp {aiohttp.__version__} is older than 3.9: unsupported"
    if AIOHTTP_VERSION >= FIXED_UPSTREAM:
        return False, (
            f"aiohttp {aiohttp.__version__}: by design nothing is patched on 3.13"
            " and newer, which has the upstream fixes"
        )
    try:
        why = fix.probe()
    except Exception as exc:  # a probe must never break the import
        _failed[fix.id] = f"probe failed: {exc!r}"
        _warn_once(
            f"probe:{fix.id}", f"cannot tell whether {fix.id!r} is needed: {exc!r}"
        )
        return False, _failed[fix.id]
    if isinstance(why, NotNeeded):
        return False, str(why)
    in_range = fix.in_range()
    if why is None:
        note = " (although the release is in the affected range)" if in_range else ""
        return False, f"the installed aiohttp already behaves{note}"
    note = "" if in_range else " (outside the affected range; trusting the probe)"
    return True, why + note


def apply(fixes: Optional[Iterable[str]] = None) -> Tuple[str, ...]:
    """Apply the given fixes, or every one the installed aiohttp needs.

    Without ``fixes``, those disabled by the environment are skipped. A fix that
    fails is reported in :func:`status` and warned about; it never raises here.
    Returns the ids of the fixes active afterwards.
    """
    with _lock:
        if fixes is None:
            disabled = _disabled_by_env()
            chosen = [f for f in FIXES if f.id not in disabled]
        else:
            wanted = {by_id(i).id for i in fixes}
            chosen = [f for f in FIXES if f.id in wanted]
        if AIOHTTP_VERSION < OLDEST_SUPPORTED:
            _warn_once(
                "unsupported",
                f"aiohttp {aiohttp.__version__} is not supported (3.9.0 or newer);"
                " nothing was patched",
            )
            return LEDGER.applied()
        chosen_ids = {f.id for f in chosen}
        want = set(LEDGER.applied())
        for fix in FIXES:
            if fix.id in want or not _need(fix)[0]:
                continue
            # Asked for, or held back earlier only for want of a requirement.
            if fix.id not in chosen_ids and fix.id not in _blocked:
                continue
            missing = [r for r in fix.requires if r not in want and _need(by_id(r))[0]]
            if missing:
                _blocked[fix.id] = f"needs {', '.join(missing)}, which is not active"
                continue
            want.add(fix.id)
        _install(want)
        return LEDGER.applied()


def _position(fix_id: str) -> int:
    return next(i for i, f in enumerate(FIXES) if f.id == fix_id)


def _install(want: Set[str]) -> None:
    """Make the applied fixes ``want``, stacked in the order of FIXES.

    Fixes that patch the same attribute stack (write_bytes: one replaces it
    whole, the others wrap it), so a fix is never put under or over another
    out of that order: the later ones come off first and go back on after.
    """
    new = want - set(LEDGER.applied())
    if not new:
        return
    first = min(_position(i) for i in new)
    for fix_id in reversed(LEDGER.applied()):
        if _position(fix_id) > first:
            LEDGER.revert(fix_id)
    for fix in FIXES[first:]:
        if fix.id not in want or LEDGER.is_applied(fix.id):
            continue
        missing = [r for r in fix.requires if not _active_or_unneeded(r)]
        if missing:
            _blocked[fix.id] = f"needs {', '.join(missing)}, which is not active"
            continue
        _blocked.pop(fix.id, None)
        try:
            LEDGER.apply(fix.id, fix.patches())
        except Exception as exc:
            _failed[fix.id] = repr(exc)
            _warn_once(f"failed:{fix.id}", f"fix {fix.id!r} not applied: {exc!r}")
        else:
            _failed.pop(fix.id, None)
            _reverted.discard(fix.id)


def revert(fixes: Optional[Iterable[str]] = None) -> Tuple[str, ...]:
    """Undo the given fixes (default: all). Returns the ids reverted."""
    with _lock:
        if fixes is None:
            done = LEDGER.revert_all()
        else:
            ids = {by_id(i).id for i in fixes}
            applied = LEDGER.applied()
            done = tuple(i for i in reversed(applied) if i in ids)
            if not done:
                return ()
            # Later fixes may wrap the same attributes: they come off too and
            # go back on (unless they need what was reverted).
            first = min(_position(i) for i in done)
            for fix_id in reversed(applied):
                if _position(fix_id) >= first:
                    LEDGER.revert(fix_id)
            _install(set(applied) - ids)
        _reverted.update(done)
        return done


def is_applied(fix_id: Optional[str] = None) -> bool:
    """With an id: that fix is applied. Without: every fix that the installed
    aiohttp needs and the environment does not disable is applied."""
    if fix_id is not None:
        return LEDGER.is_applied(by_id(fix_id).id)
    disabled = _disabled_by_env()
    return all(
        LEDGER.is_applied(f.id)
        for f in FIXES
        if f.id not in disabled
        and not disabled.intersection(f.requires)
        and _need(f)[0]
    )


def status() -> Status:
    disabled = _disabled_by_env()
    records = []
    for fix in FIXES:
        needed, why = _need(fix)
        applied = LEDGER.is_applied(fix.id)
        if applied:
            state = "applied"
        elif fix.id in _failed:
            state, why = "failed", _failed[fix.id]
        elif AIOHTTP_VERSION < OLDEST_SUPPORTED:
            state = "unsupported"
        elif not needed:
            state = "not-needed"
        elif fix.id in _reverted:
            state = "reverted"
        elif fix.id in disabled:
            state, why = "disabled", f"disabled by {ENV_DISABLE}"
        elif fix.id in _blocked:
            state, why = "disabled", _blocked[fix.id]
        else:
            state = "available"
        records.append(
            FixStatus(
                id=fix.id,
                upstream=fix.upstream,
                summary=fix.summary,
                releases=fix.releases,
                needed=needed,
                applied=applied,
                state=state,
                reason=why,
            )
        )
    from . import __version__

    return Status(
        version=__version__,
        aiohttp_version=aiohttp.__version__,
        python_version=platform.python_version(),
        supported=supported(),
        fixes=tuple(records),
    )


def apply_from_env() -> None:
    """The import-time call: apply what is needed unless the env opts out."""
    try:
        apply()
    except Exception as exc:  # pragma: no cover - apply() already guards each fix
        _warn_once("import", f"could not apply fixes: {exc!r}")
