"""Stopping a run cleanly: SIGINT/SIGTERM ask the loop to save a checkpoint at
the end of the step (or end the feature cache fill at once); a second signal
acts as usual. A run that stops early raises TrainingStopped."""

from __future__ import annotations

import signal
import threading


class StopRequested:
    """Set by SIGINT/SIGTERM: the loop saves at the next step boundary and stops."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers only work in the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name
        print(
            f"\n{self.signal} received: saving a checkpoint at the end of this step, or stopping the feature cache "
            "fill at once, keeping what is encoded (again to stop at once)"
        )
        for sig, handler in self.previous.items():  # a second signal acts as usual
            signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class TrainingStopped(Exception):
    """A run stopped early (by a signal, or by too many bad steps)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
