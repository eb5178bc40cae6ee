"""serialize()/run(): every callable kind round-trips; damaged envelopes never execute."""

from __future__ import annotations

import functools
import json
import operator
import pickle
import socket
import struct
import threading
import zlib

import pytest
from hypothesis import given, settings, strategies as st

import gae_deferred
from gae_deferred import PermanentTaskFailure, SerializationError, envelope, run, serialize
from tests.callables import Adder, Result, add

EXECUTED: list[str] = []


def _mark(label):
    EXECUTED.append(label)
    return label


def make_closure(offset):
    def inner(value):
        return value + offset

    return inner


def local_class_method():
    class Local:
        def __init__(self, factor):
            self.factor = factor

        def scale(self, value):
            return self.factor * value

    return Local(3).scale


def nested_class_instance():
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __call__(self):
            return self.x + self.y

    return Point(2, 5)


CASES = [
    ("module function", add, (1,), {"b": 2}, 3),
    ("class", Result, (4,), {}, Result(4)),
    ("callable instance", Adder(10), (5,), {}, 15),
    ("bound method", Adder(3).method, (4,), {}, 12),
    ("classmethod", Adder.make, (7,), {}, 7),
    ("staticmethod", Adder.static, (7,), {}, -7),
    ("builtin", len, ([1, 2, 3],), {}, 3),
    ("builtin method", "a-b".split, ("-",), {}, ["a", "b"]),
    ("partial", functools.partial(add, 5), (1,), {}, 6),
    ("operator", operator.mul, (6, 7), {}, 42),
    ("lambda", lambda x: x * 2, (21,), {}, 42),
    ("closure", make_closure(100), (1,), {}, 101),
    ("method of a local class", local_class_method(), (5,), {}, 15),
    ("nested class instance", nested_class_instance(), (), {}, 7),
]


@pytest.mark.parametrize(
    ("label", "obj", "args", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_round_trip_every_callable_kind(label, obj, args, kwargs, expected):
    assert run(serialize(obj, *args, **kwargs)) == expected


def test_lambda_defined_in_main_like_module_uses_cloudpickle():
    namespace = {"__name__": "__main__"}
    exec("def main_func(x):\n    return x + 1\n", namespace)
    data = serialize(namespace["main_func"], 1)
    assert envelope.read_header(data)["serializer"] == "cloudpickle"
    assert run(data) == 2


def test_importable_function_takes_the_plain_pickle_fast_path():
    header = envelope.read_header(serialize(add, 1, 2))
    assert header["serializer"] == "pickle"
    assert header["function"] == "tests.callables.add"


def test_header_metadata():
    data = serialize(add, "x" * 500, [1, 2, 3, 4, 5, 6, 7], flag=True)
    header = envelope.read_header(data)
    assert header["function"] == "tests.callables.add"
    assert len(header["args"]) <= 200
    assert "flag=True" in header["args"] or header["args"].endswith("...")
    assert header["python"] and header["cloudpickle"]
    assert header["raw_bytes"] >= 500
    assert header["kid"]


def test_function_names():
    assert envelope.function_name(Adder(1).method) == "tests.callables.Adder.method"
    assert envelope.function_name(Adder(1)) == "tests.callables.Adder.__call__"
    assert envelope.function_name(len) == "builtins.len"
    assert "<lambda>" in envelope.function_name(lambda: None)


def test_args_preview_survives_a_raising_repr():
    class Nasty:
        def __repr__(self):
            raise RuntimeError("no")

    assert envelope.args_preview((Nasty(),), {}).startswith("<Nasty")


def test_compression_only_when_it_pays():
    compressible = serialize(add, "a" * 50_000, "")
    assert envelope.open_envelope(compressible).flags & envelope.FLAG_ZLIB
    assert len(compressible) < 5_000
    random_bytes = serialize(add, bytes(range(256)) * 4 + __import__("os").urandom(50_000), b"")
    assert not envelope.open_envelope(random_bytes).flags & envelope.FLAG_ZLIB


def test_compression_off():
    gae_deferred.configure(compression_level=0)
    assert not envelope.open_envelope(serialize(add, "a" * 50_000, "")).flags


@settings(max_examples=150, deadline=None)
@given(
    args=st.lists(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text()
            | st.binary(),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=5), children, max_size=4)
                | st.tuples(children, children)
            ),
            max_leaves=20,
        ),
        max_size=5,
    )
)
def test_round_trip_arbitrary_arguments(args):
    assert run(serialize(_identity, *args)) == tuple(args)


