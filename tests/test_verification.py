"""The verification code pinned down exactly: what ``make mutation`` showed no test noticed.

Envelopes here are built by hand (struct, json, hmac) rather than by the code under test, so a
change to the wire format, a bound or a message fails a test: a golden envelope fixes the
format (version, flags, key id length, header JSON, HMAC), every refusal is matched on its
whole message, and each bound is tried at the limit and one past it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import struct
import zlib

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import (
    PermanentTaskFailure,
    TaskInfo,
    UnverifiedEnvelope,
    _signing,
    context,
    envelope,
)
from gae_deferred.webapp2 import deferred_routes
from gae_deferred.webapp2.deferred_task import MAX_BODY_BYTES, read_body

KEY = bytes(range(32))
KID = "79a35ec373f9"  # sha256(b"gae_deferred key id:" + KEY), first 12 hex digits
#: pickle protocol 4 of (operator.add, (2, 3), {}).
ADD_2_3 = (
    b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\t_operator\x94\x8c\x03add\x94\x93\x94"
    b"K\x02K\x03\x86\x94}\x94\x87\x94."
)
#: An envelope as format version 1 writes it: a deploy that changes a byte of this breaks every
#: task queued before it.
GOLDEN = bytes.fromhex(
    "474145444546"  # GAEDEF
    "01"  # format version
    "00"  # flags
    "00000031"  # header length, big endian
    "7b2266756e6374696f6e223a225f6f70657261746f722e616464222c226b6964223a22"
    "373961333565633337336639227d"  # {"function":"_operator.add","kid":"79a35ec373f9"}
    "8004951f000000000000008c095f6f70657261746f72948c036164649493944b024b03"
    "86947d9487942e"  # the body: ADD_2_3
    "a62d8df38d111ed9bfe8783ea9dde4c5ca0e623d137a045d5278b2450c5942da"  # HMAC-SHA256
)


@pytest.fixture(autouse=True)
def _key():
    gae_deferred.configure(signing_key=KEY)


def sealed(
    header: bytes | dict, body: bytes = ADD_2_3, *, version: int = 1, flags: int = 0
) -> bytes:
    """An envelope made by hand, signed with KEY over all of it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    unsigned = b"GAEDEF" + struct.pack(">BBI", version, flags, len(raw)) + raw + body
    return unsigned + hmac.new(KEY, unsigned, hashlib.sha256).digest()


def refused(data: bytes) -> str:
    with pytest.raises(UnverifiedEnvelope) as raised:
        envelope.open_envelope(data)
    return str(raised.value)


def failed(data: bytes) -> str:
    with pytest.raises(PermanentTaskFailure) as raised:
        envelope.open_envelope(data)
    return str(raised.value)


# -- wire format ------------------------------------------------------------------------------


def test_the_golden_envelope_is_what_sealing_writes_and_it_still_runs():
    assert _signing.key_id(KEY) == KID and len(KID) == 12
    assert envelope._seal({"function": "_operator.add"}, ADD_2_3, 0, signing=(KID, KEY)) == GOLDEN
    assert sealed(b'{"function":"_operator.add","kid":"79a35ec373f9"}') == GOLDEN
    opened = envelope.open_envelope(GOLDEN)
    assert opened.header == {"function": "_operator.add", "kid": KID}
    assert (bytes(opened.body), opened.flags, opened.size) == (ADD_2_3, 0, len(GOLDEN))
    assert gae_deferred.run(GOLDEN) == 5
    assert envelope.read_header(GOLDEN) == {"function": "_operator.add", "kid": KID}


def test_the_format_constants():
    assert (envelope.MAGIC, envelope.FORMAT_VERSION) == (b"GAEDEF", 1)
    assert (envelope.FLAG_ZLIB, envelope.FLAG_REFERENCE) == (1, 2)
    assert envelope.encode_header({"b": 1, "a": "é"}) == b'{"a":"\\u00e9","b":1}'


def test_a_rebound_envelope_keeps_its_body_and_flags_and_names_the_new_task():
    body = zlib.compress(ADD_2_3)
    data = sealed({"kid": KID, "task": "t1", "raw_bytes": len(ADD_2_3)}, body, flags=1)
    again = envelope.rebind(data, task="t2")
    header_len = struct.unpack(">I", again[8:12])[0]
    assert again[:8] == b"GAEDEF\x01\x01"
    assert again[12 + header_len : -32] == body
    assert json.loads(again[12 : 12 + header_len]) == {
        "kid": KID,
        "raw_bytes": len(ADD_2_3),
        "task": "t2",
    }
    assert again[-32:] == hmac.new(KEY, again[:-32], hashlib.sha256).digest()
    # Never inflated: a kept body rebinds even where it could not be inflated any more.
    gae_deferred.configure(max_payload_bytes=10)
    assert envelope.rebind(data, task="t3")[12 + header_len : -32] == body


