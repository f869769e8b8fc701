"""A progress bar that degrades to nothing when tqdm is missing or output is not wanted."""

from __future__ import annotations

import contextlib
import sys


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    """Yield an object with ``update(n)`` and ``set_postfix_str(s, refresh)``; tqdm when available.

    Pass ``refresh=False`` to ``set_postfix_str`` in loops: the text is then shown at the next
    redraw, which tqdm rate-limits (a forced refresh would write a line per step into logs).
    """
    if not enabled:
        yield _NullBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the default extras
        print(f"{desc} ({total} steps; install tqdm for a progress bar)", file=sys.stderr)
        yield _NullBar()
        return
    # In a log file (not a terminal) redraw rarely so that the log stays readable.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(
        total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=interval
    ) as bar:
        yield bar
