"""Installing and restoring signal handlers, in one place.

Three parts of a job react to SIGTERM/SIGINT: the command line (fail like Ctrl-C), the
training loop (stop at the end of the step with a checkpoint) and the launcher (pass the
first signal on to the training processes). Each installs its handler for a stretch of
code and must restore the previous one after, also when it is not on the main thread.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], signals=STOP_SIGNALS) -> Iterator[bool]:
    """While inside, `handler(signum, frame)` handles `signals`; the previous handlers come
    back after. Yields False where handlers cannot be installed (not the main thread)."""
    previous = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        yield len(previous) == len(signals)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def name(signum: int) -> str:
    return signal.Signals(signum).name