# -- keys -------------------------------------------------------------------------------------


def test_derived_keys_depend_on_their_purpose_and_on_the_signing_key():
    csrf = _signing.derive_key("admin csrf")
    assert csrf == hashlib.sha256(b"gae_deferred admin csrf\0" + KEY).digest()
    assert _signing.derive_key("admin cursor") == (
        hashlib.sha256(b"gae_deferred admin cursor\0" + KEY).digest()
    )
    gae_deferred.configure(signing_key=b"another key, 32 bytes long......")
    assert _signing.derive_key("admin csrf") != csrf


def test_without_a_signing_key_derived_keys_come_from_the_process_secret():
    gae_deferred.configure(signing_key=None)
    secret = _signing._fallback_secret
    assert len(secret) == 32
    assert _signing.derive_key("admin csrf") == (
        hashlib.sha256(b"gae_deferred admin csrf\0" + secret).digest()
    )
    with pytest.raises(gae_deferred.ConfigurationError) as raised:
        _signing.signing_key()
    assert str(raised.value) == (
        "no signing key: set GAE_DEFERRED_SIGNING_KEY (hex), GAE_DEFERRED_SIGNING_KEY_FILE, "
        "or configure(signing_key_provider=...); on the local stack run `. .local/env`"
    )


def test_the_signing_key_on_a_cold_cache(monkeypatch):
    monkeypatch.setattr(_signing, "_cache", None)
    assert _signing.signing_key() == (KID, KEY)
    assert _signing._cache is not None and _signing.signing_key() == (KID, KEY)


def test_a_key_provider_and_previous_keys():
    old = b"o" * 32
    gae_deferred.configure(
        signing_key=None, signing_key_provider=lambda: KEY.hex(), previous_signing_keys=[old]
    )
    # A str from the provider is the key's bytes as text (not decoded from hex).
    assert _signing.signing_key() == (_signing.key_id(KEY.hex().encode()), KEY.hex().encode())
    assert _signing.verification_key(_signing.key_id(old)) == old
    assert _signing.verification_key("000000000000") is None
    gae_deferred.configure(signing_key_provider=lambda: KEY)
    assert _signing.signing_key() == (KID, KEY)


# -- refusals, each with its whole message ---------------------------------------------------


def test_too_short_for_any_envelope():
    assert refused(b"GAEDEF" + b"\0" * 37) == (
        "payload truncated: 43 bytes is shorter than any envelope"
    )
    # 44 bytes: as short as an envelope can be (no header, no body) is read on.
    shortest = b"GAEDEF\x01\x00" + b"\0" * 36
    assert refused(shortest) == "envelope header is not a JSON object"
    assert envelope.open_envelope(sealed({"kid": KID}, b"")).body == b""


def test_foreign_magic():
    data = b"GAEDEX" + sealed({"kid": KID})[6:]
    assert refused(data) == "not a gae_deferred envelope (foreign or legacy payload)"


@pytest.mark.parametrize(
    ("version", "flags", "message"),
    [
        (0, 0, "envelope format version 0 / flags 0x0 unknown"),
        (1, 4, "envelope format version 1 / flags 0x4 unknown"),
        (1, 0x80, "envelope format version 1 / flags 0x80 unknown"),
        (2, 0, "envelope format version 2 is newer than this runtime reads (1)"),
    ],
)
def test_signed_envelopes_of_unknown_versions_or_flags_are_refused(version, flags, message):
    assert refused(sealed({"kid": KID}, version=version, flags=flags)) == message


def test_every_known_flag_is_accepted():
    ref = {"kid": KID, "ref": {"id": "x", "chunks": 1}}
    assert envelope.open_envelope(sealed(ref, b"", flags=2)).is_reference
    data = sealed({"kid": KID, "raw_bytes": len(ADD_2_3)}, zlib.compress(ADD_2_3), flags=1)
    assert bytes(envelope.open_envelope(data).body) == ADD_2_3


def test_the_header_length_is_bounded_before_any_json_is_parsed():
    """Up to 64 KiB of header; one byte more is refused before parsing, even when signed."""
    limit = 64 * 1024
    pad = limit - len(json.dumps({"kid": KID, "pad": ""}))
    at_limit = json.dumps({"kid": KID, "pad": "x" * pad}).encode()
    assert len(at_limit) == limit
    assert envelope.open_envelope(sealed(at_limit)).header["kid"] == KID
    over = json.dumps({"kid": KID, "pad": "x" * (pad + 1)}).encode()
    assert refused(sealed(over)) == "payload truncated or corrupt: header runs past the end"


