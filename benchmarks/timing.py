"""Interleaved, warmed-up, median timing of compared variants, and the machine description.

Absolute times drift on shared machines, so variants are timed in alternating rounds
(A B C, C B A, A B C, ...) and compared by the median of per-round ratios::

    result = compare({"floor": call_floor, "ours": call_ours}, rounds=15, inner=200)
    result.per_call["ours"]            # median seconds per call
    result.ratio("ours", "floor")      # median over rounds of ours/floor

This module imports only the standard library (the legacy interpreter uses it too).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Per-round seconds-per-call of each variant, from one interleaved run."""

    rounds: dict[str, list[float]]

    @property
    def per_call(self) -> dict[str, float]:
        """Median seconds per call of each variant."""
        return {name: statistics.median(values) for name, values in self.rounds.items()}

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``name / baseline``: drift within a round cancels out."""
        pairs = zip(self.rounds[name], self.rounds[baseline], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def to_json(self) -> dict[str, list[float]]:
        return self.rounds


def compare(
    variants: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    inner: int,
    warmup: int = 50,
    clock: Callable[[], float] = time.thread_time,
) -> Comparison:
    """Time each variant ``inner`` calls per round for ``rounds`` rounds, order alternating.

    The default clock is this thread's CPU time: what App Engine bills, and unlike wall time
    not inflated when another process on the same cores takes the CPU mid-round.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(_time_calls(variants[name], inner, clock))
    return Comparison(samples)


def _time_calls(call: Callable[[], object], inner: int, clock: Callable[[], float]) -> float:
    # A collection triggered by an earlier variant's garbage must not land in this one's time.
    gc.collect()
    started = clock()
    for _ in range(inner):
        call()
    return (clock() - started) / inner


def time_once(call: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def machine() -> dict[str, str]:
    """nproc, CPU model and Python version, for the report."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
    }
