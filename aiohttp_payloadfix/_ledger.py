"""The patch ledger: the only code in this package that sets attributes on aiohttp.

Every write is recorded with its exact inverse:

* the original is read from ``vars(owner)`` along the MRO (never ``getattr``),
  so a classmethod/staticmethod descriptor or a plain function comes back as the
  very object that was there, and an attribute the owner only inherited is
  deleted again on revert instead of being copied down;
* the first saved original wins: applying again never records one of our own
  replacements as "original";
* one fix is applied all-or-nothing: if a later step fails, the steps already
  taken are undone before the error propagates;
* revert restores only where our replacement is still on top. If another
  library wrapped it since, its wrapper (and therefore ours, underneath) is
  left alone and a :class:`PayloadFixWarning` says so. Should ours come back
  on top (a mock, stopped, puts back what it found), the next apply or revert
  restores the original first, instead of wrapping ours again or keeping it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = (
    "MARKER",
    "Ledger",
    "Patch",
    "PayloadFixWarning",
    "LEDGER",
)

#: Attribute set on every replacement; its value is the id of the fix.
MARKER = "__aiohttp_payloadfix__"

_MISSING: Any = object()


class PayloadFixWarning(RuntimeWarning):
    """Something this package did to aiohttp did not go as planned."""


@dataclass(frozen=True)
class Patch:
    """One attribute to replace.

    ``build`` receives the current value, as stored on the class that defines
    it (a classmethod/staticmethod comes as the descriptor), and returns the
    replacement.
    """

    owner: type
    name: str
    build: Callable[[Any], Any]


@dataclass
class _Record:
    fix_id: str
    owner: type
    name: str
    original: Any  # _MISSING when the attribute was inherited
    replacement: Any


def _resolve(owner: type, name: str) -> Tuple[Any, Optional[type]]:
    """Return the attribute as stored on the class that defines it."""
    for klass in owner.__mro__:
        if name in vars(klass):
            return vars(klass)[name], klass
    return _MISSING, None


def _mark(replacement: Any, fix_id: str, wrapped: Any) -> None:
    target = replacement
    if isinstance(target, (staticmethod, classmethod)):
        target = target.__func__
    try:
        setattr(target, MARKER, fix_id)
        if wrapped is not _MISSING and not hasattr(target, "__wrapped__"):
            target.__wrapped__ = wrapped
    except (AttributeError, TypeError):  # pragma: no cover - builtins
        pass


class Ledger:
    """Records every attribute this package replaced and how to undo it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._records: Dict[str, List[_Record]] = {}
        self._order: List[str] = []
        # Replacements a revert had to leave under another library's wrapper.
        self._stranded: List[_Record] = []

    # queries -----------------------------------------------------------
    def applied(self) -> Tuple[str, ...]:
        """Ids of the fixes currently applied, in the order they were applied."""
        with self._lock:
            return tuple(self._order)

    def is_applied(self, fix_id: str) -> bool:
        # No lock: a single dict lookup is atomic, and this is asked on the
        # write path of requests.
        return fix_id in self._records

    def is_object_patched(self, owner: type, name: str) -> bool:
        with self._lock:
            return any(
                r.owner is owner and r.name == name
                for records in self._records.values()
                for r in records
            )

    def get_original(self, owner: type, name: str) -> Any:
        """The attribute as it was before this package touched it.

        For an attribute that was inherited, this is what the MRO yields once our
        replacement is gone.
        """
        with self._lock:
            # The first record wins: a later one saved one of our replacements.
            ours: Dict[Tuple[type, str], _Record] = {}
            for fix_id in self._order:
                for r in self._records[fix_id]:
                    ours.setdefault((r.owner, r.name), r)
            for klass in owner.__mro__:
                if name not in vars(klass):
                    continue
                record = ours.get((klass, name))
                if record is None:
                    return vars(klass)[name]
                if record.original is not _MISSING:
                    return record.original
                # Ours, on a class that only inherited it: look further up.
        raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")

    # changes -----------------------------------------------------------
    def apply(self, fix_id: str, patches: Sequence[Patch]) -> bool:
        """Apply all ``patches`` for ``fix_id``, or none of them.

        Returns False if the fix was already applied (nothing is done).
        """
        with self._lock:
            self._recover_stranded()
            if fix_id in self._records:
                return False
            done: List[_Record] = []
            try:
                for patch in patches:
                    current, _definer = _resolve(patch.owner, patch.name)
                    if current is _MISSING:
                        raise AttributeError(
                            f"{patch.owner.__module__}.{patch.owner.__qualname__}"
                            f" has no attribute {patch.name!r}"
                        )
                    own = vars(patch.owner).get(patch.name, _MISSING)
                    replacement = patch.build(current)
                    if replacement is current:
                        raise ValueError(
                            f"patch for {patch.owner.__qualname__}.{patch.name}"
                            " returned the original itself"
                        )
                    _mark(replacement, fix_id, current)
                    setattr(patch.owner, patch.name, replacement)
                    done.append(
                        _Record(fix_id, patch.owner, patch.name, own, replacement)
                    )
            except BaseException:
                for record in reversed(done):
                    self._undo(record)
                raise
            self._records[fix_id] = done
            self._order.append(fix_id)
            return True

    def revert(self, fix_id: str) -> bool:
        """Undo ``fix_id``. Returns False if it was not applied."""
        with self._lock:
            records = self._records.pop(fix_id, None)
            if records is None:
                return False
            self._order.remove(fix_id)
            for record in reversed(records):
                if not self._undo(record):
                    self._stranded.append(record)
            self._recover_stranded()
            return True

    def revert_all(self) -> Tuple[str, ...]:
        with self._lock:
            reverted = tuple(reversed(self._order))
            for fix_id in reverted:
                self.revert(fix_id)
            self._recover_stranded()
            return reverted

    def _recover_stranded(self) -> None:
        """Undo each stranded replacement that is on top again (it may uncover
        another: stacked fixes)."""
        live = {id(r.replacement) for rs in self._records.values() for r in rs}
        again = True
        while again:
            again = False
            for record in list(self._stranded):
                if id(record.replacement) in live:
                    self._stranded.remove(record)  # applied again since
                elif vars(record.owner).get(record.name) is record.replacement:
                    self._stranded.remove(record)
                    self._undo(record)
                    again = True

    @staticmethod
    def _undo(record: _Record) -> bool:
        on_top = vars(record.owner).get(record.name, _MISSING)
        if on_top is not record.replacement:
            warnings.warn(
                f"aiohttp_payloadfix: {record.owner.__qualname__}.{record.name} was"
                f" replaced by another library after fix {record.fix_id!r} patched"
                " it; leaving that wrapper (and ours under it) in place",
                PayloadFixWarning,
                stacklevel=4,
            )
            return False
        if record.original is _MISSING:
            delattr(record.owner, record.name)
        else:
            setattr(record.owner, record.name, record.original)
        return True


#: The process-wide ledger.
LEDGER = Ledger()