def test_a_header_running_into_the_signature_is_refused():
    data = bytearray(sealed({"kid": KID}, b""))
    header_len = struct.unpack(">I", data[8:12])[0]
    for extra in (1, 32):
        data[8:12] = struct.pack(">I", header_len + extra)
        assert refused(bytes(data)) == "payload truncated or corrupt: header runs past the end"


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null", b"{}x", b"{", b"\xff{}"])
def test_a_header_that_is_not_one_json_object_is_refused(raw):
    assert refused(sealed(raw)) == "envelope header is not a JSON object"


def test_a_deeply_nested_header_is_refused_not_a_crash():
    assert refused(sealed(b"[" * 30000 + b"]" * 30000)) == "envelope header is not a JSON object"


def test_unknown_key_and_bad_signature():
    assert refused(sealed({"kid": "000000000000"})) == (
        "envelope signed with unknown key id '000000000000': not executing it"
    )
    assert refused(sealed({})) == "envelope signed with unknown key id None: not executing it"
    data = bytearray(sealed({"kid": KID}))
    data[-33] ^= 1  # the body's last byte
    assert refused(bytes(data)) == "envelope signature does not match: tampered or truncated"
    data = bytearray(sealed({"kid": KID}))
    data[-1] ^= 0x80
    assert refused(bytes(data)) == "envelope signature does not match: tampered or truncated"


def test_read_header_shows_unverified_headers_and_refuses_the_rest():
    assert envelope.read_header(sealed({"kid": "nobody", "function": "f"})) == {
        "kid": "nobody",
        "function": "f",
    }
    with pytest.raises(PermanentTaskFailure) as raised:
        envelope.read_header(b"GAEDEF\x01\x00\x00\x00\x00")
    assert str(raised.value) == "not a gae_deferred envelope"
    with pytest.raises(PermanentTaskFailure) as raised:  # 12 bytes: a prefix, no header
        envelope.read_header(b"GAEDEF\x01\x00\x00\x00\x00\x00")
    assert str(raised.value).startswith("envelope header is not valid JSON: ")
    with pytest.raises(PermanentTaskFailure) as raised:
        envelope.read_header(b"XAEDEF" + sealed({})[6:])
    assert str(raised.value) == "not a gae_deferred envelope"
    with pytest.raises(PermanentTaskFailure) as raised:
        envelope.read_header(sealed(b"{"))
    assert str(raised.value).startswith("envelope header is not valid JSON: ")


# -- compressed bodies ------------------------------------------------------------------------


def zipped(raw: bytes, declared: int | None) -> bytes:
    header = {"kid": KID} if declared is None else {"kid": KID, "raw_bytes": declared}
    return sealed(header, zlib.compress(raw), flags=1)


def test_a_body_inflates_to_exactly_its_declared_size_and_not_one_byte_more():
    raw = b"a" * 1000
    assert bytes(envelope.open_envelope(zipped(raw, 1000)).body) == raw
    assert failed(zipped(raw, 999)) == (
        "envelope body inflates past 999 bytes (its declared size, at most max_payload_bytes): "
        "refused"
    )
    assert bytes(envelope.open_envelope(zipped(b"", 0)).body) == b""
    assert failed(zipped(b"a", 0)) == (
        "envelope body inflates past 0 bytes (its declared size, at most max_payload_bytes): "
        "refused"
    )
    gae_deferred.configure(max_payload_bytes=1000)
    assert bytes(envelope.open_envelope(zipped(raw, None)).body) == raw
    assert failed(zipped(raw + b"a", None)) == (
        "envelope body inflates past 1,000 bytes (its declared size, at most max_payload_bytes): "
        "refused"
    )
    # A declared size over the cap, negative, or not a number: the cap holds.
    for declared in (5000, -1, True, "1001"):
        assert "inflates past 1,000 bytes" in failed(zipped(raw + b"a", declared))


def test_a_signed_truncated_or_corrupt_zlib_stream_never_reaches_unpickling():
    whole = zlib.compress(ADD_2_3)
    header = {"kid": KID, "raw_bytes": len(ADD_2_3)}
    assert failed(sealed(header, whole[:-4], flags=1)) == (
        "envelope body does not decompress: truncated zlib stream"
    )
    message = failed(sealed(header, b"\x00" + whole[1:], flags=1))
    assert message.startswith("envelope body does not decompress: Error -3 ")


def test_decompressed_inflates_a_body_opened_without_decompressing():
    data = zipped(ADD_2_3, len(ADD_2_3))
    kept = envelope.open_envelope(data, decompress=False)
    assert kept.flags == 1 and bytes(kept.body) == zlib.compress(ADD_2_3)
    opened = envelope.decompressed(kept)
    assert (opened.flags, opened.body) == (0, ADD_2_3)
    plain = envelope.open_envelope(sealed({"kid": KID}))
    assert envelope.decompressed(plain) is plain


def test_load_call_names_both_runtimes_when_a_payload_cannot_load():
    header = {"kid": KID, "function": "gone.f", "python": "3.0", "cloudpickle": "0.1"}
    data = sealed({**header, "app_version": "v7"}, b"x")
    with pytest.raises(gae_deferred.PayloadLoadError) as raised:
        envelope.load_call(envelope.open_envelope(data))
    message = str(raised.value)
    assert message.startswith(
        "version skew: cannot load payload of gone.f: UnpicklingError: invalid load key, 'x'.; "
        "it was written by Python 3.0 / cloudpickle 0.1 / app version v7, this runtime is "
        f"Python {envelope.PYTHON_VERSION} / cloudpickle {envelope.CLOUDPICKLE_VERSION} / app "
        "version "
    )
    assert message.endswith("; retry it on app version v7, which made it")
    assert envelope.load_call(envelope.open_envelope(GOLDEN))[1:] == ((2, 3), {})


# -- task headers (context.py) -------------------------------------------------------------


def test_task_headers_are_read_exactly():
    info = TaskInfo.from_headers(
        {
            "X-AppEngine-QueueName": "q",
            "X-AppEngine-TaskName": "t",
            "X-AppEngine-TaskRetryCount": "3",
            "X-AppEngine-TaskExecutionCount": "2",
            "X-AppEngine-TaskETA": "1700000000.25",
            "X-AppEngine-TaskPreviousResponse": "503",
            "X-AppEngine-TaskRetryReason": "deadline",
        }
    )
    assert info == TaskInfo("t", "q", 3, 2, 1700000000.25, 503, "deadline", app_engine=True)
    odd = TaskInfo.from_headers(
        {
            "X-CloudTasks-QueueName": "q",
            "X-CloudTasks-TaskName": "t",
            "X-CloudTasks-TaskRetryCount": "-4",
            "X-CloudTasks-TaskExecutionCount": "many",
            "X-CloudTasks-TaskETA": "soon",
            "X-CloudTasks-TaskPreviousResponse": "0",
        }
    )
    assert odd == TaskInfo("t", "q", 0, 0, None, None, None)
    assert TaskInfo.from_headers({"X-AppEngine-QueueName": "q"}) is None
    assert TaskInfo.from_headers({"X-AppEngine-TaskName": "t"}) is None
    assert TaskInfo.from_headers({"X-CloudTasks-TaskName": "t"}) is None
    assert TaskInfo.from_headers({"X-AppEngine-QueueName": "", "X-AppEngine-TaskName": "t"}) is None
    assert TaskInfo.from_environ({"HTTP_X_APPENGINE_QUEUENAME": "q"}) is None
    environ = {"HTTP_X_APPENGINE_QUEUENAME": "q", "HTTP_X_APPENGINE_TASKNAME": "t"}
    assert TaskInfo.from_environ(environ) == TaskInfo("t", "q", app_engine=True)


def test_a_cloud_tasks_queue_beside_an_app_engine_name_off_app_engine(monkeypatch):
    monkeypatch.delenv("GAE_ENV", raising=False)
    info = TaskInfo.from_headers(
        {
            "X-CloudTasks-QueueName": "q",
            "X-AppEngine-TaskName": "t",
            "X-CloudTasks-TaskRetryCount": "4",
            "X-AppEngine-TaskRetryCount": "9",
        }
    )
    assert (info.queue, info.name, info.retry_count) == ("q", "t", 4)
    monkeypatch.setenv("GAE_ENV", "standard")
    assert context.on_app_engine() is True
    monkeypatch.setenv("GAE_ENV", "")
    assert context.on_app_engine() is False


def test_the_current_task_outside_and_inside():
    assert (gae_deferred.current_task(), gae_deferred.task_name(), gae_deferred.queue_name()) == (
        None,
        None,
        None,
    )
    assert (gae_deferred.task_retry_count(), gae_deferred.task_execution_count()) == (0, 0)
    task = TaskInfo("t", "q", 2, 1)
    with context.running(task) as entered:
        assert entered is task and gae_deferred.current_task() is task
        assert (gae_deferred.task_name(), gae_deferred.queue_name()) == ("t", "q")
        assert (gae_deferred.task_retry_count(), gae_deferred.task_execution_count()) == (2, 1)
    assert gae_deferred.current_task() is None


# -- the handler's body reader ----------------------------------------------------------------


class Trickle(io.BytesIO):
    """Hands out at most 3 bytes per read(), as a server may."""

    def read(self, size: int = -1) -> bytes:
        return super().read(min(size, 3) if size >= 0 else 3)


def test_read_body_reads_exactly_the_declared_length_or_refuses():
    assert read_body({"wsgi.input": Trickle(b"abcdefgh"), "CONTENT_LENGTH": "8"}) == b"abcdefgh"
    # Never past the declared length, whatever follows it on the connection.
    assert read_body({"wsgi.input": Trickle(b"abcdefghXYZ"), "CONTENT_LENGTH": "8"}) == b"abcdefgh"
    assert read_body({"wsgi.input": io.BytesIO(b"abc"), "CONTENT_LENGTH": "0"}) == b""
    assert read_body({"wsgi.input": io.BytesIO(b"abcd"), "CONTENT_LENGTH": "4"}, cap=4) == b"abcd"
    cases = {
        ("7", 10, b"abc"): "body ended after 3 of 7 bytes",
        ("x9", 10, b""): "Content-Length 'x9' is not a number",
        ("y" * 30, 10, b""): f"Content-Length {'y' * 20!r} is not a number",
        ("11", 10, b""): "body of 11 bytes is larger than any task",
        ("", 10, b"a" * 11): "body is larger than any task (10 bytes)",
    }
    for (declared, cap, data), message in cases.items():
        environ = {"wsgi.input": io.BytesIO(data), "CONTENT_LENGTH": declared}
        with pytest.raises(Exception) as raised:
            read_body(environ, cap)
        assert str(raised.value) == message
    assert read_body({"wsgi.input": io.BytesIO(b"a" * 10), "CONTENT_LENGTH": ""}, 10) == b"a" * 10
    assert MAX_BODY_BYTES == 1024 * 1024


@pytest.fixture
def app(ndb_stub):
    return webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))


