"""Datastore's rules for keys, namespaces and property values that the stub's limits lack.

The numbers are production's (https://cloud.google.com/datastore/docs/concepts/limits), the
checks and messages what Google's Firestore emulator in Datastore mode answers (the
differential test, tests/emulators/test_datastore_differential.py, compares the two)::

    check_key_shape(key_pb)              # every key a request names (reads too)
    check_partition(namespace)           # every namespace a request names
    check_written_entity(entity_pb)      # every entity a Commit writes
    check_written_key(key_pb)            # ... and every key it writes or deletes
"""

from __future__ import annotations

import re

from ..errors import invalid

#: Maximum UTF-8 size of a key name, a kind and a property name.
MAX_NAME_BYTES = 1_500
#: Maximum size of an indexed string or bytes value.
MAX_INDEXED_VALUE_BYTES = 1_500
#: Maximum size of an unindexed string or bytes value (1 MiB - 89 bytes).
MAX_UNINDEXED_VALUE_BYTES = 1_048_487
#: A namespace: at most 100 of these characters ("" is the default namespace).
NAMESPACE = re.compile(r"[0-9A-Za-z._-]{0,100}")
#: Reserved for Datastore's own kinds, names, namespaces and properties (``__kind__``).
RESERVED = re.compile(r"__.+__")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def check_partition(namespace: str) -> None:
    """A namespace Datastore accepts (``[0-9A-Za-z._-]{0,100}``), reserved ones included."""
    if not NAMESPACE.fullmatch(namespace):
        raise invalid(
            f'Illegal string "{namespace}" in namespace id: a namespace is at most 100 of '
            "0-9, A-Z, a-z, '.', '-' and '_'"
        )


def check_key_shape(key) -> None:
    """Sizes and namespace of any key (Lookup, queries, writes)."""
    check_partition(key.partition_id.namespace_id)
    for element in key.path:
        if _utf8_len(element.kind) > MAX_NAME_BYTES:
            raise invalid(f"The kind is longer than {MAX_NAME_BYTES} bytes.")
        if element.WhichOneof("id_type") == "name" and _utf8_len(element.name) > MAX_NAME_BYTES:
            raise invalid(f"The key path element name is longer than {MAX_NAME_BYTES} bytes.")


def check_written_key(key) -> None:
    """A key a Commit writes or deletes: its shape, and no reserved kind, name or namespace."""
    check_key_shape(key)
    namespace = key.partition_id.namespace_id
    if RESERVED.fullmatch(namespace):
        raise invalid(f'The namespace id "{namespace}" is reserved.')
    for element in key.path:
        if RESERVED.fullmatch(element.kind):
            raise invalid(f'The kind "{element.kind}" is reserved.')
        if element.WhichOneof("id_type") == "name" and RESERVED.fullmatch(element.name):
            raise invalid(f'The key path element name "{element.name}" is reserved.')


def check_written_entity(entity, sizes: bool = True) -> None:
    """Property names and (``sizes``) value sizes of an entity a Commit writes, and its key."""
    check_written_key(entity.key)
    _check_properties(entity, indexed=True, sizes=sizes)


def _check_properties(entity, indexed: bool, sizes: bool) -> None:
    for name, value in entity.properties.items():
        if RESERVED.fullmatch(name):
            raise invalid(f'The property.name "{name}" is reserved.')
        if _utf8_len(name) > MAX_NAME_BYTES:
            raise invalid(f"The property.name is longer than {MAX_NAME_BYTES} bytes.")
        _check_value(name, value, indexed, sizes)


def _check_value(name: str, value, indexed: bool, sizes: bool) -> None:
    indexed = indexed and not value.exclude_from_indexes
    which = value.WhichOneof("value_type")
    if which == "array_value":
        for element in value.array_value.values:
            _check_value(name, element, indexed, sizes)
    elif which == "entity_value":
        _check_properties(value.entity_value, indexed, sizes)
    elif sizes and which in ("string_value", "blob_value"):
        raw = value.string_value.encode("utf-8") if which == "string_value" else value.blob_value
        limit = MAX_INDEXED_VALUE_BYTES if indexed else MAX_UNINDEXED_VALUE_BYTES
        if len(raw) > limit:
            hint = "; exclude it from indexes to store it" if indexed else ""
            raise invalid(f'The value of property "{name}" is longer than {limit} bytes{hint}.')
