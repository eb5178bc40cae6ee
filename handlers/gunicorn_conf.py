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

A header field over 8,190 bytes is the same story: ``limit_request_field_size`` is raised to
64 KiB (in gunicorn 27 a size of 0 does not lift the limit but restores the 8,190-byte
default) and ``deferred_middleware`` answers a field over 8,190 bytes with 431 and the security
headers. Past 64 KiB, and past 100 header fields (``limit_request_fields``, kept: the header
buffer gunicorn allows grows with fields times field size), gunicorn's own bare 431 page
answers.
Settings given on the command line win over this module's.
"""

from __future__ import annotations

limit_request_line = 0
limit_request_field_size = 64 * 1024