TASK = {"X-AppEngine-QueueName": "q", "X-AppEngine-TaskName": "t"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Content-Type": "text/plain; charset=utf-8",
}


def answer(response: webtest.TestResponse) -> tuple[int, str, dict[str, str]]:
    kept = {name: response.headers[name] for name in HEADERS if name in response.headers}
    return response.status_int, response.text, kept


def test_the_handler_answers_exactly(app):
    bound = sealed({"kid": KID, "task": "t", "queue": "q"})
    assert answer(app.post("/_ah/queue/deferred", bound, headers=TASK)) == (200, "ok\n", HEADERS)
    refusal = app.post("/_ah/queue/deferred", bound, status="*")
    assert answer(refusal) == (403, "forbidden\n", HEADERS)
    too_big = app.post("/_ah/queue/deferred", b"x" * (MAX_BODY_BYTES + 1), headers=TASK, status="*")
    assert answer(too_big) == (
        413,
        f"body of {MAX_BODY_BYTES + 1} bytes is larger than any task\n",
        HEADERS,
    )
    get = app.get("/_ah/queue/deferred/f.g", headers=TASK, status="*")
    assert answer(get) == (405, "GET is not allowed; tasks are POSTed\n", HEADERS)
    assert get.headers["Allow"] == "POST"
    not_object = app.post("/_ah/queue/deferred", sealed(b"[]"), headers=TASK, status="*")
    assert answer(not_object)[:2] == (403, "forbidden\n")


def test_a_short_body_is_400(app):
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/_ah/queue/deferred",
        "CONTENT_LENGTH": "10",
        "wsgi.input": io.BytesIO(b"abc"),
        "HTTP_X_APPENGINE_QUEUENAME": "q",
        "HTTP_X_APPENGINE_TASKNAME": "t",
    }
    request = webapp2.Request.blank("/_ah/queue/deferred", environ=environ)
    response = request.get_response(webapp2.WSGIApplication(deferred_routes()))
    assert (response.status_int, response.text) == (400, "body ended after 3 of 10 bytes\n")


def test_a_pickle_in_a_signed_envelope_runs_only_as_its_task(app):
    ran = pickle.dumps((print, ("should not print",), {}))
    other = sealed({"kid": KID, "task": "other", "queue": "q"}, ran)
    response = app.post("/_ah/queue/deferred", other, headers=TASK, status="*")
    assert answer(response)[:2] == (403, "forbidden\n")
