"""The signed, versioned envelope that carries a deferred call.

``serialize`` and ``run`` keep their legacy meaning::

    from gae_deferred import run, serialize

    data = serialize(pow, 2, 10)       # bytes: header + pickled (pow, (2, 10), {}) + HMAC
    assert run(data) == 1024

Layout (all integers big endian)::

    b"GAEDEF" | format version (1 byte) | flags (1 byte) | header length (4 bytes)
    | header: JSON metadata | body: pickle, maybe zlib-compressed | HMAC-SHA256 of all before it

The header is readable without the key and without unpickling (the dashboard shows it); nothing
is unpickled unless the HMAC verifies with a known key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import pickle
import platform
import reprlib
import struct
import time
import types
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cloudpickle

from . import _signing
from ._config import settings
from .errors import (
    PayloadLoadError,
    PermanentTaskFailure,
    SerializationError,
    UnverifiedEnvelope,
    VersionSkewError,
)

MAGIC = b"GAEDEF"
FORMAT_VERSION = 1
FLAG_ZLIB = 0x01
FLAG_REFERENCE = 0x02
_KNOWN_FLAGS = FLAG_ZLIB | FLAG_REFERENCE
_PREFIX = struct.Struct(">6sBBI")
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_dumps = pickle.dumps
_FUNCTION = types.FunctionType
_MAC_BYTES = 32
_MAX_HEADER_BYTES = 64 * 1024
PYTHON_VERSION = platform.python_version()
CLOUDPICKLE_VERSION = cloudpickle.__version__


class _ArgsRepr(reprlib.Repr):
    """reprlib, with bytes cut before they are repr'd: reprlib has no rule for bytes, so it
    would repr a whole 32 MiB payload (a string several times its size) to keep 40 chars."""

    def repr_bytes(self, value: bytes | bytearray, level: int) -> str:
        # reprlib's rule for str: head and tail of at most maxstring characters.
        text = repr(value[: self.maxstring])
        if len(text) > self.maxstring:
            head = max(0, (self.maxstring - 3) // 2)
            tail = max(0, self.maxstring - 3 - head)
            text = repr(value[:head] + value[len(value) - tail :])
            text = text[:head] + self.fillvalue + text[len(text) - tail :]
        return text

    repr_bytearray = repr_bytes


_args_repr = _ArgsRepr()
_args_repr.maxstring = 40
_args_repr.maxother = 40
_args_repr.maxlist = _args_repr.maxtuple = _args_repr.maxdict = _args_repr.maxset = 5
_ARGS_PREVIEW_CHARS = 200
#: Compression is kept only if it saves at least 10%.
_WORTH_IT = 0.9
_PROBE_BYTES = 64 * 1024
#: One decoder for every header: json.loads would re-detect the encoding on each task.
_HEADER_DECODER = json.JSONDecoder()
#: One encoder too: json.dumps with options builds a new JSONEncoder on every call.
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
#: The C encoder behind it, made once: JSONEncoder.encode makes a new one per call. Same
#: options, so the same bytes; no circular-reference check (a header is flat JSON we build).
_C_ENCODER = (
    json.encoder.c_make_encoder(
        None,
        _HEADER_ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
    if json.encoder.c_make_encoder is not None
    else None
)


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A verified envelope: its metadata header and its (decompressed) body."""

    header: dict[str, Any]
    body: bytes | memoryview
    flags: int
    size: int

    @property
    def is_reference(self) -> bool:
        """True when the body lives in Datastore and the header carries ``ref``."""
        return bool(self.flags & FLAG_REFERENCE)

    @property
    def function(self) -> str:
        return str(self.header.get("function", "?"))


