"""Keeps the local stack running: a child that dies is started again, with a backoff.

``gae-deferred-dev`` calls :meth:`Supervisor.check` from its main loop. A child that exits
(kill -9 of the Datastore emulator, a crashed gunicorn master) is reported in one line with
its last output, then restarted after a delay that doubles with each death in a row (1 s, 2 s,
4 s ... at most ``max_delay``). A child that dies ``max_deaths`` times within ``window``
seconds keeps dying: the supervisor gives up with a StackError naming it and its log.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import IO

from .errors import StackError
from .stack import LocalStack


@dataclasses.dataclass
class _Deaths:
    times: list[float] = dataclasses.field(default_factory=list)
    #: When the restart is due (None: the child runs).
    due: float | None = None


class Supervisor:
    """Restarts the dead children of ``stack``; see the module docstring."""

    def __init__(
        self,
        stack: LocalStack,
        *,
        out: IO[str] = sys.stderr,
        prog: str = "gae-deferred-dev",
        first_delay: float = 1.0,
        max_delay: float = 30.0,
        max_deaths: int = 5,
        window: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stack = stack
        self.out = out
        self.prog = prog
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.max_deaths = max_deaths
        self.window = window
        self.clock = clock
        self._deaths: dict[str, _Deaths] = {}
        #: Restarts done, per child (tests and the final message read it).
        self.restarts: dict[str, int] = {}

    def check(self) -> None:
        """Note children that died, restart those whose delay is over; StackError when one
        keeps dying."""
        now = self.clock()
        for name in self.stack.dead_children():
            deaths = self._deaths.setdefault(name, _Deaths())
            if deaths.due is None:
                self._died(name, deaths, now, self._exit_text(name))
        for name, deaths in self._deaths.items():
            if deaths.due is not None and now >= deaths.due:
                self._restart(name, deaths)

    def _exit_text(self, name: str) -> str:
        code = self.stack.exit_code(name)
        if code is not None and code < 0:
            return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def _died(self, name: str, deaths: _Deaths, now: float, how: str) -> None:
        deaths.times = [t for t in deaths.times if now - t < self.window] + [now]
        what = self.stack.describe_child(name)
        log = self.stack.log_file(name)
        if len(deaths.times) >= self.max_deaths:
            raise StackError(
                f"{what} keeps dying ({len(deaths.times)} times in {self.window:.0f}s); "
                f"stopping. Its last output ({log}):\n{self.stack.child_output(name)}"
            )
        delay = min(self.max_delay, self.first_delay * 2 ** (len(deaths.times) - 1))
        deaths.due = now + delay
        tail = self.stack.child_output(name).rstrip().splitlines()[-5:]
        self._say(
            f"{what} {how}; restarting it in {delay:g}s (see {log})"
            + "".join(f"\n  | {line}" for line in tail)
        )

    def _restart(self, name: str, deaths: _Deaths) -> None:
        try:
            self.stack.restart_child(name)
        except StackError as exc:
            deaths.due = None
            first_line = str(exc).splitlines()[0] if str(exc) else "did not start"
            self._died(name, deaths, self.clock(), f"did not come back: {first_line}")
            return
        deaths.due = None
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self._say(f"{self.stack.describe_child(name)} is running again")

    def _say(self, text: str) -> None:
        print(f"{self.prog}: {text}", file=self.out, flush=True)
