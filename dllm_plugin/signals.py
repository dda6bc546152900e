"""Installing, restoring and holding back signal handlers, in one place.

Three parts of a job react to SIGTERM/SIGINT: the command line (fail like Ctrl-C, or
inside a task stop), the training loop (stop at the end of the step) and the launcher
(pass the first signal on to the training processes). Each installs its handler for a
stretch of code and must restore the previous one after, also when it is not on the
main thread.

A fourth rule: a write to the Transformer Lab job file must never be cut in half. The
SDK rewrites the whole file (truncate, then write) without a lock, so an exception raised
by a handler in between leaves an empty job record. `deferred()` holds the signals back
for the length of such a write and delivers them right after.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_first_stop_at: float | None = None  # time.monotonic() of the first stop signal handled


def first_stop_at() -> float | None:
    """When this process first handled SIGTERM/SIGINT (time.monotonic()), or None."""
    return _first_stop_at


def _noting_stops(handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    def handle(signum: int, frame: Any) -> None:
        global _first_stop_at
        if signum in STOP_SIGNALS and _first_stop_at is None:
            _first_stop_at = time.monotonic()
        handler(signum, frame)

    return handle


@contextlib.contextmanager
def handling(handler: Callable[[int, Any], None], signals=STOP_SIGNALS) -> Iterator[bool]:
    """While inside, `handler(signum, frame)` handles `signals`; the previous handlers come
    back after. Yields False where handlers cannot be installed (not the main thread).
    Every handler installed here also notes the first stop signal (`first_stop_at`)."""
    previous = {}
    for sig in signals:
        try:
            previous[sig] = signal.signal(sig, _noting_stops(handler))
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        yield len(previous) == len(signals)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred(signals=STOP_SIGNALS) -> Iterator[None]:
    """Hold `signals` back while inside; deliver them after to the handlers in place then.

    Off the main thread nothing needs holding: Python runs handlers on the main thread
    only, so a write on another thread is never interrupted by one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    with handling(lambda signum, _frame: held.append(signum), signals):
        yield
    for sig in dict.fromkeys(held):  # each signal once, in the order it came
        signal.raise_signal(sig)


def name(signum: int) -> str:
    return signal.Signals(signum).name
