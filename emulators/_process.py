"""Child processes that never outlive the process that started them (Linux).

``argv = with_parent_death_signal([sys.executable, "-m", "gunicorn", ...])`` runs a tiny
launcher first: it asks Linux to send it SIGTERM when its parent dies (even by ``kill -9``),
then execs the real program, which keeps that setting.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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
