"""queue.yaml (App Engine's format) parsing, validation and mapping to Cloud Tasks queues.

Framework-free: only PyYAML and the Cloud Tasks types are used. Every error carries the
line number it was found on, and all errors of a file are reported together::

    from gae_deferred.queue_config import load_queue_yaml, to_cloud_tasks_queue

    queues = load_queue_yaml("queue.yaml")          # raises QueueYamlError
    queues["default"].rate                           # 5.0 even if not listed
    to_cloud_tasks_queue(queues["reports"], "projects/p/locations/us-central1")
"""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import dataclass, field

import yaml
from google.cloud import tasks_v2

from . import defaults

DEFAULT_QUEUE = defaults.QUEUE
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9-]{1,100}$")
# Cloud Tasks' documented upper bounds (RateLimits / RetryConfig reference).
MAX_RATE_PER_SECOND = 500.0
MAX_BUCKET_SIZE = 500
MAX_CONCURRENT = 5000
# What Cloud Tasks picks when max_concurrent_dispatches is left unspecified; written
# explicitly so that `diff` compares against a real value instead of "unset".
DEFAULT_MAX_CONCURRENT = 1000

_RATE_RE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*/\s*(?P<unit>[smhd])\s*$")
_AGE_RE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[smhd])\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_TOP_KEYS = {"queue", "total_storage_limit"}
_QUEUE_KEYS = {
    "name",
    "rate",
    "bucket_size",
    "max_concurrent_requests",
    "retry_parameters",
    "target",
    "mode",
}
_RETRY_KEYS = {
    "task_retry_limit",
    "task_age_limit",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "max_doublings",
}


@dataclass(frozen=True)
class RetryParameters:
    """queue.yaml `retry_parameters`; defaults are App Engine's."""

    task_retry_limit: int | None = None  # None = unlimited
    task_age_limit: float | None = None  # seconds; App Engine syntax "2d", "3h", "10m", "30s"
    min_backoff_seconds: float = defaults.MIN_BACKOFF_SECONDS
    max_backoff_seconds: float = defaults.MAX_BACKOFF_SECONDS
    max_doublings: int = defaults.MAX_DOUBLINGS


@dataclass(frozen=True)
class QueueDefinition:
    """One push queue of queue.yaml."""

    name: str
    rate: float  # tasks per second ("5/s", "120/m", "1000/h", "10/d"; "0/s" = paused)
    rate_text: str
    bucket_size: int = 5
    max_concurrent_requests: int | None = None
    retry: RetryParameters = field(default_factory=RetryParameters)
    target: str | None = None
    line: int = 0  # line in queue.yaml (0 for the implicit default queue)


class QueueYamlError(ValueError):
    """All problems found in one queue.yaml; ``errors`` is a list of (line, message)."""

    def __init__(self, errors: list[tuple[int, str]], filename: str = "queue.yaml") -> None:
        self.errors = sorted(errors)
        self.filename = filename
        super().__init__(self.format())

    def format(self) -> str:
        """One ``file:line: message`` line per error."""
        return "\n".join(f"{self.filename}:{line}: {message}" for line, message in self.errors)

    def __str__(self) -> str:
        return self.format()


def implicit_default_queue() -> QueueDefinition:
    """The `default` queue App Engine always has, unless queue.yaml overrides it."""
    return QueueDefinition(name=DEFAULT_QUEUE, rate=5.0, rate_text="5/s", bucket_size=5)


class _Collector:
    """Accumulates errors so that a file reports every problem at once."""

    def __init__(self) -> None:
        self.errors: list[tuple[int, str]] = []

    def add(self, node: yaml.Node, message: str) -> None:
        self.errors.append((node.start_mark.line + 1, message))


def _scalar(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _mapping_items(
    node: yaml.MappingNode, allowed: set[str], where: str, errors: _Collector
) -> dict[str, yaml.Node]:
    """Keys of a mapping node -> value nodes; reports unknown and duplicate keys."""
    items: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node)
        if key is None:
            errors.add(key_node, f"{where}: keys must be plain names")
            continue
        if key not in allowed:
            errors.add(
                key_node, f"unknown key {key!r} in {where} (allowed: {', '.join(sorted(allowed))})"
            )
            continue
        if key in items:
            errors.add(key_node, f"duplicate key {key!r} in {where}")
            continue
        items[key] = value_node
    return items


