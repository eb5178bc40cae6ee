"""index.yaml changes while ``gae-deferred-dev`` runs: warn again, and say to restart.

The Datastore emulator reads index.yaml when it starts, so an edit (pasting the indexes a new
gae_deferred release added, say) takes effect only after a restart; until then the stack would
look fixed while it still refuses the new queries. The dev server's loop asks every tick::

    watch = IndexWatch(app_dir / "index.yaml", describe)
    note = watch.changed()        # None, or the lines to print
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable


class IndexWatch:
    """Notices when ``path`` is created, changed or removed.

    ``describe(path or None)`` says what is wrong with the file as it is now (e.g. the
    package's indexes it lacks), or None; it may raise ValueError for a file that does not
    parse, whose message is shown instead.
    """

    def __init__(
        self, path: pathlib.Path, describe: Callable[[pathlib.Path | None], str | None]
    ) -> None:
        self.path = path
        self._describe = describe
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        return status.st_mtime_ns, status.st_size

    def changed(self) -> str | None:
        """The warning to print if the file changed since the last call, else None."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            problem = self._describe(self.path if stamp is not None else None)
        except ValueError as exc:
            problem = f"warning: {exc}"
        restart = (
            f"warning: {self.path} changed; the Datastore emulator reads index.yaml at start: "
            "restart gae-deferred-dev to use it"
        )
        return restart if problem is None else f"{problem}\n{restart}"
