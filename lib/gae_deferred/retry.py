"""Per-task retry options: legacy ``taskqueue.TaskRetryOptions``, and what ``_retry_options``
accepts::

    from gae_deferred import TaskRetryOptions, defer

    defer(sync, account_id, _retry_options=TaskRetryOptions(task_retry_limit=3))
    defer(sync, account_id, _retry_options={"task_retry_limit": 3, "min_backoff_seconds": 10})

Cloud Tasks has no per-task retry settings: the handler enforces them (see execution.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import InvalidTaskRetryOptionsError

#: The fields, as legacy named them.
FIELDS = (
    "task_retry_limit",
    "task_age_limit",
    "min_backoff_seconds",
    "max_backoff_seconds",
    "max_doublings",
)


class TaskRetryOptions:
    """When a failed task is retried: legacy ``taskqueue.TaskRetryOptions``, same keywords,
    same checks (InvalidTaskRetryOptionsError for a negative value or a maximum backoff below
    the minimum; TypeError for an unknown keyword); ``task_age_limit`` rounds up to whole
    seconds, as it did."""

    __slots__ = ("_values",)

    def __init__(self, **kwargs: float | None) -> None:
        unknown = set(kwargs) - set(FIELDS)
        if unknown:
            raise TypeError(f"Invalid arguments: {', '.join(sorted(unknown))}")
        values: dict[str, float] = {}
        for field in FIELDS:
            value = kwargs.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidTaskRetryOptionsError(
                    f"_retry_options.{field} must be a number >= 0, not {value!r}"
                )
            values[field] = value
        low, high = values.get("min_backoff_seconds"), values.get("max_backoff_seconds")
        if low is not None and high is not None and high < low:
            raise InvalidTaskRetryOptionsError(
                "The maximum retry interval cannot be less than the minimum retry interval"
            )
        if "task_age_limit" in values:
            values["task_age_limit"] = math.ceil(values["task_age_limit"])
        self._values = values

    @classmethod
    def from_option(cls, options: Any) -> TaskRetryOptions:
        """What ``_retry_options`` was given: this class, a dict of its keywords, or an object
        with the same attributes (the legacy SDK's own TaskRetryOptions)."""
        if isinstance(options, cls):
            return options
        if isinstance(options, Mapping):
            unknown = set(options) - set(FIELDS)
            if unknown:
                raise InvalidTaskRetryOptionsError(
                    f"_retry_options has unknown field(s): {', '.join(sorted(map(str, unknown)))}"
                )
            return cls(**options)
        return cls(**{field: getattr(options, field, None) for field in FIELDS})

    def as_dict(self) -> dict[str, float]:
        """The fields that are set: what the envelope header's ``retry`` carries."""
        return dict(self._values)

    @property
    def task_retry_limit(self) -> int | None:
        return self._values.get("task_retry_limit")  # type: ignore[return-value]

    @property
    def task_age_limit(self) -> int | None:
        return self._values.get("task_age_limit")  # type: ignore[return-value]

    @property
    def min_backoff_seconds(self) -> float | None:
        return self._values.get("min_backoff_seconds")

    @property
    def max_backoff_seconds(self) -> float | None:
        return self._values.get("max_backoff_seconds")

    @property
    def max_doublings(self) -> int | None:
        return self._values.get("max_doublings")  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskRetryOptions) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{field}={self._values.get(field)!r}" for field in FIELDS)
        return f"TaskRetryOptions({fields})"
