"""The gRPC server: ``google.datastore.v1.Datastore`` on a local port.

Start it in-process (tests, benchmarks)::

    from gae_deferred.local.datastore import DatastoreEmulator

    emu = DatastoreEmulator(host="127.0.0.1", port=0, data_dir=".local/datastore")
    emu.start()                       # emu.port is the bound port
    os.environ["DATASTORE_EMULATOR_HOST"] = emu.address
    ...                               # any google-cloud-ndb / google-cloud-datastore client
    emu.rpc_counts["Commit"]          # calls received so far, per RPC
    emu.stop()

or from a shell: ``python -m gae_deferred.local.datastore --port 8081 --data-dir .local/datastore``.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from google.cloud.datastore_v1 import types

from ..errors import PortInUseError, RpcError
from ._index_rules import DESCENDING, load_index_yaml
from ._proto import pb
from ._service import DatastoreService
from ._store import EntityStore
from ._stub_adapter import LimitExceededError

SERVICE_NAME = "google.datastore.v1.Datastore"
#: Well above the 10 MiB Commit limit, so that limit answers with its own clear error.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RPCS: dict[str, type] = {
    "Lookup": types.LookupRequest,
    "RunQuery": types.RunQueryRequest,
    "RunAggregationQuery": types.RunAggregationQueryRequest,
    "BeginTransaction": types.BeginTransactionRequest,
    "Commit": types.CommitRequest,
    "Rollback": types.RollbackRequest,
    "AllocateIds": types.AllocateIdsRequest,
    "ReserveIds": types.ReserveIdsRequest,
}

log = logging.getLogger(__name__)


class DatastoreEmulator:
    """A Datastore emulator serving gRPC on ``host:port``; see the module docstring.

    ``data_dir`` None keeps everything in memory; otherwise each commit is durable there
    before the RPC returns and a restart (even after ``kill -9``) reloads it.
    ``index_yaml`` enables composite-index checks (queries needing an undeclared index
    fail with FAILED_PRECONDITION); it is read, and errors raised, in the constructor.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike | None = None,
        index_yaml: str | os.PathLike | None = None,
        enforce_limits: bool = True,
        max_workers: int = 16,
        concurrency: str = "pessimistic",
    ) -> None:
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self.enforce_limits = enforce_limits
        self.max_workers = max_workers
        #: ``pessimistic`` (Firestore in Datastore mode's default) or ``optimistic``.
        self.concurrency = concurrency
        self.indexes = load_index_yaml(index_yaml) if index_yaml is not None else None
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._state: EntityStore | None = None
        self._service: DatastoreService | None = None

    @property
    def address(self) -> str:
        """``host:port``, the value for ``DATASTORE_EMULATOR_HOST``."""
        return f"{self.host}:{self.port}"

    @property
    def rpc_counts(self) -> collections.Counter[str]:
        """A snapshot of how many calls each RPC received, e.g. ``{"Commit": 2}``."""
        with self._counts_lock:
            return collections.Counter(self._counts)

    def reset_counts(self) -> None:
        """Zero every RPC count and :attr:`entities_examined`."""
        with self._counts_lock:
            self._counts.clear()
        if self._state is not None:
            with self._state.lock:
                self._service.examined = 0

    @property
    def entities_examined(self) -> int:
        """Index entries (or, for queries no index serves, entities) queries read so far.

        A page of 50 served by an index reads about 51 entries whatever the kind's size::

            emu.reset_counts(); query.fetch(50); assert emu.entities_examined <= 60
        """
        if self._state is None:
            return 0
        with self._state.lock:
            return self._service.examined

    def start(self) -> DatastoreEmulator:
        """Load the data dir, bind and serve; raises PortInUseError if the port is taken."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        state = EntityStore(self.data_dir, self.concurrency)
        for index in self.indexes or ():
            # Ancestor indexes are not built: ancestor queries check keys per candidate.
            if not index.ancestor:
                spec = tuple((name, way == DESCENDING) for name, way in index.properties)
                state.declare_index(index.kind, spec)
        service = DatastoreService(state, self.indexes, self.enforce_limits)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # gRPC shares ports by default on Linux; a second emulator on the same
                # port must fail instead of silently splitting the traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        handlers = {
            name: self._method_handler(name, request_type, service, state)
            for name, request_type in RPCS.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        try:
            bound = server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError as exc:
            state.close()
            raise PortInUseError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        if not bound:
            state.close()
            raise PortInUseError(f"cannot listen on {self.host}:{self.port}")
        self.port = bound
        server.start()
        self._server, self._state, self._service = server, state, service
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (letting calls in flight finish within ``grace`` s) and close storage."""
        if self._server is None:
            return
        self._server.stop(grace).wait()
        with self._state.lock:
            self._state.close()
        self._server = self._state = self._service = None

    def __enter__(self) -> DatastoreEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _method_handler(
        self, name: str, request_type: type, service: DatastoreService, state: EntityStore
    ) -> grpc.RpcMethodHandler:
        method: Callable = getattr(service, name)

        def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
            with self._counts_lock:
                self._counts[name] += 1
            # Deserializing here rather than in gRPC: gRPC answers INTERNAL to bytes its
            # deserializer rejects, Datastore answers INVALID_ARGUMENT.
            try:
                request = request_type.deserialize(raw)
            except Exception as exc:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{name}: cannot parse the request: {exc}"
                )
            code, message = _call(method, request, state, name)
            if code is not None:
                context.abort(code, message)
            return message

        # No (de)serializers: the handler receives and returns bytes.
        return grpc.unary_unary_rpc_method_handler(handle)


def _call(
    method: Callable, request: object, state: EntityStore, name: str
) -> tuple[grpc.StatusCode | None, bytes | str]:
    """Run one RPC under the store lock: (None, response bytes) or (status code, message)."""
    try:
        with state.lock:
            response = method(request)
        return None, pb(response).SerializeToString()
    except RpcError as exc:
        return exc.code, exc.message
    except LimitExceededError as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    except (AssertionError, ValueError, TypeError, KeyError, IndexError) as exc:
        # The stub's query engine asserts on request shapes it does not understand.
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name} request: {exc!r}"
    except Exception as exc:
        log.exception("%s failed", name)
        return grpc.StatusCode.INTERNAL, f"{name} failed in the emulator: {exc!r}"
