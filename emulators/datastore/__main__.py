"""``python -m gae_deferred.local.datastore``: run the Datastore emulator until SIGINT/SIGTERM.

    python -m gae_deferred.local.datastore --host 127.0.0.1 --port 8081 \\
        --data-dir .local/datastore --index-yaml index.yaml

Prints ``datastore emulator listening on HOST:PORT`` once serving. Exit codes: 0 after a
clean stop, 2 when it cannot start (port in use, bad index.yaml, data dir locked).
"""

from __future__ import annotations

import argparse
import sys

from .._serve import serve_until_signalled
from ..errors import DataDirInUseError, IndexYamlError, PortInUseError
from .server import DatastoreEmulator


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until a signal arrives, return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m gae_deferred.local.datastore",
        description="Local Cloud Datastore emulator (gRPC).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port (default 8081; 0 = any)")
    parser.add_argument("--data-dir", help="directory for durable state (default: memory only)")
    parser.add_argument("--index-yaml", help="index.yaml: reject queries needing other indexes")
    parser.add_argument(
        "--concurrency",
        choices=("pessimistic", "optimistic"),
        default="pessimistic",
        help="transactions' concurrency mode (default pessimistic, as Firestore in Datastore "
        "mode's default)",
    )
    args = parser.parse_args(argv)

    try:
        emulator = DatastoreEmulator(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            index_yaml=args.index_yaml,
            concurrency=args.concurrency,
        )
        emulator.start()
    except PortInUseError:
        print(
            f"datastore emulator: port {args.port} on {args.host} is already in use",
            file=sys.stderr,
        )
        return 2
    except (IndexYamlError, DataDirInUseError) as exc:
        print(f"datastore emulator: {exc}", file=sys.stderr)
        return 2

    serve_until_signalled(f"datastore emulator listening on {emulator.address}")
    emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