def function_name(obj: Any) -> str:
    """Dotted name of a callable for logs and the dashboard: ``reports.Builder.run``."""
    if type(obj) is _FUNCTION and obj.__module__:  # the usual case, without the getattrs
        return f"{obj.__module__}.{obj.__qualname__}"
    target = getattr(obj, "__func__", obj)
    qualname = getattr(target, "__qualname__", None)
    if qualname is None:
        target = type(obj)
        qualname = f"{target.__qualname__}.__call__"
    module = getattr(target, "__module__", None) or "builtins"
    return f"{module}.{qualname}"


def args_preview(args: tuple, kwargs: dict) -> str:
    """A short repr of the arguments that never raises and never grows past 200 characters."""
    parts = []
    for value in args:
        kind = type(value)
        # _safe_repr's shortcut inline: ids and flags are what defer() is called with most.
        if kind in _PLAIN_REPR or (kind is str and len(value) <= _args_repr.maxstring):
            text = repr(value)
            if len(text) <= _args_repr.maxother:
                parts.append(text)
                continue
        parts.append(_safe_repr(value))
    for name, value in kwargs.items():
        parts.append(f"{name}={_safe_repr(value)}")
    text = ", ".join(parts)
    if len(text) > _ARGS_PREVIEW_CHARS:
        text = text[: _ARGS_PREVIEW_CHARS - 3] + "..."
    return text


#: Types whose plain repr is what reprlib gives when it fits in ``maxother`` characters.
_PLAIN_REPR = frozenset((int, float, bool, type(None)))


def _safe_repr(value: Any) -> str:
    kind = type(value)
    # The usual arguments (ids, flags, short strings) skip reprlib's dispatch: same text.
    if kind in _PLAIN_REPR or (kind is str and len(value) <= _args_repr.maxstring):
        text = repr(value)
        if len(text) <= _args_repr.maxother:
            return text
    try:
        return _args_repr.repr(value)
    except Exception:  # a user __repr__ may raise anything; the preview must not
        return f"<{type(value).__name__} object>"


#: A call with an argument of at least this many bytes (bytes, bytearray or str) is pickled in
#: pieces: pickle hands such an argument's bytes to its writer as they are, so the pickle never
#: holds a copy of a big payload (defer()'s peak memory; see Sealed).
_PIECES_BYTES = 1024 * 1024
_BUFFER_TYPES = frozenset((bytes, bytearray, str))