def _int_value(node: yaml.Node, key: str, errors: _Collector, minimum: int) -> int | None:
    text = _scalar(node)
    if text is None or not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        errors.add(
            node, f"{key} must be an integer, got {text if text is not None else 'a collection'!r}"
        )
        return None
    value = int(text)
    if value < minimum:
        errors.add(node, f"{key} must be >= {minimum}, got {value}")
        return None
    return value


def _float_value(node: yaml.Node, key: str, errors: _Collector) -> float | None:
    text = _scalar(node)
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        errors.add(
            node, f"{key} must be a number, got {text if text is not None else 'a collection'!r}"
        )
        return None
    if value < 0:
        errors.add(node, f"{key} must not be negative, got {text}")
        return None
    return value


def _parse_rate(node: yaml.Node, errors: _Collector) -> tuple[float, str] | None:
    text = _scalar(node)
    match = _RATE_RE.match(text) if text is not None else None
    if match is None:
        errors.add(
            node,
            f"invalid rate {text!r}: expected a non-negative number, '/', and a unit s, m, h "
            "or d (e.g. 5/s, 120/m)",
        )
        return None
    rate = float(match["num"]) / _UNIT_SECONDS[match["unit"]]
    if rate > MAX_RATE_PER_SECOND:
        errors.add(node, f"rate {text!r} exceeds Cloud Tasks' maximum of {MAX_RATE_PER_SECOND:g}/s")
        return None
    return rate, text.strip()


def _parse_retry(node: yaml.Node, errors: _Collector) -> RetryParameters | None:
    if not isinstance(node, yaml.MappingNode):
        errors.add(node, "retry_parameters must be a mapping")
        return None
    items = _mapping_items(node, _RETRY_KEYS, "retry_parameters", errors)
    before = len(errors.errors)
    values: dict[str, object] = {}
    if "task_retry_limit" in items:
        values["task_retry_limit"] = _int_value(
            items["task_retry_limit"], "task_retry_limit", errors, 0
        )
    if "task_age_limit" in items:
        age_node = items["task_age_limit"]
        text = _scalar(age_node)
        match = _AGE_RE.match(text) if text is not None else None
        if match is None:
            errors.add(
                age_node,
                f"invalid task_age_limit {text!r}: expected a number and a unit s, m, h or d "
                "(e.g. 2d, 30s)",
            )
        else:
            values["task_age_limit"] = float(match["num"]) * _UNIT_SECONDS[match["unit"]]
    for key in ("min_backoff_seconds", "max_backoff_seconds"):
        if key in items:
            values[key] = _float_value(items[key], key, errors)
    if "max_doublings" in items:
        values["max_doublings"] = _int_value(items["max_doublings"], "max_doublings", errors, 0)
    low = values.get("min_backoff_seconds", RetryParameters.min_backoff_seconds)
    high = values.get("max_backoff_seconds", RetryParameters.max_backoff_seconds)
    if low is not None and high is not None and low > high:  # type: ignore[operator]
        errors.add(
            node,
            f"min_backoff_seconds ({low:g}) is greater than max_backoff_seconds ({high:g})",
        )
    if len(errors.errors) > before:
        return None
    return RetryParameters(**values)  # type: ignore[arg-type]


