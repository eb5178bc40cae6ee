"""gae-deferred-dev calls cron.yaml's URLs (the sweeper) on a timer, with its per-run token."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from gae_deferred.local.dev import Cron
from gae_deferred.local.errors import CronYamlError


def test_cron_calls_every_url_of_cron_yaml_on_schedule(tmp_path):
    calls = []

    class App(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            headers = self.headers
            calls.append((self.path, headers["X-Appengine-Cron"], headers["X-Deferred-Cron-Token"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cron_yaml = tmp_path / "cron.yaml"
    cron_yaml.write_text("cron:\n- url: /sweep\n  schedule: every 10 minutes\n- url: /other\n")
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        # An interval well over what two local requests take on a loaded machine: the third
        # tick comes before the next one is due.
        cron = Cron(url, cron_yaml, every=1.0, token="t0k")
        cron.tick()
        assert calls == []
        time.sleep(1.05)
        cron.tick()
        assert calls == [("/sweep", "true", "t0k"), ("/other", "true", "t0k")]
        cron.tick()
        assert len(calls) == 2
        off = Cron("http://127.0.0.1:9", cron_yaml, every=0, token="t")
        assert off.urls == ["/sweep", "/other"]
        assert Cron("http://127.0.0.1:9", None, every=60, token="t").urls == []
    finally:
        server.shutdown()


def test_unreadable_cron_yaml_is_named(tmp_path):
    bad = tmp_path / "cron.yaml"
    bad.write_text("cron: [\n")
    with pytest.raises(CronYamlError, match=f"{bad} is not valid YAML"):
        Cron("http://127.0.0.1:9", bad, every=60, token="t")
    bad.write_text("cron: 3\n")
    with pytest.raises(CronYamlError, match="expected a `cron:` list"):
        Cron("http://127.0.0.1:9", bad, every=60, token="t")
