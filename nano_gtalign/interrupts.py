"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (a cluster's time limit, `kill`).

The first signal sets a flag and says at once what will happen: the current step finishes, train.py saves
a checkpoint, says how to resume and exits with 128 + the signal number. A second signal stops at once (Python's default handling),
for a user who does not want to wait. Under torchrun every rank gets the signal (torchrun forwards it), but
not necessarily between the same two steps, so the ranks agree through one all-reduce per step.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

from nano_gtalign.distributed import Dist, all_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM ask the run to stop after the current step."""

    def __init__(self, announce: Callable[[str], None] = print):
        self.received: int | None = None
        self._previous = {}
        self._announce = announce  # train.py: rank 0's print

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to install
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        for s, handler in self._previous.items():  # a second signal takes the usual, immediate way
            signal.signal(s, handler)
        self._announce(f"\n{signal.Signals(signum).name} received: the run stops after this step, with a "
                       "checkpoint (send it again to stop at once)")

    def requested(self, d: Dist) -> bool:
        """Whether any rank received a signal (collective: every rank calls it once per step)."""
        return all_sum(d, [1.0 if self.received is not None else 0.0])[0] > 0

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGINT).name
