"""SQLite persistence for the Cloud Tasks emulator (queues, pending tasks, tombstones).

Every mutation is committed before the RPC that caused it returns. WAL mode keeps the
database consistent when the process is killed (kill -9) at any point::

    store = Store("/tmp/ct")          # or Store(None) for an in-memory database
    store.put_queue(name, queue_pb.SerializeToString())
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    data BLOB NOT NULL,
    failures INTEGER NOT NULL,
    previous_status INTEGER,
    retry_reason TEXT
);
CREATE TABLE IF NOT EXISTS tombstones (name TEXT PRIMARY KEY, expires REAL NOT NULL);
"""


class Store:
    """A thread-safe wrapper around one sqlite3 connection (None = in memory)."""

    def __init__(self, data_dir: str | os.PathLike[str] | None) -> None:
        if data_dir is None:
            path = ":memory:"
        else:
            os.makedirs(data_dir, exist_ok=True)
            path = os.path.join(data_dir, "cloudtasks.sqlite3")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if data_dir is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against process crashes (kill -9); only an OS crash could
            # lose the last transactions, which is fine for a local emulator.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, params: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, params)

    def put_queue(self, name: str, data: bytes) -> None:
        self._run("INSERT OR REPLACE INTO queues (name, data) VALUES (?, ?)", (name, data))

    def delete_queue(self, name: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM queues WHERE name = ?", (name,))
            self._db.execute("DELETE FROM tasks WHERE queue = ?", (name,))
            self._db.execute("COMMIT")

    def queues(self) -> Iterator[tuple[str, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT name, data FROM queues").fetchall()
        yield from rows

    def put_task(
        self,
        name: str,
        queue: str,
        data: bytes,
        failures: int,
        previous_status: int | None,
        retry_reason: str | None,
    ) -> None:
        self._run(
            "INSERT OR REPLACE INTO tasks (name, queue, data, failures, previous_status,"
            " retry_reason) VALUES (?, ?, ?, ?, ?, ?)",
            (name, queue, data, failures, previous_status, retry_reason),
        )

    def delete_task(self, name: str, tombstone_until: float) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM tasks WHERE name = ?", (name,))
            self._db.execute(
                "INSERT OR REPLACE INTO tombstones (name, expires) VALUES (?, ?)",
                (name, tombstone_until),
            )
            self._db.execute("COMMIT")

    def purge_queue(self, queue: str, names: list[str], tombstone_until: float) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM tasks WHERE queue = ?", (queue,))
            self._db.executemany(
                "INSERT OR REPLACE INTO tombstones (name, expires) VALUES (?, ?)",
                [(name, tombstone_until) for name in names],
            )
            self._db.execute("COMMIT")

    def tasks(self) -> Iterator[tuple[str, str, bytes, int, int | None, str | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, queue, data, failures, previous_status, retry_reason FROM tasks"
            ).fetchall()
        yield from rows

    def tombstones(self, now: float) -> dict[str, float]:
        with self._lock:
            self._db.execute("DELETE FROM tombstones WHERE expires <= ?", (now,))
            rows = self._db.execute("SELECT name, expires FROM tombstones").fetchall()
        return dict(rows)
