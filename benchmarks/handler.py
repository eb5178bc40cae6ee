"""Benchmark 1: CPU per task of our webapp2 task handler vs the framework floor and legacy.

The same small task (``benchmarks.tasks.add(1, 2)``) goes through three in-process WSGI calls:
our app (``deferred_routes()``: header checks, signature, envelope, ndb context, task context),
the floor (:mod:`benchmarks.floor`: webapp2, ``pickle.loads(body)`` and the call), and — in the
``.venv-bench-legacy`` interpreter — ``google.appengine.ext.deferred.deferred.Handler``. ndb
talks to an in-process Datastore emulator whose RPC counter proves the success path makes none.
"""

from __future__ import annotations

import collections
import cProfile
import os
import pickle
import pstats
import tempfile

import webapp2

import gae_deferred
from gae_deferred import _config, _datastore
from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.webapp2 import deferred_routes, task_routes

from . import floor, legacy, tasks, timing
from .report import Section, Target, count_target, ratio_target

#: App Engine's /tmp is in memory; webapp2 copies every request body to a temporary file
#: (request_body_tempfile_limit = 0), so a disk-backed /tmp would inflate both sides.
MEMORY_TMP = "/dev/shm"
BUDGET = 1.25
#: The budget against the floor that reads the body from wsgi.input, as our handler does.
INPUT_BUDGET = 2.0


def _profile_overhead(ours, ours_env, floor_app, floor_env, calls: int) -> list[list[str]]:
    """Where our handler's extra CPU goes: profiled self-time per package, ours minus floor."""

    def grouped(app, environ) -> collections.Counter[str]:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            floor.call_wsgi(app, environ())
        profile.disable()
        totals: collections.Counter[str] = collections.Counter()
        for (filename, _, _), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
            totals[_package(filename)] += own / calls * 1e6
        return totals

    ours_t, floor_t = grouped(ours, ours_env), grouped(floor_app, floor_env)
    extra = {name: ours_t[name] - floor_t.get(name, 0.0) for name in ours_t}
    top = sorted(extra.items(), key=lambda item: -item[1])[:8]
    return [[name, f"{value:+.1f}"] for name, value in top if value > 0.5]


def _package(filename: str) -> str:
    for marker, name in (
        ("gae_deferred/", "gae_deferred"),
        ("handlers/", "handlers"),
        ("google/cloud/ndb/", "google-cloud-ndb"),
        ("webob/", "webob"),
        ("webapp2", "webapp2"),
        ("contextlib", "contextlib (context managers)"),
        ("threading", "threading (ndb event loop locks)"),
        ("queue.py", "queue (ndb event loop)"),
        ("json/", "json (envelope header)"),
    ):
        if marker in filename:
            return name
    return "builtins/other" if filename == "~" else os.path.basename(filename)


