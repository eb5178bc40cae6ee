"""Slow clients against the real stack: bodies that trickle in never hold up the dashboard.

Ten connections promise 1000 bytes of body and send 10. gunicorn alone (2 workers x 4 threads)
would give each a thread until its timeout, and every other request would wait; the front end
buffers requests first, as App Engine's does, and answers the stalled ones 408.
"""

from __future__ import annotations

import socket
import time

import requests

from gae_deferred.local.front import BODY_IDLE_TIMEOUT
from gae_deferred.local.stack import LocalStack


def _slow_client(stack: LocalStack) -> socket.socket:
    conn = socket.create_connection((stack.host, stack.app_port), timeout=30)
    conn.sendall(
        b"POST /_ah/queue/deferred HTTP/1.1\r\n"
        + f"Host: {stack.host}:{stack.app_port}\r\n".encode()
        + b"Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
        + b"x" * 10
    )
    return conn


def test_ten_slow_bodies_do_not_block_a_dashboard_page(rel: LocalStack) -> None:
    slow = [_slow_client(rel) for _ in range(10)]
    try:
        time.sleep(0.5)  # every slow request is in, waiting for its body
        started = time.monotonic()
        pages = [
            requests.get(rel.dashboard_url + page, timeout=10)
            for page in ("", "/queues", "/failures", "/spillover")
        ]
        elapsed = time.monotonic() - started
        assert [page.status_code for page in pages] == [200] * 4
        assert elapsed < 3, f"4 dashboard pages took {elapsed:.1f}s behind 10 slow clients"

        answers = []
        for conn in slow:
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                data += chunk
            answers.append(data)
        waited = time.monotonic() - started
        assert all(a.startswith(b"HTTP/1.1 408 Request Timeout") for a in answers), answers[0]
        assert waited < BODY_IDLE_TIMEOUT + 3
    finally:
        for conn in slow:
            conn.close()
    assert rel.dead_children() == []
