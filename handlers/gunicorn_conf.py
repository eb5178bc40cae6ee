"""gunicorn settings for an app behind :func:`gae_deferred.webapp2.deferred_middleware`.

app.yaml::

    entrypoint: gunicorn -c python:gae_deferred.webapp2.gunicorn_conf -b :$PORT -w 2 main:app

gunicorn answers a request line over its ``limit_request_line`` (default 4,094 bytes) with its
own static 414 page before any app code runs, so without the security headers every other
answer of the dashboard carries (no Content-Security-Policy, no X-Frame-Options). Here the limit
is lifted (0: gunicorn reads request lines of any length; its optional C parser caps them at
1 MiB) and ``deferred_middleware`` answers a request line over 4,094 bytes itself, with 414 and
the security headers, for every path. On App Engine the front end receives the whole request
before the instance does and bounds its size; served elsewhere, put a proxy with a request-line
limit in front.

Header fields keep gunicorn's limits (``limit_request_field_size`` 8,190 bytes,
``limit_request_fields`` 100): in gunicorn 27 a field size of 0 does not lift the limit but
restores the 8,190-byte default, so there is no setting that would pass them to the app.
Settings given on the command line win over this module's.
"""

from __future__ import annotations

limit_request_line = 0
