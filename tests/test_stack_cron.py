"""make run calls cron.yaml's URLs (the sweeper) on a timer, with App Engine's cron header."""

from __future__ import annotations

import http.server
import threading
import time

from gae_deferred.local.stack import _Cron


def test_cron_calls_every_url_of_cron_yaml_on_schedule(tmp_path):
    calls = []

    class App(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append((self.path, self.headers.get("X-Appengine-Cron")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cron_yaml = tmp_path / "cron.yaml"
    cron_yaml.write_text("cron:\n- url: /sweep\n  schedule: every 10 minutes\n- url: /other\n")
    try:
        cron = _Cron(f"http://127.0.0.1:{server.server_port}", cron_yaml, every=0.05)
        cron.tick()
        assert calls == []
        time.sleep(0.06)
        cron.tick()
        assert calls == [("/sweep", "true"), ("/other", "true")]
        cron.tick()
        assert len(calls) == 2
        assert _Cron("http://127.0.0.1:9", cron_yaml, every=0).urls == ["/sweep", "/other"]
    finally:
        server.shutdown()