def run(*, quick: bool, legacy_mode: str) -> Section:
    """Measure and return the handler section. ``legacy_mode``: install, existing or skip."""
    rounds, inner = (7, 50) if quick else (31, 100)
    if os.path.isdir(MEMORY_TMP):
        os.environ["TMPDIR"] = MEMORY_TMP
        tempfile.tempdir = MEMORY_TMP
    emulator = DatastoreEmulator(port=0).start()
    os.environ["DATASTORE_EMULATOR_HOST"] = emulator.address
    _config.reset()
    _datastore._default_client.cache_clear()
    try:
        ours = webapp2.WSGIApplication(deferred_routes())
        # The same handler with the task routes alone: what routing past the dashboard's
        # routes, which deferred_routes() puts first, costs a task request (report only).
        task_only = webapp2.WSGIApplication(task_routes())
        floor_app = floor.floor_app()
        input_floor_app = floor.input_floor_app()
        body = gae_deferred.envelope.build(tasks.add, (1, 2), task="bench-task-1", queue="default")
        ours_env = floor.environ_factory(body)
        floor_env = floor.environ_factory(
            pickle.dumps((tasks.add, (1, 2), {}), protocol=pickle.HIGHEST_PROTOCOL)
        )
        if not floor.call_wsgi(ours, ours_env()).startswith("200"):
            raise RuntimeError("our handler did not answer 200 to the benchmark task")
        result = timing.compare(
            {
                "floor": lambda: floor.call_wsgi(floor_app, floor_env()),
                "input floor": lambda: floor.call_wsgi(input_floor_app, floor_env()),
                "ours": lambda: floor.call_wsgi(ours, ours_env()),
                "task routes only": lambda: floor.call_wsgi(task_only, ours_env()),
            },
            rounds=rounds,
            inner=inner,
        )
        emulator.reset_counts()
        for _ in range(100):
            floor.call_wsgi(ours, ours_env())
        rpcs = sum(emulator.rpc_counts.values())
        ratio = result.ratio("ours", "floor")
        input_ratio = result.ratio("ours", "input floor")
        overhead = (
            []
            if ratio <= BUDGET and input_ratio <= INPUT_BUDGET
            else _profile_overhead(
                ours, ours_env, input_floor_app, floor_env, 500 if quick else 3000
            )
        )
    finally:
        emulator.stop()
        os.environ.pop("DATASTORE_EMULATOR_HOST", None)
        _config.reset()
        _datastore._default_client.cache_clear()

    per_call = result.per_call
    section = Section(
        key="handler",
        title="Handler cost per task",
        what=(
            "CPU time (this thread's, `time.thread_time`) per task of one in-process WSGI call "
            "running `benchmarks.tasks.add(1, 2)`: our webapp2 handler from `deferred_routes()` "
            "(task headers, HMAC, envelope, ndb context on the in-process Datastore emulator, "
            "task context) vs the framework floor (a bare webapp2 handler on the same route "
            "doing `pickle.loads(body)` and the call; `request.body`, and the same reading "
            "`wsgi.input` directly as our handler does: the floor of the ≤ 2x budget) vs the "
            "legacy "
            "`google.appengine.ext.deferred.deferred.Handler` (appengine-python-standard, "
            "measured in `.venv-bench-legacy` against the same floor, so the ratio to legacy "
            "is ours/floor ÷ legacy/floor). "
            f"{rounds} interleaved rounds of {inner} calls after warm-up; medians. "
            f"TMPDIR={tempfile.gettempdir()} (webapp2 spools every body to a temp file)."
        ),
        columns=["variant", "CPU us / task", "x floor"],
    )
    section.rows.append(
        ["webapp2 floor (pickle.loads + call)", f"{per_call['floor'] * 1e6:.1f}", "1.00"]
    )
    section.rows.append(
        [
            "webapp2 floor reading wsgi.input (pickle.loads + call)",
            f"{per_call['input floor'] * 1e6:.1f}",
            f"{per_call['input floor'] / per_call['floor']:.2f}",
        ]
    )
    section.rows.append(["gae_deferred handler", f"{per_call['ours'] * 1e6:.1f}", f"{ratio:.2f}"])
    task_only_ratio = result.ratio("task routes only", "floor")
    section.rows.append(
        [
            "gae_deferred handler, task routes alone (report only)",
            f"{per_call['task routes only'] * 1e6:.1f}",
            f"{task_only_ratio:.2f}",
        ]
    )
    section.targets.append(ratio_target("handler CPU vs webapp2 floor", ratio, BUDGET))
    section.targets.append(
        ratio_target("handler CPU vs wsgi.input floor", input_ratio, INPUT_BUDGET)
    )
    section.targets.append(count_target("Datastore RPCs, 100 inline successes", rpcs, 0))
    section.data = {"rounds": result.to_json(), "rpcs": rpcs}
    _add_legacy(section, legacy_mode, ratio, rounds, inner)
    if input_ratio > INPUT_BUDGET:
        routed = (per_call["ours"] - per_call["task routes only"]) * 1e6
        section.notes.append(
            "through deferred_routes() a task request first passes the dashboard's route "
            "(it comes first, so that a dashboard path that is not UTF-8 gets the dashboard's "
            f"400): {routed:.1f} us per task; the task routes alone measure "
            f"{result.ratio('task routes only', 'input floor'):.2f}x the wsgi.input floor"
        )
    if overhead:
        section.notes.append(
            "where the extra CPU goes (cProfile self-time per package, ours minus the wsgi.input "
            "floor, us "
            "per task, inflated by the profiler): "
            + ", ".join(f"{name} {value}" for name, value in overhead)
        )
    return section


def _add_legacy(section: Section, mode: str, ratio: float, rounds: int, inner: int) -> None:
    python = None if mode == "skip" else legacy.legacy_python(install=mode == "install")
    if python is None:
        section.notes.append(
            "legacy handler not measured: .venv-bench-legacy is not installed "
            "(`make bench` / `python -m benchmarks` installs it; --quick only uses it if present)"
        )
        return
    data = legacy.run_legacy(python, rounds=rounds, inner=inner)
    section.data["legacy"] = data
    floor_us = section.data["rounds"]["floor"]
    for label, key in (
        ("legacy Handler.run_from_request", "legacy_run_from_request"),
        ("legacy Handler WSGI __call__", "legacy_wsgi"),
    ):
        to_floor = data["ratio_to_floor"][key]
        section.rows.append(
            [
                label,
                f"≈{to_floor * sorted(floor_us)[len(floor_us) // 2] * 1e6:.1f}",
                f"{to_floor:.2f}",
            ]
        )
        section.targets.append(
            Target(f"ours vs {label} (report only)", f"{ratio / to_floor:.1f}x", "—", True)
        )
