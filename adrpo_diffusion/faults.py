"""What stops a training run before its last step, and the signals that ask it to (core: stdlib only).

Every such stop is a :class:`RunStopped`; ``adrpo-train`` prints its message, the last checkpoint and the command that
continues the run, and exits with its ``exit_code``. A checkpoint of the last completed step is written first
wherever the step's state allows it (a stop signal, a failing reward); a failed write leaves the previous checkpoint
as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunStopped(RuntimeError):
    """A run that stopped before ``max_steps``; ``exit_code`` is the command's."""

    exit_code = 1


class TrainingStopped(RunStopped):
    """A stop signal (SIGTERM, SIGUSR1, Ctrl-C) arrived; the run stopped after a completed step, with a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class RewardFailed(RunStopped):
    """The reward raised; the step it was scoring was not applied."""


class NonFiniteLossError(RunStopped):
    """Too many steps in a row had a non-finite loss or gradient, or no prompt group with finite rewards."""


class WriteFailed(RunStopped):
    """A checkpoint or the LoRA could not be written (a full disk, an I/O error); nothing partial was left behind."""


class ProcessLost(RunStopped):
    """Another process of a multi-process run stopped: a collective operation failed."""


def write_failed(path: str | os.PathLike, err: OSError, note: str = "") -> WriteFailed:
    """:class:`WriteFailed` naming ``path``, the error, the free space of its filesystem and ``note``."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    return WriteFailed(f"could not write {path}: {err.strerror or err} ({free / 2**30:.2f} GiB free on its "
                       f"filesystem){'; ' + note if note else ''}")


class StopRequest:
    """``with StopRequest(log) as stop:`` — the first SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) sets ``stop.signum``,
    and the caller stops at its next safe point; a second one interrupts at once (``KeyboardInterrupt``). The
    previous handlers come back on exit. Outside the main thread (where Python cannot handle signals) it does
    nothing."""

    def __init__(self, log):
        self.signum: int | None = None
        self._log = log
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum
        self._log(f"{signal.Signals(signum).name} received: stopping after the current step, with a checkpoint "
                  "(send it again to stop at once)")

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
