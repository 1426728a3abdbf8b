"""Entry point: ``python -m aiohttp_payloadfix``."""

from __future__ import annotations

import sys

from ._cli import main


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
