"""The dev server's front end: what App Engine's front end does before a request reaches the app.

It listens on the app's public port, reads each request's headers and body with deadlines
(408 when a client is too slow, 413 over App Engine's 32 MiB request limit), serves app.yaml's
static handlers itself and forwards complete requests only to gunicorn, which listens on an
internal loopback port. A client that trickles its body therefore holds a coroutine here,
never one of gunicorn's worker threads: ten slow clients cannot block a dashboard page.

Run by the local stack as the "app" child; it starts gunicorn (the command after ``--``) and
exits when gunicorn does::

    python -m gae_deferred.local.front --port 8080 --backend-port 41234 --app-yaml app.yaml \\
        -- python -m gunicorn main:app --bind 127.0.0.1:41234

One request per connection (answers carry ``Connection: close``); the Host header and the
request target reach the app as the client sent them, plus ``X-Forwarded-For``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mimetypes
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._process import spawn
from .app_yaml import (
    Handler,
    StaticHandler,
    load_app_yaml,
    match_handler,
    static_file as resolve_static_file,
)
from .errors import AppYamlError, HttpError

#: App Engine refuses requests larger than 32 MiB.
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
#: gunicorn's own limits (limit_request_line, limit_request_field_size, limit_request_fields):
#: the front refuses past them itself, so gunicorn's bare error pages (no security headers)
#: never answer a client of the stack.
MAX_REQUEST_LINE = 4094
MAX_HEADER_FIELD = 8190
MAX_HEADER_FIELDS = 100
#: On every answer the front gives itself (errors; never the app's own answers).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
HEADER_TIMEOUT = 10.0
#: A body must keep arriving (no gap longer than this) and be complete within BODY_TIMEOUT.
BODY_IDLE_TIMEOUT = 5.0
BODY_TIMEOUT = 60.0
BACKEND_CONNECT_TIMEOUT = 10.0
#: Bodies are buffered whole, as App Engine's front end does, but past this many bytes on
#: disk: 24 clients each streaming up to 32 MiB must not cost the dev server 768 MiB of RAM.
BODY_MEMORY_BYTES = 1024 * 1024
#: Set on the front's own 502 answers, so the stack tells "app not up yet" from an app's 502.
UNAVAILABLE_HEADER = "X-Gae-Deferred-Dev"
READY_TEXT = "front end listening on"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}
_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}
# Python's built-in table, not /etc/mime.types: the same answers on every machine.
_TYPES = mimetypes.MimeTypes()
_EXTRA_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".map": "application/json",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".webp": "image/webp",
    ".wasm": "application/wasm",
}


def content_type(path: Path) -> str:
    """The Content-Type a static file is served with."""
    guessed = _EXTRA_TYPES.get(path.suffix.lower()) or _TYPES.guess_type(path.name)[0]
    return guessed or "application/octet-stream"


class Body:
    """A request body kept in memory up to BODY_MEMORY_BYTES, in a temporary file past it."""

    def __init__(self) -> None:
        # Closed by close() once the request is answered or refused, not in a with-block.
        self._file = tempfile.SpooledTemporaryFile(max_size=BODY_MEMORY_BYTES)  # noqa: SIM115
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def blocks(self, size: int = 65536) -> Iterator[bytes]:
        """The body from its start, ``size`` bytes at a time."""
        self._file.seek(0)
        while block := self._file.read(size):
            yield block

    def close(self) -> None:
        self._file.close()


@dataclass
class Request:
    method: str
    target: str
    version: str
    #: (name, value) as the client sent them, in order.
    headers: list[tuple[str, str]]
    body: Body = field(default_factory=Body)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return ",".join(values) if values else None


class FrontServer:
    """The asyncio server; see the module docstring. ``handlers`` come from app.yaml."""

    def __init__(
        self,
        handlers: tuple[Handler, ...],
        backend_port: int,
        *,
        backend_host: str = "127.0.0.1",
        header_timeout: float = HEADER_TIMEOUT,
        body_idle_timeout: float = BODY_IDLE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.handlers = handlers
        self.backend = (backend_host, backend_port)
        self.header_timeout = header_timeout
        self.body_idle_timeout = body_idle_timeout
        self.body_timeout = body_timeout
        self.max_body_bytes = max_body_bytes

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: one request, answered here or by the app."""
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            try:
                request = await self._read_request(reader, writer)
                if request is None:
                    return
                try:
                    await self._dispatch(request, peer[0], writer)
                finally:
                    request.body.close()
            except HttpError as exc:
                if exc.status in (408, 413, 502):
                    print(f"front end: {exc.status} for {peer[0]}: {exc.message}", flush=True)
                await self._answer(writer, exc.status, exc.message.encode() + b"\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        try:
            async with asyncio.timeout(self.header_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError as exc:
            message = f"no complete request headers within {self.header_timeout:g}s"
            raise HttpError(408, message) from exc
        except asyncio.LimitOverrunError as exc:
            raise HttpError(431, f"request headers over {MAX_HEADER_BYTES} bytes") from exc
        except asyncio.IncompleteReadError:
            return None  # closed before sending a request
        request = _parse_head(head)
        length = _body_length(request, self.max_body_bytes)
        try:
            if length is None:
                await self._read_chunked(reader, request.body)
                return request
            if length and (request.header("expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            deadline = time.monotonic() + self.body_timeout
            await self._read_into(request.body, reader, length, deadline)
        except BaseException:
            request.body.close()
            raise
        return request

    async def _read_into(
        self, body: Body, reader: asyncio.StreamReader, size: int, deadline: float
    ) -> None:
        """Append ``size`` more bytes of body to ``body``."""
        end = body.size + size
        while body.size < end:
            wanted = min(65536, end - body.size)
            body.write(await self._body_part(reader.read(wanted), deadline, body.size))

    async def _body_part(
        self, read: Coroutine[Any, Any, bytes], deadline: float, received: int
    ) -> bytes:
        """Await one read of the body under the idle and overall deadlines (else 408)."""
        wait = min(self.body_idle_timeout, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0)):
                data = await read
        except TimeoutError as exc:
            raise HttpError(
                408,
                f"request body too slow: {received} bytes received, then nothing for "
                f"{self.body_idle_timeout:g}s or over {self.body_timeout:g}s in all",
            ) from exc
        if not data:
            raise ConnectionError("the client closed the connection mid-body")
        return data

    async def _read_chunked(self, reader: asyncio.StreamReader, body: Body) -> None:
        deadline = time.monotonic() + self.body_timeout
        while True:
            size_line = await self._body_part(reader.readline(), deadline, body.size)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise HttpError(400, "malformed chunked request body") from exc
            if size < 0 or body.size + size > self.max_body_bytes:
                raise HttpError(413, f"request body over {self.max_body_bytes} bytes")
            if size == 0:
                while await self._body_part(reader.readline(), deadline, body.size) not in (
                    b"\r\n",
                    b"\n",
                ):
                    pass  # trailers are dropped
                return
            await self._read_into(body, reader, size, deadline)
            end = await self._body_part(reader.readline(), deadline, body.size)
            if end not in (b"\r\n", b"\n"):
                raise HttpError(400, "malformed chunked request body")

    async def _dispatch(self, request: Request, client: str, writer: asyncio.StreamWriter) -> None:
        path = _path_of(request.target)
        found = match_handler(self.handlers, path) if path is not None else None
        if self.handlers and path is not None and found is None:
            raise HttpError(404, f"no handler in app.yaml matches {path}")
        if found is not None and isinstance(found[0], StaticHandler):
            await self._serve_static(request, found[0], resolve_static_file(*found), writer)
            return
        await self._forward(request, client, writer)

    async def _serve_static(
        self,
        request: Request,
        handler: StaticHandler,
        path: Path | None,
        writer: asyncio.StreamWriter,
    ) -> None:
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, f"{request.method} is not allowed on a static file")
        if path is None:
            raise HttpError(404, f"no such static file: {_path_of(request.target)}")
        size = path.stat().st_size
        headers = {
            "Content-Type": handler.mime_type or content_type(path),
            "Content-Length": str(size),
            # Locally an edited file must show on the next reload.
            "Cache-Control": "no-cache",
            **handler.http_headers,
        }
        writer.write(_status_line(200) + _header_block(headers))
        if request.method == "GET":
            with path.open("rb") as source:
                while chunk := await asyncio.to_thread(source.read, 65536):
                    writer.write(chunk)
                    await writer.drain()
        await writer.drain()

    async def _forward(self, request: Request, client: str, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(BACKEND_CONNECT_TIMEOUT):
                backend_reader, backend_writer = await asyncio.open_connection(*self.backend)
        except (OSError, TimeoutError) as exc:
            raise HttpError(
                502,
                f"the app (gunicorn on {self.backend[0]}:{self.backend[1]}) is not answering: "
                f"starting, reloading or crashed? See .local/logs/app.log ({exc})",
            ) from exc
        try:
            backend_writer.write(_backend_head(request, client))
            for block in request.body.blocks():
                backend_writer.write(block)
                await backend_writer.drain()
            try:
                head = await backend_reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise HttpError(502, "the app closed the connection without an answer") from exc
            # One write for the head and the start of the body (usually all of it); the app
            # closes after its answer (Connection: close): relay the rest as it comes.
            writer.write(_closing(head) + await backend_reader.read(65536))
            await writer.drain()
            while chunk := await backend_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            backend_writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await backend_writer.wait_closed()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        headers = {
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Length": str(len(body)),
            **SECURITY_HEADERS,
        }
        if status == 502:
            headers[UNAVAILABLE_HEADER] = "app-unavailable"
        if status == 405:
            headers["Allow"] = "GET, HEAD"
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(_status_line(status) + _header_block(headers) + body)
            await writer.drain()


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n".encode()


def _header_block(headers: dict[str, str]) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in {**headers, "Connection": "close"}.items()]
    return ("".join(lines) + "\r\n").encode("latin-1")


def _closing(head: bytes) -> bytes:
    """A response head with ``Connection: close`` (this connection ends with the answer)."""
    lines = head[:-4].split(b"\r\n")
    kept = [
        line
        for line in lines[1:]
        if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def _parse_head(head: bytes) -> Request:
    text = head.decode("latin-1")
    request_line, *lines = text[:-4].split("\r\n")
    if len(request_line) > MAX_REQUEST_LINE:
        raise HttpError(414, f"request line over {MAX_REQUEST_LINE} bytes")
    if len(lines) > MAX_HEADER_FIELDS:
        raise HttpError(431, f"more than {MAX_HEADER_FIELDS} header fields")
    if any(len(line) + 2 > MAX_HEADER_FIELD for line in lines):
        raise HttpError(431, f"a header field over {MAX_HEADER_FIELD} bytes")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, f"malformed request line {request_line[:100]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"unsupported protocol {version[:20]!r}")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise HttpError(400, f"malformed header line {line[:100]!r}")
        headers.append((name, value.strip()))
    return Request(method, target, version, headers)


def _body_length(request: Request, limit: int) -> int | None:
    """The Content-Length to read, or None for a chunked body."""
    encoding = request.header("transfer-encoding")
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise HttpError(501, f"unsupported Transfer-Encoding {encoding[:50]!r}")
        return None
    lengths = {v.strip() for k, v in request.headers if k.lower() == "content-length"}
    if not lengths:
        return 0
    if len(lengths) > 1 or not next(iter(lengths)).isdigit():
        raise HttpError(400, "invalid Content-Length")
    length = int(next(iter(lengths)))
    if length > limit:
        raise HttpError(413, f"request body of {length} bytes is over the {limit} byte limit")
    return length


def _path_of(target: str) -> str | None:
    """The decoded path of a request target (origin or absolute form); None for ``*``."""
    if target == "*":
        return None
    parsed = urllib.parse.urlsplit(target)
    return urllib.parse.unquote(parsed.path or "/", errors="replace")


def _backend_head(request: Request, client: str) -> bytes:
    named = {token.strip().lower() for token in (request.header("connection") or "").split(",")}
    dropped = _HOP_BY_HOP | named | {"x-forwarded-for"}
    lines = [f"{request.method} {request.target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in request.headers if name.lower() not in dropped]
    forwarded = request.header("x-forwarded-for")
    lines.append(f"X-Forwarded-For: {f'{forwarded}, ' if forwarded else ''}{client}")
    if request.body.size or request.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {request.body.size}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def serve(front: FrontServer, host: str, port: int, backend_argv: Sequence[str]) -> int:
    """Listen, start the app server, serve until a signal or the app server exits."""
    try:
        server = await asyncio.start_server(front.handle, host, port, limit=MAX_HEADER_BYTES)
    except OSError as exc:
        print(f"front end: cannot listen on {host}:{port}: {exc} (already in use?)", flush=True)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    backend = spawn(backend_argv, stdin=subprocess.DEVNULL)
    print(f"{READY_TEXT} http://{host}:{port} (app server pid {backend.pid})", flush=True)
    exited = asyncio.ensure_future(asyncio.to_thread(backend.wait))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.close()
    if not exited.done():
        backend.terminate()
        await exited
        return 0
    stopped.cancel()
    code = exited.result()
    print(f"front end: the app server exited with code {code}", flush=True)
    return code or 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gae_deferred.local.front``; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print("front end: give the app server's command after --", file=sys.stderr)
        return 2
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="python -m gae_deferred.local.front")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--app-yaml", required=True, help="its handlers: static files, app")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT)
    parser.add_argument("--body-idle-timeout", type=float, default=BODY_IDLE_TIMEOUT)
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    options = parser.parse_args(args[:split])
    try:
        app = load_app_yaml(options.app_yaml)
    except AppYamlError as exc:
        print(f"front end: {exc}", file=sys.stderr)
        return 2
    front = FrontServer(
        app.handlers,
        options.backend_port,
        header_timeout=options.header_timeout,
        body_idle_timeout=options.body_idle_timeout,
        body_timeout=options.body_timeout,
        max_body_bytes=options.max_body_bytes,
    )
    return asyncio.run(serve(front, options.host, options.port, args[split + 1 :]))


if __name__ == "__main__":
    sys.exit(main())
