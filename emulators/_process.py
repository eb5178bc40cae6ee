"""Child processes that never outlive the process that started them (Linux).

``process = spawn([sys.executable, "-m", "gunicorn", ...], stdout=...)`` runs a tiny launcher
first: it asks Linux to send it SIGTERM when its parent dies (even by ``kill -9``), then execs
the real program, which keeps that setting.

Linux's "parent" there is the *thread* that forked the child: a child started from a worker
thread (``LocalStack.restart_tasks()`` called from one) was killed as soon as that thread
ended. So every child is started from one thread that lives as long as the process
(``spawn`` hands the Popen call to it and waits): the signal comes when the process dies.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

# A launcher rather than preexec_fn: preexec_fn forces fork() in a process that may have gRPC
# threads, and gRPC's fork handlers can abort the child before it execs.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the process that started this one exited while it was starting')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """``argv`` behind the launcher (unchanged off Linux); ``argv[0]`` must be a path."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


_requests: queue.Queue[tuple[list[str], dict[str, Any], concurrent.futures.Future]] = queue.Queue()
_spawner_lock = threading.Lock()
#: The process whose spawner thread is running (a forked copy must start its own).
_spawner_pid: int | None = None


def spawn(argv: Sequence[str], **popen_options: Any) -> subprocess.Popen:
    """``subprocess.Popen(with_parent_death_signal(argv), **popen_options)``, forked from a
    thread that lives as long as this process, whichever thread calls it."""
    if sys.platform != "linux":
        return subprocess.Popen(list(argv), **popen_options)
    _start_spawner()
    result: concurrent.futures.Future = concurrent.futures.Future()
    _requests.put((with_parent_death_signal(argv), popen_options, result))
    return result.result()


def _start_spawner() -> None:
    global _spawner_pid
    with _spawner_lock:
        if _spawner_pid == os.getpid():
            return
        threading.Thread(target=_serve, name="child-spawner", daemon=True).start()
        _spawner_pid = os.getpid()


def _serve() -> None:
    """The spawner thread: never returns, so it ends only with the process."""
    while True:
        argv, options, result = _requests.get()
        try:
            result.set_result(subprocess.Popen(argv, **options))
        except BaseException as exc:
            result.set_exception(exc)
