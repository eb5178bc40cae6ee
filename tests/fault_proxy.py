"""A TCP proxy that injects faults between a gRPC client and its server (tests only).

It sits in front of the Datastore or Cloud Tasks emulator; the client is pointed at it::

    with FaultProxy(("127.0.0.1", emulator_port)) as proxy:
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", proxy.address)
        proxy.lose_next_reply()        # the next answer is lost after the server acted on it
        proxy.latency = 0.2            # seconds added to every chunk, each way
        proxy.reset_rate = 0.05        # each chunk: 5 % chance the connection is reset
        proxy.lost_reply_rate = 0.05   # each answer: 5 % chance it is lost (after the work)
        proxy.blackhole = True         # nothing forwarded, nothing answered, until False

A *lost reply* is the fault that makes an outcome unknown: the server received the whole
request and did the work; the proxy reads the server's HTTP/2 frames and, where a response
starts (a HEADERS frame on a stream), resets both connections instead of forwarding it. A
*reset* cuts a connection at any chunk, so the request may or may not have arrived. Resets are
TCP RSTs (SO_LINGER 0), as a dropped connection looks to gRPC.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Any

_HEADERS = 0x1
_FRAME_HEADER = 9


class FaultProxy:
    """Listens on a free loopback port and forwards each connection to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], seed: int = 0) -> None:
        self.upstream = upstream
        self.latency = 0.0
        self.reset_rate = 0.0
        self.lost_reply_rate = 0.0
        self.blackhole = False
        self.counts = {"connections": 0, "resets": 0, "lost_replies": 0}
        self._armed = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.getsockname()[1]}"

    def lose_next_reply(self, count: int = 1) -> None:
        """Lose the next ``count`` responses (each after the server acted on its request)."""
        with self._lock:
            self._armed += count

    def disarm(self) -> None:
        """Forget replies armed to be lost that were not lost yet."""
        with self._lock:
            self._armed = 0

    def reset_all(self) -> None:
        """Reset every open connection now (e.g. when a blackhole ends)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _reset(*pair)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._server.close()
        self.reset_all()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _chance(self, rate: float) -> bool:
        with self._lock:
            return rate > 0 and self._random.random() < rate

    def _take_armed(self) -> bool:
        with self._lock:
            if self._armed:
                self._armed -= 1
                return True
            return False

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client, None)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.counts["connections"] += 1
                self._pairs.append((client, upstream))
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], answers: bool) -> None:
        """Copy one direction: client to server, or (``answers``) server to client."""
        source, sink = (pair[1], pair[0]) if answers else pair
        frames = _FrameReader() if answers else None
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._drop(pair, count=None)
                return
            while self.blackhole and not self._closed.is_set():
                time.sleep(0.02)
            if self.latency:
                time.sleep(self.latency)
            if self._chance(self.reset_rate):
                self._drop(pair, count="resets")
                return
            if frames is not None:
                cut = frames.response_starts(data)
                if cut is not None and (self._take_armed() or self._chance(self.lost_reply_rate)):
                    # Forward what came before the response (other streams' frames), then cut.
                    _send(sink, data[:cut])
                    self._drop(pair, count="lost_replies")
                    return
            if not _send(sink, data):
                self._drop(pair, count=None)
                return

    def _drop(self, pair: tuple[socket.socket, socket.socket], count: str | None) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.remove(pair)
            if count:
                self.counts[count] += 1
        _reset(*pair)


class _FrameReader:
    """Follows the HTTP/2 frames of a server's byte stream across chunks."""

    def __init__(self) -> None:
        self._pending = b""
        self._skip = 0

    def response_starts(self, data: bytes) -> int | None:
        """The offset in ``data`` of the first HEADERS frame on a stream (a response), or None."""
        found = None
        offset = 0
        buffered = len(self._pending)
        stream = self._pending + data
        position = 0
        while True:
            if self._skip:
                step = min(self._skip, len(stream) - position)
                position += step
                self._skip -= step
                if self._skip:
                    break
            if len(stream) - position < _FRAME_HEADER:
                break
            length = int.from_bytes(stream[position : position + 3], "big")
            kind = stream[position + 3]
            (stream_id,) = struct.unpack(">I", stream[position + 5 : position + 9])
            if found is None and kind == _HEADERS and stream_id & 0x7FFFFFFF:
                offset = max(0, position - buffered)
                found = offset
            position += _FRAME_HEADER
            self._skip = length
        self._pending = stream[position:]
        return found


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def _reset(first: socket.socket, second: socket.socket | None) -> None:
    for sock in (first, second):
        if sock is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wakes the other direction's thread out of recv(); sends nothing to the peer.
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        sock.close()
