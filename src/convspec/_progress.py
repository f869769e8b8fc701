"""A progress bar that degrades to nothing when tqdm is missing or output is not wanted."""

from __future__ import annotations

import contextlib
import sys
from typing import Optional, Tuple


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass


def auto_progress(progress: Optional[bool], what: str = "progress") -> Tuple[bool, float]:
    """``(enabled, delay)`` for a library call's ``progress`` argument.

    ``None`` (automatic): a bar only when stderr is a terminal, and only once the work has
    taken ``AUTO_DELAY`` seconds (short calls print nothing); ``True``: a bar at once, also into
    a log file; ``False``: none. ``ValueError`` for anything else.
    """
    if progress is None:
        return sys.stderr.isatty(), AUTO_DELAY
    if isinstance(progress, bool):
        return progress, 0.0
    raise ValueError(f"{what} must be None (automatic), True or False, got {progress!r}")


#: Seconds after which an automatic progress bar appears (see :func:`auto_progress`).
AUTO_DELAY = 2.0


@contextlib.contextmanager
def progress_bar(total: Optional[float], desc: str, enabled: bool = True, delay: float = 0.0,
                 unit: str = "it"):
    """Yield an object with ``update(n)`` and ``set_postfix_str(s, refresh)``; tqdm when available.

    Pass ``refresh=False`` to ``set_postfix_str`` in loops: the text is then shown at the next
    redraw, which tqdm rate-limits (a forced refresh would write a line per step into logs).
    ``delay``: show nothing until that many seconds have passed (tqdm's ``delay``); ``unit``:
    what ``total`` counts.
    """
    if not enabled:
        yield _NullBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the default extras
        if not delay:
            print(f"{desc} ({total} steps; install tqdm for a progress bar)", file=sys.stderr)
        yield _NullBar()
        return
    # In a log file (not a terminal) redraw rarely so that the log stays readable.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(
        total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=interval,
        delay=delay, unit=unit,
    ) as bar:
        yield bar