class _Pieces(list):
    """The file pickle writes to: its frames, and a big argument's own bytes object."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # A bytearray the caller may change before the envelope is sent is copied.
        self.append(data if type(data) is bytes else bytes(data))
        return len(data)


def _has_big_buffer(args: tuple, kwargs: dict) -> bool:
    for value in args:
        if type(value) in _BUFFER_TYPES and len(value) >= _PIECES_BYTES:
            return True
    if kwargs:
        for value in kwargs.values():
            if type(value) in _BUFFER_TYPES and len(value) >= _PIECES_BYTES:
                return True
    return False


def _pickle_call(obj: Callable, args: tuple, kwargs: dict) -> tuple[bytes | list[bytes], str]:
    """Plain pickle where it is safe and faster, cloudpickle for everything else; the pickle's
    pieces (a list) for a call with a big argument, else its bytes.

    Plain pickle stores functions by reference, so it is only used when that reference can be
    resolved in another process: the stream must not point into ``__main__``.
    """
    call = (obj, args, kwargs)
    if _has_big_buffer(args, kwargs):
        pieces = _Pieces()
        try:
            pickle.Pickler(pieces, protocol=_PROTOCOL).dump(call)
        except Exception:  # as below: cloudpickle, which makes one bytes object
            pass
        else:
            if not _mentions_main(pieces):
                return list(pieces), "pickle"
        del pieces
    else:
        try:
            data = _dumps(call, protocol=_PROTOCOL)
        except Exception:  # lambdas, closures, local classes: cloudpickle handles them by value
            pass
        else:
            if b"__main__" not in data:
                return data, "pickle"
    try:
        return _cloudpickle_pieces(call), "cloudpickle"
    except Exception as exc:
        raise SerializationError(_name_unpicklable(obj, args, kwargs, exc)) from exc


def _cloudpickle_pieces(call: tuple) -> bytes | list[bytes]:
    """cloudpickle's pickle of ``call``: its pieces when it is big, else its bytes.

    Written to a _Pieces, as the big-argument path is: pickle hands a big bytes object it
    meets (a lambda's captured payload, pickled by value) to the writer as it is, so the
    pickle holds no copy of it (defer()'s peak memory for a closure over a big payload).
    """
    pieces = _Pieces()
    cloudpickle.Pickler(pieces, protocol=_PROTOCOL).dump(call)
    if len(pieces) == 1:
        return pieces[0]
    if sum(map(len, pieces)) >= _PIECES_BYTES:
        return list(pieces)
    return b"".join(pieces)


_MAIN = b"__main__"


def _mentions_main(pieces: Sequence[bytes]) -> bool:
    """``b"__main__" in b"".join(pieces)``, without the join."""
    tail = b""
    for piece in pieces:
        if _MAIN in piece or _MAIN in tail + piece[: len(_MAIN) - 1]:
            return True
        tail = piece[-(len(_MAIN) - 1) :]
    return False


def _name_unpicklable(obj: Callable, args: tuple, kwargs: dict, exc: Exception) -> str:
    parts: list[tuple[str, Any]] = [("the callable", obj)]
    parts += [(f"positional argument {i}", value) for i, value in enumerate(args)]
    parts += [(f"keyword argument {name!r}", value) for name, value in kwargs.items()]
    for label, value in parts:
        try:
            cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as part_exc:
            return (
                f"cannot defer {function_name(obj)}: {label} ({_safe_repr(value)}) "
                f"cannot be pickled: {part_exc}"
            )
    return f"cannot defer {function_name(obj)}: {exc}"


def _compressible(raw: bytes | list[bytes], level: int) -> bool:
    """Big bodies are probed on a sample first: compressing megabytes of already-compressed or
    random bytes would cost milliseconds and save nothing."""
    if isinstance(raw, list):
        sample = _head(raw, _PROBE_BYTES)
    elif len(raw) <= _PROBE_BYTES:
        return True
    else:
        sample = memoryview(raw)[:_PROBE_BYTES]
    return len(zlib.compress(sample, level)) < _PROBE_BYTES * _WORTH_IT


def _head(pieces: list[bytes], size: int) -> bytes:
    """The first ``size`` bytes of the pieces."""
    head, needed = [], size
    for piece in pieces:
        head.append(piece[:needed])
        needed -= len(head[-1])
        if needed <= 0:
            break
    return b"".join(head)


def _compress(raw: bytes | list[bytes], level: int) -> bytes:
    if not isinstance(raw, list):
        return zlib.compress(raw, level)
    compressor = zlib.compressobj(level)
    packed = [compressor.compress(piece) for piece in raw]
    packed.append(compressor.flush())
    return b"".join(packed)


class Sealed:
    """A signed envelope kept as the parts it was signed from: prefix and header, the pickle's
    pieces (a big argument's own bytes among them, not a copy) and the MAC. defer() makes one
    for a call with a big argument (see ``_PIECES_BYTES``) and spills it chunk by chunk, so
    the envelope is never joined into one more copy of the payload::

        len(sealed)                          # the envelope's size
        for chunk in sealed.slices(1_000_000): ...   # views where a chunk lies in one part
        bytes(sealed)                        # the envelope itself (joins)
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: Sequence[bytes]) -> None:
        self.parts = tuple(parts)
        self.size = sum(len(part) for part in self.parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def slices(self, size: int) -> Iterator[bytes | memoryview]:
        """The envelope cut every ``size`` bytes, in order: a view into a part when the slice
        lies within it, else the slice's bytes joined from the parts it spans."""
        pending: list[memoryview] = []
        pending_bytes = 0
        for part in self.parts:
            view = memoryview(part)
            while len(view):
                take = min(size - pending_bytes, len(view))
                piece, view = view[:take], view[take:]
                if not pending and take == size:
                    yield piece
                    continue
                pending.append(piece)
                pending_bytes += take
                if pending_bytes == size:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
        if pending:
            yield b"".join(pending)


def as_bytes(data: bytes | Sealed) -> bytes:
    """The envelope's bytes, joining a Sealed one."""
    return data if isinstance(data, bytes) else bytes(data)


def slices(data: bytes | Sealed, size: int) -> Iterator[bytes | memoryview]:
    """An envelope cut every ``size`` bytes: views, never copies, where that is possible."""
    if isinstance(data, Sealed):
        yield from data.slices(size)
        return
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield view[start : start + size]


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> Any:
    """HMAC-SHA256 with ``key`` already absorbed: copying it costs less than keying afresh,
    which every task and every defer() would otherwise do. OpenSSL's HMAC object itself where
    hmac.HMAC wraps one: its copy/update/digest without a Python frame each."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)
    return getattr(keyed, "_hmac", None) or keyed


def encode_header(header: dict[str, Any]) -> bytes:
    """The header's JSON: sorted keys, no spaces, ASCII (what every envelope has carried)."""
    if _C_ENCODER is None:
        return _HEADER_ENCODER.encode(header).encode()
    return "".join(_C_ENCODER(header, 0)).encode()


def _seal(
    header: dict[str, Any],
    body: bytes,
    flags: int,
    header_bytes: bytes | None = None,
    signing: tuple[str, bytes] | None = None,
) -> bytes:
    """Sign and join; ``header_bytes`` is the header's JSON when the caller already encoded it
    with the ``kid`` of ``signing`` (the (kid, key) it got from _signing.signing_key())."""
    kid, key = signing or _signing.signing_key()
    header["kid"] = kid
    if header_bytes is None:
        header_bytes = encode_header(header)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(header_bytes))
    # The MAC runs over the parts and they are joined once: a body can be 32 MiB, and building
    # the unsigned envelope first would copy it twice.
    mac = _keyed(key).copy()
    mac.update(prefix)
    mac.update(header_bytes)
    mac.update(body)
    return b"".join((prefix, header_bytes, body, mac.digest()))


def _seal_pieces(
    header: dict[str, Any], pieces: list[bytes], flags: int, signing: tuple[str, bytes]
) -> Sealed:
    """_seal for a body in pieces (see _pickle_call): signed over the pieces, never joined."""
    kid, key = signing
    header["kid"] = kid
    header_bytes = encode_header(header)
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(header_bytes)) + header_bytes
    mac = _keyed(key).copy()
    mac.update(head)
    for piece in pieces:
        mac.update(piece)
    return Sealed((head, *pieces, mac.digest()))


_json_str = json.encoder.encode_basestring_ascii
_PYTHON_JSON = _json_str(PYTHON_VERSION)


@functools.lru_cache(maxsize=1024)
def _constant_json(app_version: str, function: str, kid: str, queue: str) -> tuple[str, str, str]:
    """The runs of a defer() header's JSON that are the same for every call of a function
    into a queue (a process has a handful): up to "args", "cloudpickle", and "function" to
    "raw_bytes"."""
    return (
        f'{{"app_version":{_json_str(app_version)},"args":',
        f',"cloudpickle":{_json_str(CLOUDPICKLE_VERSION)},"created_ms":',
        f',"function":{_json_str(function)},"kid":{_json_str(kid)},"python":{_PYTHON_JSON},'
        f'"queue":{_json_str(queue)},"raw_bytes":',
    )


def build(
    obj: Callable, args: tuple = (), kwargs: dict | None = None, **extra_header: Any
) -> bytes:
    """Serialize a call into a signed envelope; ``extra_header`` adds metadata (e.g. ``retry``)."""
    return build_with_header(obj, args, kwargs, **extra_header)[0]


def build_with_header(
    obj: Callable, args: tuple = (), kwargs: dict | None = None, **extra_header: Any
) -> tuple[bytes, dict[str, Any]]:
    """Like build(), also returning the header it wrote, so defer() need not parse it back."""
    data, header = build_call(obj, args, kwargs or {}, function_name(obj), extra_header)
    return as_bytes(data), header


def build_call(
    obj: Callable,
    args: tuple,
    kwargs: dict,
    function: str,
    extra_header: dict[str, Any],
    *,
    task: str | None = None,
    queue: str | None = None,
    eta_ms: int | None = None,
) -> tuple[bytes | Sealed, dict[str, Any]]:
    """build_with_header() for defer(), which already has ``function_name(obj)`` and binds the
    envelope to its ``task``, ``queue`` and ``eta_ms`` (header fields, like ``extra_header``'s).

    The envelope of a call with a big argument comes back as a :class:`Sealed`, whose parts
    include that argument's own bytes: nothing joins a copy of it.
    """
    if not callable(obj):
        raise SerializationError(f"cannot defer {obj!r}: it is not callable")
    current = settings()
    raw, serializer = _pickle_call(obj, args, kwargs)
    raw_bytes = sum(map(len, raw)) if type(raw) is list else len(raw)
    body, flags = raw, 0
    if (
        current.compression_level
        and raw_bytes >= current.compress_min_bytes
        and _compressible(raw, current.compression_level)
    ):
        packed = _compress(raw, current.compression_level)
        if len(packed) < raw_bytes * _WORTH_IT:
            body, flags = packed, FLAG_ZLIB
    body_bytes = sum(map(len, body)) if type(body) is list else len(body)
    args_text = args_preview(args, kwargs)
    # Integer milliseconds: fixed width, so equal calls make equal-sized envelopes.
    created_ms = int(time.time() * 1000)
    header = {
        "function": function,
        "args": args_text,
        "python": PYTHON_VERSION,
        "cloudpickle": CLOUDPICKLE_VERSION,
        "app_version": current.app_version,
        "serializer": serializer,
        "raw_bytes": raw_bytes,
        "body_bytes": body_bytes,
        "created_ms": created_ms,
    }
    if task is not None:
        header["task"], header["queue"], header["eta_ms"] = task, queue, eta_ms
    if extra_header:
        header.update(extra_header)
    signing = _signing.signing_key()
    if type(body) is list:
        return _seal_pieces(header, body, flags, signing), header
    header_bytes = None
    if (
        not extra_header
        and type(task) is str
        and type(queue) is str
        and type(eta_ms) is int
        and type(current.app_version) is str
    ):
        # The header every defer() makes, written in one f-string exactly as the generic
        # encoder writes it (sorted keys, no spaces, ASCII): that encoder was a quarter of a
        # small defer()'s CPU. tests/test_envelope.py checks the two agree.
        head, cloudpickle_json, call_site = _constant_json(
            current.app_version, function, signing[0], queue
        )
        header_bytes = (
            f'{head}{_json_str(args_text)},"body_bytes":{body_bytes}{cloudpickle_json}'
            f'{created_ms},"eta_ms":{eta_ms}{call_site}{raw_bytes},'
            f'"serializer":"{serializer}","task":{_json_str(task)}}}'
        ).encode()
    return _seal(header, body, flags, header_bytes, signing), header


def build_reference(header: dict[str, Any], ref: dict[str, Any], **changes: Any) -> bytes:
    """A small envelope that points at a payload spilled to Datastore.

    It repeats the payload's header (the dashboard shows it); ``changes`` override fields, e.g.
    the ``task`` a retrigger binds it to.
    """
    reference_header = {key: value for key, value in header.items() if key not in ("kid", "ref")}
    # "at": when this reference was made, so a task can tell a payload whose commit is not
    # visible yet from one that is gone.
    reference_header.update(changes, ref={**ref, "at": int(time.time() * 1000)})
    return _seal(reference_header, b"", FLAG_REFERENCE)


def rebind(data: bytes, **changes: Any) -> bytes:
    """The same envelope, verified and re-signed with header fields changed.

    A retrigger binds a kept envelope to its new task: ``rebind(kept, task="r-1f2e...")``. The
    body is copied as it is (still compressed), never unpickled.
    """
    size = len(data)
    _, _, flags, header_len = _PREFIX.unpack_from(data)
    header = dict(open_envelope(data, decompress=False).header)
    header.pop("kid", None)
    header.update(changes)
    body = memoryview(data)[_PREFIX.size + header_len : size - _MAC_BYTES]
    return _seal(header, bytes(body), flags)


def serialize(obj: Callable, *args: Any, **kwargs: Any) -> bytes:
    """Legacy API: a signed envelope for ``obj(*args, **kwargs)``."""
    return build(obj, args, kwargs)


def read_header(data: bytes) -> dict[str, Any]:
    """The metadata header of an envelope, unverified: for display only, never for execution."""
    if len(data) < _PREFIX.size or data[: len(MAGIC)] != MAGIC:
        raise PermanentTaskFailure("not a gae_deferred envelope")
    _, _, _, header_len = _PREFIX.unpack_from(data)
    try:
        return json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
    except (ValueError, RecursionError) as exc:  # deeply nested JSON overflows the parser
        raise PermanentTaskFailure(f"envelope header is not valid JSON: {exc}") from exc


def open_envelope(data: bytes | bytearray, *, decompress: bool = True) -> Envelope:
    """Verify an envelope and return its header and decompressed body.

    ``data`` may be the ``bytearray`` spillover.load assembles: it is verified in place and an
    uncompressed body is a view into it, never a copy.

    Raises UnverifiedEnvelope, saying what is wrong, for anything that is not an intact
    envelope signed with a known key, and PermanentTaskFailure for a signed body that does not
    decompress or inflates past its declared size; nothing in the body is unpickled here.
    ``decompress=False`` leaves a compressed body as it is (``rebind``).
    """
    size = len(data)
    if size < _PREFIX.size + _MAC_BYTES:
        raise UnverifiedEnvelope(f"payload truncated: {size} bytes is shorter than any envelope")
    magic, version, flags, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise UnverifiedEnvelope("not a gae_deferred envelope (foreign or legacy payload)")
    if version > FORMAT_VERSION:
        raise UnverifiedEnvelope(
            f"envelope format version {version} is newer than this runtime reads ({FORMAT_VERSION})"
        )
    if version < 1 or flags & ~_KNOWN_FLAGS:
        raise UnverifiedEnvelope(f"envelope format version {version} / flags {flags:#x} unknown")
    header_end = _PREFIX.size + header_len
    if header_len > _MAX_HEADER_BYTES or header_end > size - _MAC_BYTES:
        raise UnverifiedEnvelope("payload truncated or corrupt: header runs past the end")
    try:
        text = data[_PREFIX.size : header_end].decode()
        # raw_decode: our headers carry no whitespace around the object, so decode()'s two
        # whitespace scans are skipped; anything after the object is refused.
        header, end = _HEADER_DECODER.raw_decode(text)
        if end != len(text):
            header = None
    except (ValueError, RecursionError):  # "[[[[..." 64 KB deep overflows the parser: forged
        header = None
    if not isinstance(header, dict):
        raise UnverifiedEnvelope("envelope header is not a JSON object")
    key = _signing.verification_key(str(header.get("kid", "")))
    if key is None:
        raise UnverifiedEnvelope(
            f"envelope signed with unknown key id {header.get('kid')!r}: not executing it"
        )
    mac = _keyed(key).copy()
    mac.update(memoryview(data)[: size - _MAC_BYTES])
    expected = mac.digest()
    if not hmac.compare_digest(expected, data[size - _MAC_BYTES :]):
        raise UnverifiedEnvelope("envelope signature does not match: tampered or truncated")
    # A view, not a copy: a spilled payload can be 32 MiB and pickle reads views directly.
    body: bytes | memoryview = memoryview(data)[header_end : size - _MAC_BYTES]
    if decompress and flags & FLAG_ZLIB:
        body = _inflate(body, header)
    return Envelope(header=header, body=body, flags=flags, size=size)


def decompressed(env: Envelope) -> Envelope:
    """The envelope with its body inflated (see ``open_envelope(decompress=False)``)."""
    if not env.flags & FLAG_ZLIB:
        return env
    body = _inflate(memoryview(env.body), env.header)
    return dataclasses.replace(env, body=body, flags=env.flags & ~FLAG_ZLIB)


def _inflate(body: memoryview, header: dict[str, Any]) -> bytes:
    """zlib-decompress, never past the size the header declares nor max_payload_bytes.

    A body that would inflate further is refused before the excess is allocated: a signed
    megabyte of zeros must not become a gigabyte in the worker.
    """
    limit = settings().max_payload_bytes
    declared = header.get("raw_bytes")
    if isinstance(declared, int) and not isinstance(declared, bool) and 0 <= declared < limit:
        limit = declared
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise PermanentTaskFailure(f"envelope body does not decompress: {exc}") from exc
    if len(raw) > limit or inflater.unconsumed_tail:
        raise PermanentTaskFailure(
            f"envelope body inflates past {limit:,} bytes (its declared size, at most "
            "max_payload_bytes): refused"
        )
    if not inflater.eof:
        raise PermanentTaskFailure("envelope body does not decompress: truncated zlib stream")
    return raw


def load_call(envelope: Envelope) -> tuple[Callable, tuple, dict]:
    """Unpickle a verified envelope into (callable, args, kwargs).

    A payload that cannot load in this runtime (a function renamed since, a newer pickle
    protocol, a missing module) raises PayloadLoadError naming both runtimes' versions.
    """
    header = envelope.header
    written = header.get("python")
    if header.get("serializer") == "cloudpickle" and _minor(written) != _minor(PYTHON_VERSION):
        # cloudpickle is used for what plain pickle cannot store by reference: code by value.
        # Bytecode is per minor release, and CPython runs a foreign code object as it is: it
        # crashes the process (a segfault, measured 3.11 <-> 3.13) instead of raising. So such
        # a payload is never unpickled under another minor release.
        raise VersionSkewError(
            f"version skew: cannot load payload of {envelope.function}: it holds code pickled "
            f"by value (a lambda, closure or local class) under Python {written}, whose "
            f"bytecode this runtime, Python {PYTHON_VERSION}, cannot run; retry it on app "
            f"version {header.get('app_version')}, which made it (docs/migration.md)"
        )
    try:
        obj, args, kwargs = pickle.loads(envelope.body)
    except Exception as exc:
        written = (header.get("python"), header.get("cloudpickle"), header.get("app_version"))
        here = (PYTHON_VERSION, CLOUDPICKLE_VERSION, settings().app_version)
        skew = _minor(written[0]) != _minor(here[0]) or written[1:] != here[1:]
        error = VersionSkewError if skew else PayloadLoadError
        retry = f"; retry it on app version {written[2]}, which made it" if skew else ""
        raise error(
            f"{'version skew: ' if skew else ''}cannot load payload of {envelope.function}: "
            f"{type(exc).__name__}: {exc}; it was written by Python {written[0]} / cloudpickle "
            f"{written[1]} / app version {written[2]}, this runtime is Python {here[0]} / "
            f"cloudpickle {here[1]} / app version {here[2]}{retry}"
        ) from exc
    return obj, args, kwargs


def _minor(version: Any) -> str:
    """``"3.13"`` of ``"3.13.0"``: pickles of one minor release load in its patch releases."""
    return ".".join(str(version).split(".")[:2])
