"""The suites again, on Google's own Datastore emulators: the legs ``make test`` runs last.

``python -m tests.google_legs`` runs each leg as ``pytest --datastore=<mode> <paths>`` and ends
with one line per leg: passed, failed, or did not run and what to install (no SDK, no Java);
``--check`` only names the legs that will not run (``make test`` says it first, then last).

``firestore``
    Google's Firestore emulator in Datastore mode (production's Datastore): every suite that
    touches Datastore (``FIRESTORE_PATHS``; in-process tests that never reach Datastore are
    left out, they ran in the main leg), except ``NOT_ON_FIRESTORE``.
``datastore``
    Google's legacy emulator, for what the Firestore emulator cannot serve: restarts (it keeps
    its data on disk) and index checks (``--require_indexes``): ``DATASTORE_PATHS``, except
    ``NOT_ON_DATASTORE``. Both leave out ``NOT_ON_GOOGLE``.

Tests a leg leaves out are named here with the reason; conftest.py deselects them and lists them
at the end of the run.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Suites whose tests reach Datastore (whole folders, or modules with ndb_stub/ndb_emulator).
FIRESTORE_PATHS = (
    "tests/e2e",
    "tests/reliability",
    "tests/dashboard",
    "tests/browser",
    "tests/ported",
    "tests/test_defer.py",
    "tests/test_ndb_rpc.py",
    "tests/test_testing.py",
    "tests/test_sweeper.py",
    "tests/test_task_handler.py",
    "tests/test_idempotency.py",
    "tests/test_claims.py",
    "tests/test_batch.py",
    "tests/test_pessimistic_locking.py",
    "tests/test_legacy_pickles.py",
    "tests/test_version_affinity.py",
    "tests/test_cross_python.py",
    "tests/test_namespaces.py",
    "tests/test_legacy_taskqueue_names.py",
    "tests/iteration",
)

#: What the legacy emulator adds: its data survives a restart of the emulator, and it refuses
#: queries index.yaml lacks (--require_indexes): the dashboard's and the sweeper's queries.
DATASTORE_PATHS = (
    "tests/e2e/test_e2e_stack.py::test_emulator_restarts_mid_run_lose_nothing",
    "tests/e2e/test_e2e_stack.py::test_whole_stack_restart_keeps_countdown_task_and_spilled_payload",
    "tests/reliability/test_faults.py::test_datastore_restart_mid_run_loses_nothing",
    "tests/dashboard",
    "tests/test_sweeper.py",
    "tests/iteration/test_jobs_dashboard.py",
    # It answers RunAggregationQuery with UNIMPLEMENTED: no count, no ETA, nothing fails.
    "tests/test_ndb_rpc.py::test_count_is_one_aggregation_over_the_querys_kind_filters_ancestor_and_namespace",
)

_IN_MEMORY_ONLY = (
    "Google's Firestore emulator keeps data in memory only: a restart of it loses everything "
    "(the datastore leg runs this test)"
)
_STUB_SPY = (
    "spies on the in-memory Datastore stub's RPC methods (counts, injected failures), which "
    "Google's emulators do not have; the RPCs are the same whatever serves them"
)
#: nodeid (or its prefix up to "[") -> why both Google legs leave it out.
NOT_ON_GOOGLE: dict[str, str] = {
    "tests/test_defer.py::test_spill_rpcs_one_commit_and_one_create_task": _STUB_SPY,
    "tests/test_ndb_rpc.py::test_commit_writes_what_ndb_put_writes": _STUB_SPY,
    "tests/test_ndb_rpc.py::test_commit_stores_computed_properties_as_put_does": _STUB_SPY,
    "tests/test_ndb_rpc.py::test_lookup_asks_again_for_keys_the_service_deferred": _STUB_SPY,
    "tests/dashboard/test_admin.py::test_spillover_list_shows_fields_and_reads_no_chunks": (
        _STUB_SPY
    ),
    "tests/dashboard/test_metrics.py::test_observe_does_no_io_and_a_flush_is_one_commit": (
        _STUB_SPY
    ),
    "tests/dashboard/test_key_limits.py::test_long_ids_are_refused_before_any_rpc": _STUB_SPY,
    "tests/test_defer.py::test_spill_whose_chunk_only_commit_is_unanswered_is_certainly_not_stored": (  # noqa: E501
        _STUB_SPY
    ),
    "tests/test_ndb_rpc.py::test_count_is_none_where_the_client_cannot_count": (
        "about inmemory-datastore-stub's client, which has no RunAggregationQuery; on Google's "
        "legs ndb_stub is their emulator (the count test runs on both)"
    ),
}
#: ... and what only the firestore leg leaves out.
NOT_ON_FIRESTORE: dict[str, str] = {
    "tests/e2e/test_e2e_stack.py::test_emulator_restarts_mid_run_lose_nothing": _IN_MEMORY_ONLY,
    "tests/e2e/test_e2e_stack.py::test_whole_stack_restart_keeps_countdown_task_and_spilled_payload": (  # noqa: E501
        _IN_MEMORY_ONLY
    ),
    "tests/reliability/test_faults.py::test_datastore_restart_mid_run_loses_nothing": (
        _IN_MEMORY_ONLY
    ),
    "tests/iteration/test_iterate.py::test_10000_entities_over_8_shards_each_processed_exactly_once": (  # noqa: E501
        "10,000 entities take two minutes on the Firestore emulator; the main leg runs it, and "
        "this leg runs the same job paths over hundreds of entities"
    ),
}
#: ... and what only the datastore leg leaves out.
NOT_ON_DATASTORE: dict[str, str] = {
    "tests/dashboard/test_admin.py::test_failure_list_paging_and_bad_cursor": (
        "the legacy emulator answers MORE_RESULTS_AFTER_LIMIT after a last page shorter than "
        "its limit (Google's Firestore emulator answers NO_MORE_RESULTS), so ndb reports more "
        "pages; the firestore leg runs this test"
    ),
    "tests/dashboard/test_admin.py::test_spillover_paging_sorting_and_filters": (
        "the legacy emulator's MORE_RESULTS_AFTER_LIMIT after a short last page (as above) shows "
        "a Next link on the last spillover page; the firestore leg runs this test"
    ),
}
_NOT_ON = {"firestore": NOT_ON_FIRESTORE, "datastore": NOT_ON_DATASTORE}

#: Fixtures that only exist on the in-memory stub: tests using them leave the Google legs.
STUB_ONLY_FIXTURES = {"datastore_commits": _STUB_SPY, "rpc_counter": _STUB_SPY}
#: Fixtures that reach Datastore: an in-process test without any of them never does.
DATASTORE_FIXTURES = {
    "ndb_stub",
    "ndb_emulator",
    "ndb_emulator_process",
    "google_emulator",
    "deferred_tasks",
    "stack",
    "rel_stack",
    "testbed",
}
#: Where every test reaches Datastore (stacks, capture_tasks()), whatever its fixtures.
DATASTORE_FOLDERS = ("tests/e2e/", "tests/reliability/", "tests/browser/", "tests/ported/")
CAPTURE_MODULES = (
    "tests/test_testing.py",
    "tests/ported/",
    "tests/iteration/test_backfills_doc.py",
)
#: Tests of Google's emulators themselves (the launcher, gae-deferred-dev --datastore, the
#: differential test): they run in the main leg when the SDK and Java are there, and are named
#: as left out, with what to install, when not.
GOOGLE_ONLY = (
    "tests/emulators/test_google_datastore.py",
    "tests/e2e/test_dev_google_datastore.py",
    "tests/emulators/test_datastore_differential.py",
    # Every Datastore RPC within 4 MiB, ids over 1,500 bytes: on Google's Firestore emulator.
    "tests/test_rpc_limits.py::test_spill_stores_and_runs_with_every_rpc_within_4_mib[google",
    "tests/test_rpc_limits.py::test_transactional_spill_stores_and_runs_with_every_rpc_within_4_mib[google",
    "tests/test_rpc_limits.py::test_rolled_back_transactional_spill_leaves_chunks_the_sweeper_deletes[google",
    "tests/dashboard/test_key_limits.py::test_ids_over_datastores_limit_are_404_everywhere",
    "tests/dashboard/test_key_limits.py::test_an_id_at_the_limit_is_looked_up",
    "tests/test_idempotency.py::test_idempotency_key_of_any_length_runs_once",
)

LEGS = {"firestore": FIRESTORE_PATHS, "datastore": DATASTORE_PATHS}


def left_out(mode: str, nodeid: str, fixtures: set[str]) -> str | None:
    """Why leg ``mode`` leaves test ``nodeid`` out, or None to run it."""
    if mode == "builtin":
        return _google_missing() if nodeid.startswith(GOOGLE_ONLY) else None
    for fixture, reason in STUB_ONLY_FIXTURES.items():
        if fixture in fixtures:
            return reason
    for named in (NOT_ON_GOOGLE, _NOT_ON[mode]):
        reason = named.get(nodeid) or named.get(nodeid.split("[")[0])
        if reason is not None:
            return reason
    return None


def _google_missing() -> str | None:
    from gae_deferred.local.google_datastore import GOOGLE_MODES, unavailable_reason

    for mode in GOOGLE_MODES:
        reason = unavailable_reason(mode)
        if reason is not None:
            return f"needs Google's emulators: {reason}"
    return None


def reaches_datastore(nodeid: str, fixtures: set[str]) -> bool:
    """Whether a Google leg runs a test: it talks to Datastore, and is not one of the tests of
    Google's emulators themselves (they ran in the main leg)."""
    if nodeid.startswith(GOOGLE_ONLY):
        return False
    return nodeid.startswith(DATASTORE_FOLDERS + CAPTURE_MODULES) or bool(
        fixtures & DATASTORE_FIXTURES
    )


