"""Python's thread switch interval while engines serve (Engine's switch_interval_ms): each torch call of the engine's
loop lets go of the GIL, and a caller's thread that is submitting requests takes it; the loop waits for it back up
to the interval (5 ms by default) after every such call. On bench.batching's wide workload the first packed launch
of a pass took ~50 ms while 4,096 submits ran (a stub device on this project's 2-core CPU), against ~3 ms after
them. An engine lowers the interval while it is open (process-wide); the lowest asked for by an open engine holds,
and the interval found before the first returns once the last closes."""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_held: list[float] = []  # the intervals open engines asked for, in seconds
_saved = 0.005  # the interval before the first of them (set by its hold)


def hold(seconds: float) -> None:
    """Ask for an interval of at most `seconds` until release(seconds)."""
    global _saved
    with _lock:
        if not _held:
            _saved = sys.getswitchinterval()
        _held.append(seconds)
        sys.setswitchinterval(min([_saved, *_held]))


def release(seconds: float) -> None:
    """Give back one hold(seconds): the lowest still held applies, or the saved interval once none is."""
    with _lock:
        _held.remove(seconds)
        sys.setswitchinterval(min([_saved, *_held]))
