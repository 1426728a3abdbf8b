"""What a fix is: its identity, its upstream reference, its probe and its patches."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import aiohttp

from ._ledger import Patch

__all__ = ("AIOHTTP_VERSION", "Fix", "NotNeeded", "Version", "parse_version")

Version = Tuple[int, int, int]


def parse_version(text: str) -> Version:
    """``"3.12.0rc1"`` -> ``(3, 12, 0)``; missing parts count as 0."""
    parts = [int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3]]
    while len(parts) < 3:
        parts.append(0)
    return (parts[0], parts[1], parts[2])


AIOHTTP_VERSION: Version = parse_version(aiohttp.__version__)


class NotNeeded(str):
    """What a probe returns to say "not needed here" with a reason of its own."""


@dataclass(frozen=True)
class Fix:
    """One backported behaviour.

    ``affected`` is the half-open range of releases that upstream says need it
    (``None`` as upper bound: no release fixed it). ``probe`` inspects the
    installed aiohttp and returns why the fix is needed, or ``None`` when the
    installed code already behaves; the range is only a cross-check.
    """

    id: str
    upstream: str
    summary: str
    affected: Tuple[Version, Optional[Version]]
    probe: Callable[[], Optional[str]]
    patches: Callable[[], Sequence[Patch]]
    #: Fixes that must be active for this one not to make things worse.
    requires: Tuple[str, ...] = ()

    def in_range(self, version: Version = AIOHTTP_VERSION) -> bool:
        low, high = self.affected
        return low <= version and (high is None or version < high)

    @property
    def releases(self) -> str:
        low, high = self.affected
        low_s = ".".join(map(str, low))
        if high is None:
            return f">={low_s} (no release fixes it)"
        return f">={low_s},<{'.'.join(map(str, high))}"
