"""``python -m gae_deferred.local.cloudtasks``: serve the Cloud Tasks emulator until SIGINT/SIGTERM.

    python -m gae_deferred.local.cloudtasks --host 127.0.0.1 --port 8123 \
        --data-dir .local/cloudtasks --queue-yaml queue.yaml --project P --location L \
        --app-url http://127.0.0.1:8080 [--latency-ms 20] [--oidc-port 8124]

Prints ``cloud tasks emulator listening on HOST:PORT`` once ready. Without ``--queue-yaml``
there is only the ``default`` queue (an app folder without queue.yaml). Exit code 2 when the
port is taken or the queue.yaml given is missing or invalid.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence

from ... import defaults
from ...queue_config import QueueYamlError
from .._serve import serve_until_signalled
from ..errors import PortInUseError
from .routing import ServiceRoutes
from .server import CloudTasksEmulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gae_deferred.local.cloudtasks", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-dir", default=".local/cloudtasks", help="SQLite state lives here")
    parser.add_argument(
        "--queue-yaml",
        default=None,
        help="the queues to create (omitted: only the default queue, as App Engine has)",
    )
    parser.add_argument(
        "--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT") or "local-project"
    )
    parser.add_argument(
        "--location", default=os.environ.get("GAE_DEFERRED_LOCATION") or defaults.LOCATION
    )
    parser.add_argument("--app-url", default="http://127.0.0.1:8080", help="the default service")
    parser.add_argument(
        "--service-url",
        action="append",
        default=[],
        metavar="[VERSION.]SERVICE=URL",
        help="another service of the app (repeat): tasks routed to it go there",
    )
    parser.add_argument(
        "--oidc-port",
        type=int,
        default=None,
        help="sign HTTP-target tasks' OIDC tokens and serve the key (JWKS, certificates, "
        "OpenID discovery) over HTTP on this port (0: any free port)",
    )
    parser.add_argument(
        "--latency-ms",
        type=_latency,
        default=0.0,
        help="delay every RPC by this many milliseconds, like the real service's round trip",
    )
    return parser


def _latency(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run until a signal arrives; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="cloudtasks: %(message)s")
    if args.queue_yaml is not None and not os.path.exists(args.queue_yaml):
        print(f"error: queue.yaml not found: {args.queue_yaml}", file=sys.stderr)
        return 2
    try:
        routes = ServiceRoutes.parse(args.app_url, args.service_url)
    except ValueError as exc:
        print(f"error: --service-url: {exc}", file=sys.stderr)
        return 2
    emulator = CloudTasksEmulator(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        queue_yaml=args.queue_yaml,
        project=args.project,
        location=args.location,
        app_url=args.app_url,
        latency_ms=args.latency_ms,
        services=routes.services,
        oidc_port=args.oidc_port,
    )
    try:
        emulator.start()
    except QueueYamlError as exc:
        print(f"error: invalid queue.yaml:\n{exc.format()}", file=sys.stderr)
        return 2
    except PortInUseError:
        port = args.oidc_port if emulator.port and args.oidc_port is not None else args.port
        print(f"error: port {port} on {args.host} is already in use", file=sys.stderr)
        return 2
    if emulator.oidc is not None:
        print(f"cloud tasks emulator signs OIDC tokens: {emulator.oidc.issuer}", flush=True)
    serve_until_signalled(f"cloud tasks emulator listening on {args.host}:{emulator.port}")
    emulator.stop()
    print("cloud tasks emulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
