"""The emulator's state: entities grouped per (partition, kind), transactions, sqlite durability.

Everything here runs under :attr:`EntityStore.lock`; callers (``_service.py``) take it for
the whole of one RPC so that an RPC sees and changes a consistent state.

Concurrency control is per key. A read-write transaction records, for each key it looks up,
the *change sequence* it observed (the commit sequence number that last wrote or deleted that
key), and for each kind it queries, the kind's change sequence.

``pessimistic`` (the default, as Firestore in Datastore mode's default concurrency mode):
those reads are read locks. A write (a Commit, transactional or not) to a key another open
read-write transaction has read, or to an entity of a kind it has queried, waits until that
transaction ends (:meth:`EntityStore.lock_holders`, :meth:`EntityStore.wait_for_release`); a
transaction's commit that waits longer than ``LOCK_TIMEOUT_SECONDS`` is ABORTED ("Transaction
lock timeout."), which releases its own locks (so of two transactions that read then write
one entity, one commits). Blind writes take no lock: both commit, the last one wins.

``optimistic``: nothing waits; at commit a transaction is ABORTED if anything it read changed
since, or if a key it writes was changed by someone else after it began.

Either way a commit-time check (:meth:`EntityStore.conflicts`) keeps every transaction
serializable: reads inside a transaction see the latest committed state.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from google.cloud.datastore_v1.types import entity as entity_types

from ..errors import DataDirInUseError
from ._index import IndexSpec, SortedIndex

#: (project, database, namespace): what the key's partition id names.
Partition = tuple[str, str, str]
#: (project, database, namespace, kind): one group of entities a query scans.
TableKey = tuple[str, str, str, str]

#: Transactions idle for longer than this are forgotten, as Datastore expires a transaction
#: idle for 60 s (https://cloud.google.com/datastore/docs/concepts/transactions): a client
#: that vanishes mid-transaction holds its locks (and pins tombstones) that long at most.
TRANSACTION_IDLE_SECONDS = 60.0
#: Pessimistic mode: how long a transaction's commit waits for another's locks (as Google's
#: Firestore emulator in Datastore mode), and a non-transactional write at most.
LOCK_TIMEOUT_SECONDS = 2.0
NON_TRANSACTIONAL_LOCK_WAIT_SECONDS = 60.0
CONCURRENCY_MODES = ("pessimistic", "optimistic")
#: How many ended transaction ids are remembered so that a late Rollback is a no-op.
ENDED_TRANSACTIONS_KEPT = 10_000

_KeyPb = entity_types.Key.pb()
_EntityPb = entity_types.Entity.pb()


class StoredEntity(NamedTuple):
    """An entity and the commit sequence that wrote it (the shape the stub's engine reads)."""

    version: int
    entity: entity_types.Entity


def partition_of(key: _KeyPb) -> Partition:
    """The partition a normalized key belongs to."""
    pid = key.partition_id
    return (pid.project_id, pid.database_id, pid.namespace_id)


def table_of(key: _KeyPb) -> TableKey:
    """The (partition, kind) table a normalized key belongs to."""
    return (*partition_of(key), key.path[-1].kind)


def key_bytes(key: _KeyPb) -> bytes:
    """Canonical bytes of a normalized key, used as the identity of an entity."""
    return key.SerializeToString(deterministic=True)


@dataclass
class KindTable:
    """The entities of one kind in one partition, and the sorted indexes queries read.

    The key index (spec ``()``) always exists; property and composite indexes are added
    with :meth:`index` (declared ones when the table is created, the others on the first
    query that needs them) and kept up to date by every put and delete from then on.
    """

    entities: dict[bytes, StoredEntity] = field(default_factory=dict)
    #: Commit sequence of the last write or delete in this table (for transactional queries).
    changed_seq: int = 0
    indexes: dict[IndexSpec, SortedIndex] = field(default_factory=lambda: {(): SortedIndex(())})

    def put(self, kb: bytes, stored: StoredEntity, seq: int) -> None:
        previous = self.entities.get(kb)
        for index in self.indexes.values():
            if previous is not None:
                index.remove(_entity_pb(previous), kb)
            index.add(_entity_pb(stored), kb)
        self.entities[kb] = stored
        self.changed_seq = seq

    def delete(self, kb: bytes, seq: int) -> None:
        previous = self.entities.pop(kb, None)
        if previous is not None:
            for index in self.indexes.values():
                index.remove(_entity_pb(previous), kb)
        self.changed_seq = seq

    def index(self, spec: IndexSpec) -> SortedIndex:
        """The index of shape ``spec``, built from the current entities if it is new."""
        found = self.indexes.get(spec)
        if found is None:
            found = SortedIndex(spec)
            found.build({kb: _entity_pb(stored) for kb, stored in self.entities.items()})
            self.indexes[spec] = found
        return found

    def in_key_order(self) -> list[StoredEntity]:
        """Entities sorted by key (the key index)."""
        return [self.entities[entry[-1]] for entry in self.indexes[()].entries]


@dataclass
class Transaction:
    """What a live transaction has read, to validate at commit."""

    read_only: bool
    start_seq: int
    last_used: float
    #: key bytes → change sequence observed when the key was read.
    reads: dict[bytes, int] = field(default_factory=dict)
    #: table → its change sequence when the transaction queried it.
    queried: dict[TableKey, int] = field(default_factory=dict)


@dataclass
class Write:
    """One entity change of a commit: ``entity`` None means delete."""

    key: _KeyPb
    kb: bytes
    entity: _EntityPb | None


class _Sqlite:
    """Durable copy of the store: one sqlite transaction per commit, WAL journal.

    ``synchronous=NORMAL`` in WAL mode means a commit is in the WAL file before the RPC
    returns, so it survives the emulator being killed (not an OS crash or power loss).
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(data_dir / "datastore.lock", "w")  # noqa: SIM115 - held open
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            raise DataDirInUseError(
                f"data dir {data_dir} is in use by another datastore emulator"
            ) from exc
        self._db = sqlite3.connect(
            data_dir / "datastore.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entities"
            " (key BLOB PRIMARY KEY, entity BLOB NOT NULL, version INTEGER NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )

    def load(self) -> tuple[list[tuple[bytes, int]], dict[str, int]]:
        rows = self._db.execute("SELECT entity, version FROM entities").fetchall()
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        return rows, meta

    def save(self, writes: list[Write], version: int, meta: dict[str, int]) -> None:
        with self._transaction():
            for write in writes:
                if write.entity is None:
                    self._db.execute("DELETE FROM entities WHERE key = ?", (write.kb,))
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO entities (key, entity, version) VALUES (?, ?, ?)",
                        (write.kb, write.entity.SerializeToString(), version),
                    )
            self._db.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", meta.items()
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
        self._lock_file.close()


class EntityStore:
    """All entities in memory, grouped per (partition, kind), optionally backed by sqlite.

    Usage (under ``store.lock``)::

        store = EntityStore(data_dir=None)
        found = store.get(key_pb)
        store.apply([Write(key_pb, key_bytes(key_pb), entity_pb)])
    """

    def __init__(
        self, data_dir: str | os.PathLike | None, concurrency: str = "pessimistic"
    ) -> None:
        if concurrency not in CONCURRENCY_MODES:
            raise ValueError(f"concurrency must be one of {CONCURRENCY_MODES}, not {concurrency!r}")
        self.concurrency = concurrency
        self.lock = threading.RLock()
        #: Notified whenever a transaction ends, releasing its locks.
        self.released = threading.Condition(self.lock)
        self.tables: dict[TableKey, KindTable] = {}
        self.transactions: dict[bytes, Transaction] = {}
        #: Global commit sequence; also the version of the entities a commit writes.
        self.seq = 0
        self.next_id = 1
        #: key bytes → sequence of the commit that deleted it; only needed while some
        #: transaction might have read the key before that commit.
        self._tombstones: dict[bytes, int] = {}
        # Ids of recently ended transactions: ndb rolls back after a failed commit, and
        # that rollback must succeed for the commit's own error (e.g. ABORTED) to surface.
        self._ended: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # kind -> index shapes every table of that kind maintains from its creation on.
        self._declared: dict[str, set[IndexSpec]] = {}
        self._sqlite = _Sqlite(Path(data_dir)) if data_dir is not None else None
        if self._sqlite is not None:
            self._load()

    def _load(self) -> None:
        rows, meta = self._sqlite.load()
        for raw, version in rows:
            entity = _EntityPb.FromString(raw)
            table = self.tables.setdefault(table_of(entity.key), KindTable())
            table.entities[key_bytes(entity.key)] = self._stored(entity, version)
            table.changed_seq = max(table.changed_seq, version)
        # Indexes are not stored: sorting once per index is cheaper than inserting one by one.
        for table in self.tables.values():
            table.indexes[()].build({kb: _entity_pb(s) for kb, s in table.entities.items()})
        self.seq = meta.get("seq", 0)
        self.next_id = meta.get("next_id", 1)

    def declare_index(self, kind: str, spec: IndexSpec) -> None:
        """Maintain an index of shape ``spec`` on every table of ``kind``, present and future."""
        self._declared.setdefault(kind, set()).add(spec)
        for table_key, table in self.tables.items():
            if table_key[3] == kind:
                table.index(spec)

    def _table(self, table_key: TableKey) -> KindTable:
        table = self.tables.get(table_key)
        if table is None:
            table = self.tables[table_key] = KindTable()
            for spec in self._declared.get(table_key[3], ()):
                table.index(spec)
        return table

    @staticmethod
    def _stored(entity: _EntityPb, version: int) -> StoredEntity:
        return StoredEntity(version=version, entity=entity_types.Entity.wrap(entity))

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: _KeyPb) -> StoredEntity | None:
        table = self.tables.get(table_of(key))
        return table.entities.get(key_bytes(key)) if table else None

    def change_seq(self, key: _KeyPb) -> int:
        """Sequence of the last commit that wrote or deleted ``key`` (0 if none is known)."""
        found = self.get(key)
        if found is not None:
            return found.version
        return self._tombstones.get(key_bytes(key), 0)

    def scan(self, partition: Partition, kind: str | None) -> list[StoredEntity]:
        """Entities of one kind (or of every kind, for kindless queries) in key order."""
        if kind is not None:
            table = self.tables.get((*partition, kind))
            return table.in_key_order() if table else []
        found: list[StoredEntity] = []
        for table_key in sorted(self.tables):
            if table_key[:3] == partition:
                found.extend(self.tables[table_key].in_key_order())
        return found

    def table_seq(self, table_key: TableKey) -> int:
        table = self.tables.get(table_key)
        return table.changed_seq if table else 0

    # -- ids -----------------------------------------------------------------------------

    def allocate_ids(self, count: int, persist: bool) -> list[int]:
        """Hand out ``count`` fresh ids; ``persist`` writes the counter before returning."""
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        if persist:
            self._save([], self.seq)
        return ids

    def reserve_ids(self, ids: Iterable[int]) -> None:
        """Never hand out any of ``ids`` from now on."""
        highest = max(ids, default=0)
        if highest >= self.next_id:
            self.next_id = highest + 1
            self._save([], self.seq)

    # -- transactions --------------------------------------------------------------------

    def begin(self, read_only: bool) -> bytes:
        self._expire_idle_transactions()
        transaction_id = uuid.uuid4().bytes
        self.transactions[transaction_id] = Transaction(
            read_only=read_only, start_seq=self.seq, last_used=time.monotonic()
        )
        return transaction_id

    def transaction(self, transaction_id: bytes) -> Transaction | None:
        transaction = self.transactions.get(transaction_id)
        if transaction is not None:
            transaction.last_used = time.monotonic()
        return transaction

    def end(self, transaction_id: bytes) -> None:
        if self.transactions.pop(transaction_id, None) is not None:
            self._ended[transaction_id] = None
            if len(self._ended) > ENDED_TRANSACTIONS_KEPT:
                self._ended.popitem(last=False)
            self.released.notify_all()
        self._prune_tombstones()

    def lock_holders(self, transaction: Transaction | None, writes: list[Write]) -> list[str]:
        """Pessimistic mode: the keys of ``writes`` another open read-write transaction holds
        a lock on (it read the key, or queried its kind); empty in optimistic mode."""
        if self.concurrency != "pessimistic" or not writes:
            return []
        locked = []
        for write in writes:
            table = table_of(write.key)
            for other in self.transactions.values():
                if other is transaction or other.read_only:
                    continue
                if write.kb in other.reads or table in other.queried:
                    locked.append(describe_key(write.key))
                    break
        return locked

    def wait_for_release(self, deadline: float) -> bool:
        """Wait (releasing :attr:`lock`) until a transaction ends or ``deadline`` (monotonic)
        passes; False once it has passed. Idle transactions expire meanwhile."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.released.wait(min(remaining, 0.5))
        self._expire_idle_transactions()
        return True

    def recently_ended(self, transaction_id: bytes) -> bool:
        """Whether the transaction was committed, aborted or rolled back a short while ago."""
        return transaction_id in self._ended

    def conflicts(self, transaction: Transaction, writes: list[Write]) -> list[str]:
        """Why ``transaction`` may not commit ``writes`` (empty when it may)."""
        reasons = []
        for kb, observed in transaction.reads.items():
            key = _KeyPb.FromString(kb)
            if self.change_seq(key) > observed:
                reasons.append(describe_key(key))
        for table_key, observed in transaction.queried.items():
            if self.table_seq(table_key) > observed:
                reasons.append(f"query on kind {table_key[3]!r}")
        if self.concurrency == "optimistic":
            for write in writes:
                if write.kb not in transaction.reads and (
                    self.change_seq(write.key) > transaction.start_seq
                ):
                    reasons.append(describe_key(write.key))
        return reasons

    def _expire_idle_transactions(self) -> None:
        deadline = time.monotonic() - TRANSACTION_IDLE_SECONDS
        expired = [t for t, txn in self.transactions.items() if txn.last_used < deadline]
        for transaction_id in expired:
            del self.transactions[transaction_id]
        if expired:
            self.released.notify_all()

    def _prune_tombstones(self) -> None:
        # A tombstone older than every live transaction's start cannot make any of them
        # conflict (they compare with "changed after I read/began"), so it can go.
        if not self.transactions:
            self._tombstones.clear()
            return
        if len(self._tombstones) > 4 * len(self.transactions) + 1024:
            oldest = min(t.start_seq for t in self.transactions.values())
            self._tombstones = {k: s for k, s in self._tombstones.items() if s >= oldest}

    # -- writes --------------------------------------------------------------------------

    def apply(self, writes: list[Write]) -> int:
        """Make ``writes`` durable, then visible; returns the commit's version."""
        version = self.seq + 1
        self._save(writes, version)
        self.seq = version
        for write in writes:
            table_key = table_of(write.key)
            if write.entity is None:
                table = self.tables.get(table_key)
                if table is not None:
                    table.delete(write.kb, version)
                if self.transactions:
                    self._tombstones[write.kb] = version
            else:
                table = self._table(table_key)
                table.put(write.kb, self._stored(write.entity, version), version)
        return version

    def _save(self, writes: list[Write], version: int) -> None:
        if self._sqlite is not None:
            self._sqlite.save(writes, version, {"seq": version, "next_id": self.next_id})


def _entity_pb(stored: StoredEntity) -> _EntityPb:
    return entity_types.Entity.pb(stored.entity)


def describe_key(key: _KeyPb) -> str:
    """A short readable form of a key, for error messages: ``Parent:1/Child:name``."""
    return "/".join(f"{e.kind}:{e.name or e.id}" for e in key.path)
