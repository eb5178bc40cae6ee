"""A local Datastore emulator: gRPC ``google.datastore.v1.Datastore`` for the real clients.

>>> from gae_deferred.local.datastore import DatastoreEmulator
>>> emu = DatastoreEmulator(port=0).start()   # then DATASTORE_EMULATOR_HOST=emu.address
>>> emu.stop()

See README.md in this folder for what is faithful to Datastore and what is not.
"""

from ._index_rules import load_index_yaml
from .server import DatastoreEmulator

__all__ = ["DatastoreEmulator", "load_index_yaml"]
