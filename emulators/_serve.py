"""What the emulator command lines share: announce the address, serve until told to stop."""

from __future__ import annotations

import signal
import threading


def serve_until_signalled(listening_line: str) -> None:
    """Print ``listening_line`` (LocalStack waits for it), then block until SIGINT or SIGTERM.

    The handlers are installed before the line is printed, so a parent that stops us as soon as
    it reads the line is heard. A timed wait keeps the main thread returning to the interpreter,
    where signal handlers run.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(listening_line, flush=True)
    while not stop.wait(0.5):
        pass