def _identity(*args):
    return args


# --- damaged envelopes: nothing executes ------------------------------------------------------


def _victim():
    return serialize(_mark, "ran")


def _assert_rejected(data, fragment):
    EXECUTED.clear()
    with pytest.raises(PermanentTaskFailure, match=fragment):
        run(data)
    assert EXECUTED == []


def test_tampered_body_is_rejected():
    data = bytearray(_victim())
    data[-40] ^= 0x01
    _assert_rejected(bytes(data), "signature does not match")


def test_tampered_header_is_rejected():
    data = _victim()
    forged = data.replace(b"test_envelope._mark", b"test_envelope._mArk", 1)
    assert forged != data
    _assert_rejected(forged, "signature does not match")


@pytest.mark.parametrize("cut", [0, 5, 20, 60, -1, -33])
def test_truncated_envelope_is_rejected(cut):
    _assert_rejected(_victim()[:cut], "truncated|signature|header")


def test_foreign_payload_is_rejected():
    _assert_rejected(pickle.dumps((_mark, ("ran",), {})), "not a gae_deferred envelope")


def test_future_version_is_rejected():
    data = bytearray(_victim())
    data[6] = envelope.FORMAT_VERSION + 1
    _assert_rejected(bytes(data), "newer than this runtime")


def test_unknown_key_is_rejected():
    gae_deferred.configure(signing_key=b"\x01" * 32)
    data = _victim()
    gae_deferred.configure(signing_key=b"\x02" * 32)
    _assert_rejected(data, "unknown key id")


def test_rotated_key_still_verifies():
    old = b"\x01" * 32
    gae_deferred.configure(signing_key=old)
    data = serialize(add, 1, 1)
    gae_deferred.configure(signing_key=b"\x02" * 32, previous_signing_keys=(old,))
    assert run(data) == 2


def test_forged_envelope_with_a_guessed_mac_is_rejected():
    body = pickle.dumps((_mark, ("ran",), {}))
    header = json.dumps({"function": "x", "kid": envelope.read_header(_victim())["kid"]}).encode()
    prefix = struct.pack(">6sBBI", envelope.MAGIC, 1, 0, len(header))
    _assert_rejected(prefix + header + body + b"\0" * 32, "signature does not match")


def test_corrupt_compressed_body_signed_with_the_key_is_reported():
    from gae_deferred import _signing

    kid, key = _signing.signing_key()
    header = {"function": "x"}
    data = envelope._seal(header, b"not zlib", envelope.FLAG_ZLIB)
    assert envelope.read_header(data)["kid"] == kid and key
    _assert_rejected(data, "does not decompress")


def test_payload_that_cannot_load_names_both_versions():
    data = serialize(add, 1, 2)
    env = envelope.open_envelope(data)
    broken = envelope.Envelope(
        header={**env.header, "python": "3.99.0"}, body=b"\x80\x05garbage", flags=0, size=1
    )
    with pytest.raises(PermanentTaskFailure, match=r"3\.99\.0.*this runtime is Python 3\."):
        envelope.load_call(broken)


def test_no_signing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY")
    gae_deferred._config.reset()
    with pytest.raises(gae_deferred.ConfigurationError, match="no signing key"):
        serialize(add, 1)