def _parse_queue(node: yaml.Node, errors: _Collector) -> QueueDefinition | None:
    if not isinstance(node, yaml.MappingNode):
        errors.add(node, "each entry of 'queue' must be a mapping with at least name and rate")
        return None
    before = len(errors.errors)
    items = _mapping_items(node, _QUEUE_KEYS, "queue entry", errors)
    name = None
    if "name" not in items:
        errors.add(node, "queue entry has no name")
    else:
        name = _scalar(items["name"])
        if name is None or not QUEUE_NAME_RE.match(name):
            errors.add(
                items["name"],
                f"invalid queue name {name!r}: Cloud Tasks queue names use only letters, "
                "digits and hyphens, at most 100 characters",
            )
    where = f"queue {name!r}" if name else "queue entry"
    if "mode" in items:
        mode = _scalar(items["mode"])
        if mode == "pull":
            errors.add(
                items["mode"],
                f"{where}: pull queues are not supported by Cloud Tasks App Engine targets; "
                "use Pub/Sub instead",
            )
        elif mode != "push":
            errors.add(items["mode"], f"{where}: mode must be 'push', got {mode!r}")
    rate = None
    if "rate" not in items:
        errors.add(node, f"{where} has no rate (e.g. rate: 5/s)")
    else:
        rate = _parse_rate(items["rate"], errors)
    values: dict[str, object] = {}
    if "bucket_size" in items:
        bucket = _int_value(items["bucket_size"], "bucket_size", errors, 1)
        if bucket is not None and bucket > MAX_BUCKET_SIZE:
            errors.add(
                items["bucket_size"], f"bucket_size must be <= {MAX_BUCKET_SIZE}, got {bucket}"
            )
        values["bucket_size"] = bucket
    if "max_concurrent_requests" in items:
        node_mcr = items["max_concurrent_requests"]
        concurrent = _int_value(node_mcr, "max_concurrent_requests", errors, 1)
        if concurrent is not None and concurrent > MAX_CONCURRENT:
            errors.add(
                node_mcr, f"max_concurrent_requests must be <= {MAX_CONCURRENT}, got {concurrent}"
            )
        values["max_concurrent_requests"] = concurrent
    if "retry_parameters" in items:
        values["retry"] = _parse_retry(items["retry_parameters"], errors)
    if "target" in items:
        target = _scalar(items["target"])
        if not target:
            errors.add(items["target"], f"{where}: target must be a service name")
        values["target"] = target
    if len(errors.errors) > before or name is None or rate is None:
        return None
    return QueueDefinition(
        name=name, rate=rate[0], rate_text=rate[1], line=node.start_mark.line + 1, **values
    )  # type: ignore[arg-type]


def parse_queue_yaml(text: str, filename: str = "queue.yaml") -> dict[str, QueueDefinition]:
    """Parse queue.yaml text into {name: QueueDefinition}, `default` always included.

    >>> parse_queue_yaml("queue:\\n- name: mail\\n  rate: 2/s\\n")["mail"].rate
    2.0

    Raises QueueYamlError listing every problem with its line number.
    """
    errors = _Collector()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise QueueYamlError(
            [(line, f"YAML syntax error: {exc.problem or exc}")], filename
        ) from exc
    except yaml.YAMLError as exc:
        raise QueueYamlError([(1, f"YAML error: {exc}")], filename) from exc

    queues: dict[str, QueueDefinition] = {}
    if root is None:
        return {DEFAULT_QUEUE: implicit_default_queue()}
    if not isinstance(root, yaml.MappingNode):
        raise QueueYamlError(
            [(root.start_mark.line + 1, "queue.yaml must be a mapping with a 'queue' list")],
            filename,
        )
    top = _mapping_items(root, _TOP_KEYS, "queue.yaml", errors)
    if "total_storage_limit" in top:
        limit = _scalar(top["total_storage_limit"])
        if limit is None or not re.fullmatch(r"\s*[0-9]+(\.[0-9]*)?\s*[BKMGT]?\s*", limit):
            errors.add(top["total_storage_limit"], f"invalid total_storage_limit {limit!r}")
    queue_list = top.get("queue")
    if queue_list is not None and not (
        isinstance(queue_list, yaml.ScalarNode) and queue_list.tag.endswith(":null")
    ):
        if not isinstance(queue_list, yaml.SequenceNode):
            errors.add(queue_list, "'queue' must be a list of queue definitions")
        else:
            first_line: dict[str, int] = {}
            for entry in queue_list.value:
                definition = _parse_queue(entry, errors)
                if definition is None:
                    continue
                if definition.name in first_line:
                    errors.add(
                        entry,
                        f"duplicate queue name {definition.name!r} "
                        f"(first defined on line {first_line[definition.name]})",
                    )
                    continue
                first_line[definition.name] = definition.line
                queues[definition.name] = definition
    if errors.errors:
        raise QueueYamlError(errors.errors, filename)
    queues.setdefault(DEFAULT_QUEUE, implicit_default_queue())
    return queues


