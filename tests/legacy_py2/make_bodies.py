# Run with Python 2.7: python2.7 tests/legacy_py2/make_bodies.py > tests/legacy_py2/bodies.json
#
# Task bodies exactly as the python27 `deferred` library made them (google/appengine/ext/
# deferred/deferred.py, SDK 1.9.88): serialize() is
#     pickle.dumps(_curry_callable(obj, *args, **kwargs), protocol=pickle.HIGHEST_PROTOCOL)
# (protocol 2), _curry_callable wraps a bound method as (invoke_member, (obj, name) + args,
# kwargs), and a payload over the task size limit went into a _DeferredTaskEntity whose task
# body is serialize(run_from_datastore, str(key)). The SDK itself does not import here, so its
# two functions and the app's module (tests/legacy_targets.py) are stood in for by modules of
# the same names: pickle stores functions and classes by module and name only.
from __future__ import print_function

import binascii
import datetime
import json
import pickle
import sys
import types


def module(name, source):
    made = types.ModuleType(name)
    made.__dict__["__name__"] = name
    exec(source, made.__dict__)
    sys.modules[name] = made
    return made


module("google", "")
module("google.appengine", "")
module("google.appengine.ext", "")
module("google.appengine.ext.deferred", "")
sdk = module(
    "google.appengine.ext.deferred.deferred",
    "def run_from_datastore(key): pass\n"
    "def invoke_member(obj, membername, *args, **kwargs): pass\n",
)
module("tests", "")
app = module(
    "tests.legacy_targets",
    "def record(*args, **kwargs): pass\n"
    "class Counter(object):\n"
    "    def __init__(self, start): self.start = start\n"
    "    def add(self, value): pass\n"
    "def boom(message): pass\n",
)


def serialize(obj, *args, **kwargs):
    if isinstance(obj, types.MethodType):
        curried = (sdk.invoke_member, (obj.im_self, obj.im_func.__name__) + args, kwargs)
    else:
        curried = (obj, args, kwargs)
    return pickle.dumps(curried, protocol=pickle.HIGHEST_PROTOCOL)


# str(db.Key) of _DeferredTaskEntity 4242 in app s~test-project.
KEY = "ag5zfnRlc3QtcHJvamVjdHIaCxITX0RlZmVycmVkVGFza0VudGl0eRiSIQw"
bodies = {
    "python": sys.version.split()[0],
    "inline": serialize(
        app.record,
        "caf\xc3\xa9",
        u"na\u00efve",
        "\xff\x00\x89PNG",
        when=datetime.datetime(2026, 12, 7, 1, 2, 3, 456789),
        count=7,
    ),
    "method": serialize(app.Counter(40).add, 2),
    "failing": serialize(app.boom, "it broke"),
    "spilled_entity": serialize(app.record, "x" * 5000, size="big"),
    "spilled": serialize(sdk.run_from_datastore, KEY),
}
print(json.dumps(dict(
    (name, value if name == "python" else binascii.hexlify(value).decode("ascii"))
    for name, value in sorted(bodies.items())
), indent=1, sort_keys=True))
