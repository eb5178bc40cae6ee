"""Command line for queue.yaml: validate it, diff it against Cloud Tasks, sync it.

Usage::

    python -m gae_deferred.queues validate [queue.yaml]
    python -m gae_deferred.queues diff [queue.yaml] [--project P] [--location L]
    python -m gae_deferred.queues sync [queue.yaml] [--project P] [--location L] [--dry-run]

``--project`` defaults to $GOOGLE_CLOUD_PROJECT, ``--location`` to $GAE_DEFERRED_LOCATION
or us-central1. With $CLOUD_TASKS_EMULATOR_HOST set, diff/sync talk to the local emulator.

Exit codes: 0 ok; 1 invalid queue.yaml, or (diff) differences found; 2 usage or
connection error. sync never deletes queues that are not in queue.yaml; it lists them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import tasks_v2

from gae_deferred import cloud_tasks, defaults, queue_config

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


class _CliError(Exception):
    """A usage or connection problem: printed, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gae_deferred.queues",
        description="Validate queue.yaml and keep Cloud Tasks queues in line with it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("validate", "check queue.yaml and report every error with its line"),
        ("diff", "show how Cloud Tasks queues differ from queue.yaml (exit 1 if they do)"),
        ("sync", "create missing queues and update changed ones (never deletes)"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("queue_yaml", nargs="?", default="queue.yaml")
        if name == "validate":
            continue
        command.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"))
        command.add_argument(
            "--location", default=os.environ.get("GAE_DEFERRED_LOCATION") or defaults.LOCATION
        )
        command.add_argument(
            "--timeout",
            type=_seconds,
            default=defaults.CLOUD_TASKS_TIMEOUT_SECONDS,
            help="seconds per Cloud Tasks call",
        )
        if name == "sync":
            command.add_argument("--dry-run", action="store_true", help="print, change nothing")
    return parser


def _seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0 (argparse reports anything else)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def _validated(path: str, definitions: dict[str, queue_config.QueueDefinition]) -> str:
    """What ``validate`` says of a file that parsed: the queues it defines, and whether the
    only one is App Engine's implicit ``default`` (an empty file)."""
    implicit = definitions.get(queue_config.DEFAULT_QUEUE) == queue_config.implicit_default_queue()
    defined = [
        name for name in definitions if not (implicit and name == queue_config.DEFAULT_QUEUE)
    ]
    if not defined:
        return f"{path}: defines no queues; only App Engine's implicit 'default' queue (5/s)"
    also = " (and App Engine's implicit 'default')" if implicit else ""
    return f"{path}: {len(defined)} queues OK{also}: {', '.join(defined)}"


def _load(path: str, err: TextIO) -> dict[str, queue_config.QueueDefinition] | None:
    try:
        return queue_config.load_queue_yaml(path)
    except queue_config.QueueYamlError as exc:
        print(exc.format(), file=err)
        return None
    except OSError as exc:
        raise _CliError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _plan(
    definitions: dict[str, queue_config.QueueDefinition],
    actual: dict[str, tasks_v2.Queue],
    parent: str,
) -> tuple[
    list[tasks_v2.Queue], list[tuple[tasks_v2.Queue, list[tuple[str, str, str]]]], list[str]
]:
    """(queues to create, (queue, field diffs) to update, names only in Cloud Tasks)."""
    missing, changed = [], []
    for name, definition in sorted(definitions.items()):
        wanted = queue_config.to_cloud_tasks_queue(definition, parent)
        if name not in actual:
            missing.append(wanted)
            continue
        diffs = queue_config.field_differences(wanted, actual[name])
        if diffs:
            changed.append((wanted, diffs))
    extra = sorted(set(actual) - set(definitions))
    return missing, changed, extra


def _report(missing, changed, extra, out: TextIO, verb_create: str, verb_update: str) -> None:
    for queue in missing:
        print(f"{verb_create} {queue.name.rsplit('/', 1)[-1]}", file=out)
    for queue, diffs in changed:
        print(f"{verb_update} {queue.name.rsplit('/', 1)[-1]}:", file=out)
        for path, wanted, actual in diffs:
            print(f"    {path}: wanted {wanted}, actual {actual}", file=out)
    for name in extra:
        print(f"  {name}: not in queue.yaml (left alone)", file=out)


def _remote(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    definitions = _load(args.queue_yaml, err)
    if definitions is None:
        return EXIT_DIFFERENT
    if not args.project:
        raise _CliError("no project: pass --project or set GOOGLE_CLOUD_PROJECT")
    parent = cloud_tasks.location_path_of(args.project, args.location)
    actual = cloud_tasks.queues_in(parent, timeout=args.timeout)
    missing, changed, extra = _plan(definitions, actual, parent)
    if args.command == "diff":
        _report(missing, changed, extra, out, "+ missing:", "~ differs:")
        if not missing and not changed:
            print(f"{len(definitions)} queues match {args.queue_yaml}", file=out)
            return EXIT_OK
        return EXIT_DIFFERENT
    dry = args.dry_run
    _report(
        missing,
        changed,
        extra,
        out,
        "would create" if dry else "create",
        "would update" if dry else "update",
    )
    if dry:
        return EXIT_OK
    for queue in missing:
        cloud_tasks.create_queue(parent, queue, timeout=args.timeout)
    for queue, diffs in changed:
        cloud_tasks.update_queue(queue, [path for path, _, _ in diffs], timeout=args.timeout)
    print(f"synced: {len(missing)} created, {len(changed)} updated", file=out)
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the CLI; returns the exit code (see module docstring)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_ERROR
    try:
        if args.command == "validate":
            definitions = _load(args.queue_yaml, err)
            if definitions is None:
                return EXIT_DIFFERENT
            print(_validated(args.queue_yaml, definitions), file=out)
            return EXIT_OK
        return _remote(args, out, err)
    except _CliError as exc:
        print(f"error: {exc}", file=err)
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as exc:
        target = os.environ.get("CLOUD_TASKS_EMULATOR_HOST") or "Cloud Tasks"
        print(f"error: Cloud Tasks call failed ({target}): {exc}", file=err)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
