"""Children of the local stack die with the process that started them, not with a thread."""

from __future__ import annotations

import pathlib
import sys
import threading
import time

from gae_deferred.local.stack import _Child


def test_a_child_started_from_a_thread_that_ends_keeps_running(tmp_path: pathlib.Path) -> None:
    """LocalStack.restart_tasks() from a worker thread: the emulator it started was killed when
    that thread ended (Linux sends the parent-death signal when the forking *thread* exits)."""
    started: list[_Child] = []

    def start() -> None:
        # As LocalStack does, the thread waits until the child is up, then ends.
        started.append(
            _Child(
                "sleeper",
                [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                {"PATH": "/usr/bin:/bin"},
                tmp_path,
                tmp_path / "sleeper.log",
                "up",
                None,
            )
        )
        assert started[0].ready.wait(10), started[0].output()

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    (child,) = started
    try:
        time.sleep(1.0)  # the signal arrives at once when the thread exits; give it time
        assert child.alive(), f"the child died with its thread: {child.process.returncode}"
    finally:
        child.stop(5)
    assert not child.alive()