def test_signing_key_from_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("ab" * 32)
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY")
    monkeypatch.setenv("GAE_DEFERRED_SIGNING_KEY_FILE", str(key_file))
    gae_deferred._config.reset()
    assert run(serialize(add, 2, 2)) == 4


def test_signing_key_provider_hook():
    calls = []

    def provider():
        calls.append(1)
        return b"k" * 32

    gae_deferred.configure(signing_key=None, signing_key_provider=provider)
    assert run(serialize(add, 1, 1)) == 2
    assert run(serialize(add, 2, 1)) == 3
    assert calls == [1]


@pytest.mark.parametrize("bad", ["zz" * 32, "ab"])
def test_bad_key_in_environment(monkeypatch, bad):
    monkeypatch.setenv("GAE_DEFERRED_SIGNING_KEY", bad)
    gae_deferred._config.reset()
    with pytest.raises(gae_deferred.ConfigurationError, match="GAE_DEFERRED_SIGNING_KEY"):
        serialize(add, 1)


# --- things that cannot be pickled fail at serialize() time, naming the argument --------------


def _generator():
    yield 1


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (threading.Lock(), "positional argument 1"),
        (_generator(), "positional argument 1"),
    ],
)
def test_unpicklable_argument_is_named(value, label):
    with pytest.raises(SerializationError, match=label):
        serialize(add, 1, value)


def test_unpicklable_keyword_argument_is_named():
    with (
        socket.socket() as sock,
        pytest.raises(SerializationError, match="keyword argument 'conn'"),
    ):
        serialize(add, 1, conn=sock)


def test_open_file_argument_is_named(tmp_path):
    with open(tmp_path / "f", "w") as handle, pytest.raises(SerializationError, match="argument 0"):
        serialize(add, handle)


def test_unpicklable_callable_is_named():
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="the callable"):
        serialize(lambda: lock.acquire())


def test_not_callable():
    with pytest.raises(SerializationError, match="not callable"):
        serialize(42)


def test_zlib_body_round_trip_exact_bytes():
    payload = b"abc" * 10_000
    env = envelope.open_envelope(serialize(_identity, payload))
    assert zlib.compress(pickle.dumps((_identity, (payload,), {}), protocol=5))
    assert pickle.loads(env.body)[1] == (payload,)


def test_incompressible_big_body_is_probed_not_compressed(monkeypatch):
    import os

    calls = []
    real = zlib.compress

    def spy(data, level=-1):
        calls.append(len(data))
        return real(data, level)

    monkeypatch.setattr(envelope.zlib, "compress", spy)
    data = serialize(add, os.urandom(2_000_000), b"")
    assert not envelope.open_envelope(data).flags & envelope.FLAG_ZLIB
    assert calls == [64 * 1024]
    calls.clear()
    # A big argument is pickled in pieces and compressed piece by piece after the probe.
    assert envelope.open_envelope(serialize(add, b"a" * 2_000_000, b"")).flags
    assert calls == [64 * 1024]
    calls.clear()
    assert envelope.open_envelope(serialize(add, [b"a"] * 400_000)).flags
    assert calls[0] == 64 * 1024 and calls[1] > 800_000


def test_big_argument_is_pickled_in_pieces_holding_its_own_bytes():
    import os

    payload = os.urandom(3_000_000)
    data, header = envelope.build_call(
        add, (payload, b"y"), {}, "tests.callables.add", {}, task="t", queue="q", eta_ms=1
    )
    assert isinstance(data, envelope.Sealed)
    assert any(part is payload for part in data.parts)
    assert header["raw_bytes"] == len(pickle.dumps((add, (payload, b"y"), {}), protocol=5))
    joined = bytes(data)
    assert len(data) == len(joined)
    assert envelope.open_envelope(joined).header == header
    assert run(joined) == payload + b"y"
    chunks = list(data.slices(1_000_000))
    assert b"".join(bytes(chunk) for chunk in chunks) == joined
    assert [len(chunk) for chunk in chunks[:-1]] == [1_000_000] * (len(chunks) - 1)
    assert any(isinstance(chunk, memoryview) for chunk in chunks)


