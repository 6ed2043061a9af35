"""Command-line tools that need no Hydra: each module has ``main(argv)``; ``train/<name>.py`` and the
``cgpt-<name>`` console scripts call it (``python -m cgpt.cli.<name>`` works too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def exits_zero(main: Callable[[], Any]) -> Callable[[], int]:
    """A console-script entry for a ``main`` that returns its result (a path, a dict) instead of an
    exit status: the process exits 0 once ``main`` returns (errors exit through SystemExit)."""

    def console() -> int:
        main()
        return 0

    console.__doc__ = f"The console script of {main.__module__}.main: exit status 0 once it returns."
    return console