def main(argv: list[str] | None = None) -> int:
    """Run every leg that can run here; print one line per leg at the start and at the end."""
    from gae_deferred.local.google_datastore import unavailable_reason

    extra = list(argv if argv is not None else sys.argv[1:])
    missing = {mode: unavailable_reason(mode) for mode in LEGS}
    for mode, reason in missing.items():
        if reason is not None:
            print(f"Google emulator leg {mode!r} will not run: {reason}", flush=True)
    if extra == ["--check"]:  # make test, before the main run: only say what will not run
        return 0
    results: dict[str, str] = {}
    code = 0
    for mode, paths in LEGS.items():
        if missing[mode] is not None:
            results[mode] = f"did not run: {missing[mode]}"
            continue
        print(f"\n=== Google emulator leg {mode!r}: pytest --datastore={mode}", flush=True)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", f"--datastore={mode}", *paths, *extra],
            cwd=ROOT,
            env=os.environ,
        )
        took = time.monotonic() - started
        outcome = "passed" if done.returncode == 0 else f"FAILED (pytest exit {done.returncode})"
        results[mode] = f"{outcome} in {took:.0f}s"
        code = code or done.returncode
    print()
    for mode, result in results.items():
        print(f"Google emulator leg {mode!r}: {result}")
    return code


if __name__ == "__main__":
    sys.exit(main())