def load_queue_yaml(path: str | os.PathLike[str]) -> dict[str, QueueDefinition]:
    """Read and parse a queue.yaml file; errors name the file as given."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        where = f"byte 0x{data[exc.start]:02x} in column {exc.start - line_start + 1}"
        message = f"not valid UTF-8 ({where}): save the file as UTF-8"
        raise QueueYamlError([(line, message)], filename=os.fspath(path)) from None
    return parse_queue_yaml(text, filename=os.fspath(path))


def _duration(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def to_cloud_tasks_queue(definition: QueueDefinition, parent: str) -> tasks_v2.Queue:
    """The Cloud Tasks queue equivalent to a queue.yaml definition.

    ``parent`` is ``projects/P/locations/L``. A ``0/s`` queue becomes state PAUSED with
    an unspecified rate, because Cloud Tasks reads a zero rate as "use the default".
    """
    retry = definition.retry
    queue = tasks_v2.Queue(
        name=f"{parent}/queues/{definition.name}",
        rate_limits=tasks_v2.RateLimits(
            max_dispatches_per_second=definition.rate,
            max_burst_size=definition.bucket_size,
            max_concurrent_dispatches=definition.max_concurrent_requests or DEFAULT_MAX_CONCURRENT,
        ),
        retry_config=tasks_v2.RetryConfig(
            max_attempts=-1 if retry.task_retry_limit is None else retry.task_retry_limit + 1,
            max_retry_duration=_duration(retry.task_age_limit or 0),
            min_backoff=_duration(retry.min_backoff_seconds),
            max_backoff=_duration(retry.max_backoff_seconds),
            max_doublings=retry.max_doublings,
        ),
        state=tasks_v2.Queue.State.PAUSED if definition.rate == 0 else tasks_v2.Queue.State.RUNNING,
    )
    if definition.target:
        queue.app_engine_routing_override = tasks_v2.AppEngineRouting(service=definition.target)
    return queue


def _seconds(value: datetime.timedelta | None) -> float:
    return value.total_seconds() if value is not None else 0.0


def _same_duration(wanted: float, actual: float) -> bool:
    # Cloud Tasks truncates backoffs and retry durations to whole seconds; the emulator keeps
    # fractions. Either way counts as "the same".
    return abs(wanted - actual) < 1e-3 or (actual == int(actual) and int(wanted) == int(actual))


def field_differences(wanted: tasks_v2.Queue, actual: tasks_v2.Queue) -> list[tuple[str, str, str]]:
    """(update-mask path, wanted, actual) for every configurable field that differs.

    max_burst_size is output only in Cloud Tasks and therefore never compared.
    """
    diffs: list[tuple[str, str, str]] = []
    wr, ar = wanted.rate_limits, actual.rate_limits
    paused = wanted.state == tasks_v2.Queue.State.PAUSED
    if not paused and abs(wr.max_dispatches_per_second - ar.max_dispatches_per_second) > 1e-9:
        diffs.append(
            (
                "rate_limits.max_dispatches_per_second",
                f"{wr.max_dispatches_per_second:g}/s",
                f"{ar.max_dispatches_per_second:g}/s",
            )
        )
    if wr.max_concurrent_dispatches != ar.max_concurrent_dispatches:
        diffs.append(
            (
                "rate_limits.max_concurrent_dispatches",
                str(wr.max_concurrent_dispatches),
                str(ar.max_concurrent_dispatches),
            )
        )
    wc, ac = wanted.retry_config, actual.retry_config
    if wc.max_attempts != ac.max_attempts:
        diffs.append(("retry_config.max_attempts", str(wc.max_attempts), str(ac.max_attempts)))
    for path in ("max_retry_duration", "min_backoff", "max_backoff"):
        w, a = _seconds(getattr(wc, path)), _seconds(getattr(ac, path))
        if not _same_duration(w, a):
            diffs.append((f"retry_config.{path}", f"{w:g}s", f"{a:g}s"))
    if wc.max_doublings != ac.max_doublings:
        diffs.append(("retry_config.max_doublings", str(wc.max_doublings), str(ac.max_doublings)))
    w_service = wanted.app_engine_routing_override.service
    a_service = actual.app_engine_routing_override.service
    if w_service != a_service:
        diffs.append(("app_engine_routing_override", w_service or "(none)", a_service or "(none)"))
    if paused and actual.state != tasks_v2.Queue.State.PAUSED:
        diffs.append(("state", "PAUSED", actual.state.name))
    return diffs


def queue_differences(wanted: tasks_v2.Queue, actual: tasks_v2.Queue) -> list[str]:
    """Human-readable differences, e.g. ``retry_config.max_attempts: wanted 6, actual 100``."""
    return [f"{path}: wanted {w}, actual {a}" for path, w, a in field_differences(wanted, actual)]