def test_closure_over_big_bytes_is_pickled_in_pieces_holding_its_own_bytes():
    """cloudpickle pickles a lambda's captured payload by value: into pieces, not a copy."""
    import os

    payload = os.urandom(3_000_000)
    call = lambda: payload  # noqa: E731 - a closure is the case
    data, header = envelope.build_call(
        call, (), {}, "tests.lambda", {}, task="t", queue="q", eta_ms=1
    )
    assert header["serializer"] == "cloudpickle"
    assert isinstance(data, envelope.Sealed)
    assert any(part is payload for part in data.parts)
    assert run(bytes(data)) == payload
    small, _ = envelope.build_call(
        lambda: b"x" * 10, (), {}, "tests.lambda", {}, task="t", queue="q", eta_ms=1
    )
    assert type(small) is bytes and run(small) == b"x" * 10


def test_a_bytearray_argument_is_copied_when_pickled_in_pieces():
    payload = bytearray(b"z" * 2_000_000)
    data, _ = envelope.build_call(
        add, (payload, b""), {}, "tests.callables.add", {}, task="t", queue="q", eta_ms=1
    )
    payload[:4] = b"gone"
    assert run(envelope.as_bytes(data)) == b"z" * 2_000_000


def test_main_is_found_in_pickle_pieces_even_across_two_of_them():
    # A stream naming __main__ goes to cloudpickle, pieces or not.
    assert envelope._mentions_main([b"xx__ma", b"in__yy"])
    assert envelope._mentions_main([b"a", b"__main__", b"b"])
    assert not envelope._mentions_main([b"__mai", b"x_main__"])


def test_args_preview_of_big_bytes_reprs_only_what_it_shows():
    from gae_deferred import envelope

    big = b"\x00" * 8_000_000
    preview = envelope.args_preview((big, [bytearray(big)], b"short"), {})
    assert preview == (
        "b'\\x00\\x00\\x00\\x00...00\\x00\\x00\\x00\\x00', "
        "[bytearray(b'\\x00\\x...0\\x00\\x00\\x00\\x00')], b'short'"
    )


@pytest.mark.parametrize(
    ("args", "queue", "task", "app_version"),
    [
        ((1, 2), "default", "d-0123456789abcdef0123456789abcdef", "unknown"),
        (('naïve "quoted" \\ text\n', None, 2.5), "q-1", "named_Task-1", "v1.2"),
        ((b"\x00\xff" * 40, [1, {"a": 2}]), "reports", "t", "20260101t000000"),
        (("\u2028 line sep", "\ud7ff"), "x", "y" * 500, "ünïcode"),
    ],
)
def test_defer_header_json_is_what_the_generic_encoder_writes(args, queue, task, app_version):
    gae_deferred.configure(app_version=app_version)
    data, header = envelope.build_call(
        add, args, {}, envelope.function_name(add), {}, task=task, queue=queue, eta_ms=1_700_000
    )
    _, _, _, header_len = struct.unpack_from(">6sBBI", data)
    written = data[12 : 12 + header_len]
    assert written == json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    assert envelope.open_envelope(data).header == header


def test_defer_header_with_other_fields_goes_through_the_generic_encoder():
    data, header = envelope.build_call(
        add,
        (1, 2),
        {},
        "tests.callables.add",
        {"trace": "00-abc-01", "retry": {"task_retry_limit": 3}},
        task="t",
        queue="q",
        eta_ms=5,
    )
    _, _, _, header_len = struct.unpack_from(">6sBBI", data)
    assert (
        data[12 : 12 + header_len]
        == json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    )
    assert header["retry"] == {"task_retry_limit": 3} and header["trace"] == "00-abc-01"
