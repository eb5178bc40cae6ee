"""The protobuf message behind a proto-plus wrapper.

google-cloud-datastore's types wrap protobufs in proto-plus, which lacks ``WhichOneof``,
``HasField``, ``CopyFrom`` and ``SerializeToString``; the emulator works on the protobufs::

    raw = pb(types.LookupRequest(project_id="p"))   # a LookupRequest protobuf
    pb(raw) is raw                                   # protobufs pass through
"""

from __future__ import annotations

from typing import Any


def pb(message: Any) -> Any:
    """The protobuf of a proto-plus message; any other message unchanged."""
    wrapper = type(message)
    return wrapper.pb(message) if hasattr(wrapper, "pb") else message
