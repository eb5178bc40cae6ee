"""/static/<file>: the dashboard's CSS, SVG and script."""

from __future__ import annotations

import mimetypes
import os
import re

import webapp2

from ... import _admin_guard as guard, _templates
from ..base import SECURITY_HEADERS

_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(css|svg|js|png|ico)$")


class StaticFile(webapp2.RequestHandler):
    """The dashboard's CSS/SVG, for stacks without app.yaml's static_dir (no secrets here).

    Cacheable for five minutes: the only responses without ``Cache-Control: no-store``.
    """

    def dispatch(self) -> None:
        self.response.headers.update(SECURITY_HEADERS)
        refused = guard.refusal(self.request.environ)
        if refused is not None:
            self.response.status_int, message = refused
            self.response.content_type = "text/plain"
            self.response.write(message + "\n")
            return
        super().dispatch()

    def get(self, name: str) -> None:
        path = os.path.join(_templates.STATIC_DIR, name)
        if not _STATIC_NAME.match(name) or not os.path.isfile(path):
            self.response.status_int = 404
            self.response.content_type = "text/plain"
            self.response.write("not found\n")
            return
        with open(path, "rb") as static:
            self.response.body = static.read()
        self.response.content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.response.headers["Cache-Control"] = "public, max-age=300"
