"""The legacy handler's cost, run inside ``.venv-bench-legacy`` (appengine-python-standard).

``python -m benchmarks.legacy_handler --rounds 21 --inner 100`` prints one JSON object: CPU
seconds per task of the webapp2 floor (the same :mod:`benchmarks.floor` as in the main
interpreter), of ``deferred.Handler().run_from_request(environ)`` and of the full WSGI
``deferred.Handler()(environ, start_response)``, and their per-round ratios to the floor.
The main interpreter divides its own ratio to the floor by these to compare with legacy
without comparing absolute times across two processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle

from google.appengine.ext.deferred import deferred

from benchmarks import floor, tasks, timing


def measure(rounds: int, inner: int) -> dict[str, object]:
    """Interleaved CPU time of the floor and both legacy entry points on the same task."""
    legacy_body = deferred.serialize(tasks.add, 1, 2)
    floor_body = pickle.dumps((tasks.add, (1, 2), {}), protocol=pickle.HIGHEST_PROTOCOL)
    # The legacy handler trusts X-AppEngine-* headers only on the dev server or from 0.1.0.2.
    legacy_environ = floor.environ_factory(legacy_body, SERVER_SOFTWARE="Development/2.0")
    floor_environ = floor.environ_factory(floor_body)
    handler = deferred.Handler()
    app = floor.floor_app()
    assert floor.call_wsgi(handler, legacy_environ()).startswith("200")
    assert handler.run_from_request(legacy_environ())[1] == 200
    assert floor.call_wsgi(app, floor_environ()).startswith("200")
    result = timing.compare(
        {
            "floor": lambda: floor.call_wsgi(app, floor_environ()),
            "legacy_run_from_request": lambda: handler.run_from_request(legacy_environ()),
            "legacy_wsgi": lambda: floor.call_wsgi(handler, legacy_environ()),
        },
        rounds=rounds,
        inner=inner,
    )
    return {
        "per_call": result.per_call,
        "ratio_to_floor": {
            name: result.ratio(name, "floor") for name in ("legacy_run_from_request", "legacy_wsgi")
        },
        "rounds": result.to_json(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.legacy_handler")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--inner", type=int, default=100)
    args = parser.parse_args()
    # Both handlers log at INFO per task; as in production's default, INFO is not emitted.
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(measure(args.rounds, args.inner)))


if __name__ == "__main__":
    main()
