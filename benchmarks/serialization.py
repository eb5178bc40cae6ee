"""Benchmarks 2 and 4: defer() CPU without the network, and compression of realistic payloads.

defer() cost is ``envelope.build`` (pickle or cloudpickle, compression, header, HMAC) plus
``cloud_tasks.build_task`` (the Cloud Tasks request), compared with ``pickle.dumps`` and
``cloudpickle.dumps`` of the same ``(callable, args, kwargs)`` tuple.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import pickle
import random
import string
import zlib
from collections.abc import Callable

import cloudpickle
from google.cloud import tasks_v2

import gae_deferred
from gae_deferred import envelope
from gae_deferred._config import settings
from gae_deferred.cloud_tasks import TaskSpec, build_task
from gae_deferred.enqueue import prepare_call

from . import tasks, timing
from .report import Section, Target, ratio_target

PROTOCOL = pickle.HIGHEST_PROTOCOL


def _spec() -> TaskSpec:
    return TaskSpec(
        queue="default",
        url=f"{settings().task_url}/benchmarks.tasks.add",
        headers={"Content-Type": "application/octet-stream"},
        eta=datetime.datetime.now(datetime.UTC),
    )


def _closure(base: int) -> Callable[[], int]:
    offset = base * 2
    return lambda: tasks.add(base, offset)


def _text(rng: random.Random, size: int) -> str:
    """English-like text: a 2,000-word vocabulary drawn with a Zipf-like skew."""
    vocabulary = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
        for _ in range(2000)
    ]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    words: list[str] = []
    length = 0
    while length < size:
        chunk = rng.choices(vocabulary, weights, k=200)
        words += chunk
        length += sum(len(word) + 1 for word in chunk)
    return " ".join(words)[:size]


def _records(rng: random.Random, count: int) -> list[dict]:
    return [
        {
            "id": rng.randrange(1 << 52),
            "name": f"user-{rng.randrange(10**6)}",
            "email": f"u{rng.randrange(10**6)}@example.com",
            "created": 1_700_000_000 + rng.randrange(10**7),
            "score": round(rng.random() * 100, 2),
            "active": rng.random() < 0.8,
            "tags": rng.sample(["a", "b", "vip", "beta", "eu", "us", "trial"], 2),
        }
        for _ in range(count)
    ]


def corpus(quick: bool) -> list[tuple[str, tuple]]:
    """(label, args) pairs of realistic payloads; deterministic (seeded)."""
    rng = random.Random(6)
    items: list[tuple[str, tuple]] = [
        ("ids x1k", ([rng.randrange(1 << 52) for _ in range(1000)],)),
        ("ids x20k", ([rng.randrange(1 << 52) for _ in range(20_000)],)),
        ("records x100", (_records(rng, 100),)),
        ("records x2k", (_records(rng, 2000),)),
        ("text 5 KB", (_text(rng, 5_000),)),
        ("text 150 KB", (_text(rng, 150_000),)),
        ("random 2 KB", (rng.randbytes(2_000),)),
        ("random 150 KB", (rng.randbytes(150_000),)),
    ]
    if not quick:
        items += [
            ("ids x100k", ([rng.randrange(1 << 52) for _ in range(100_000)],)),
            ("records x10k", (_records(rng, 10_000),)),
            ("text 1 MB", (_text(rng, 1_000_000),)),
            ("random 1 MB", (rng.randbytes(1_000_000),)),
        ]
    return items


#: Budgets of defer()'s build against a floor measured in the same interleaved rounds.
BUDGETS = {
    "module function, 2 ints": ("cloudpickle", 3.0),
    # zlib level 1 (the default) of the pickled call is work any compressed envelope must do.
    "module function, 50 KB str": ("cloudpickle+zlib", 1.5),
}


def _defer_build(fn: Callable, args: tuple) -> object:
    """What defer() does before CreateTask: check the options, name the task, build the signed
    envelope (prepare_call), then the Cloud Tasks request (build_task)."""
    call = prepare_call(fn, args, {})
    return build_task(call.spec, call.data)


def _minimum_work(fn: Callable, args: tuple, header: bytes) -> object:
    """The C-level work no defer() can skip, with none of its Python around it: the pickle, a
    random task name, the clock, HMAC-SHA256 over an envelope of the real header's size, and
    the Cloud Tasks protobuf (the same fields build_task sets). Report only: it shows how much
    of defer()'s cost is that work and how much is the Python that checks and assembles it."""
    raw = pickle.dumps((fn, args, {}), protocol=PROTOCOL)
    name = f"d-{os.urandom(16).hex()}"
    now = datetime.datetime.now(datetime.UTC)
    mac = _MINIMUM_MAC.copy()
    mac.update(header)
    mac.update(raw)
    body = header + raw + mac.digest()
    task = _TaskPb()
    request = task.app_engine_http_request
    request.http_method = tasks_v2.HttpMethod.POST.value
    request.relative_uri = "/_ah/queue/deferred/benchmarks.tasks.add"
    request.headers["Content-Type"] = "application/octet-stream"
    request.body = body
    since = now - _EPOCH
    task.schedule_time.seconds = since.days * 86400 + since.seconds
    task.name = f"projects/p/locations/l/queues/default/tasks/{name}"
    return tasks_v2.Task.wrap(task)


#: Keyed once, as defer()'s own HMAC is.
_MINIMUM_MAC = hmac.new(b"k" * 32, digestmod=hashlib.sha256)
_TaskPb = tasks_v2.Task.pb()
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def run_defer_cost(*, quick: bool) -> Section:
    """CPU of envelope.build + build_task vs pickle.dumps / cloudpickle.dumps."""
    rounds, inner = (5, 50) if quick else (21, 200)
    big = _text(random.Random(2), 50_000)
    cases: list[tuple[str, Callable, tuple]] = [
        ("module function, 2 ints", tasks.add, (1, 2)),
        ("closure (lambda over locals)", _closure(3), ()),
        ("module function, 50 KB str", tasks.consume, (big,)),
    ]
    section = Section(
        key="defer",
        title="defer() CPU without the network",
        what=(
            "CPU us per call of `enqueue.prepare_call(fn, args, {})` (options, task name, "
            "signed envelope) + `cloud_tasks.build_task(spec, body)`: what defer() does before "
            "CreateTask, vs `pickle.dumps` and `cloudpickle.dumps` of the same "
            "`(fn, args, kwargs)` tuple, and for the 50 KB case `cloudpickle.dumps` + "
            "`zlib.compress(level=1)` of the same bytes; default settings (zlib level "
            f"{gae_deferred.Settings().compression_level} from 1,024 bytes). {rounds} "
            f"interleaved rounds of {inner} calls; medians."
        ),
        columns=[
            "case",
            "serializer",
            "pickle.dumps us",
            "cloudpickle.dumps us",
            "defer build us",
            "x pickle",
            "x cloudpickle",
        ],
    )
    for label, fn, args in cases:
        call = (fn, args, {})
        variants: dict[str, Callable[[], object]] = {
            "cloudpickle": lambda call=call: cloudpickle.dumps(call, protocol=PROTOCOL),
            "ours": lambda fn=fn, args=args: _defer_build(fn, args),
        }
        if label == "module function, 2 ints":
            header = envelope.encode_header(prepare_call(fn, args, {}).header)
            variants["minimum work"] = lambda fn=fn, args=args, header=header: _minimum_work(
                fn, args, header
            )
        if label in BUDGETS and BUDGETS[label][0] == "cloudpickle+zlib":
            variants["cloudpickle+zlib"] = lambda call=call: zlib.compress(
                cloudpickle.dumps(call, protocol=PROTOCOL), 1
            )
        try:
            pickle.dumps(call, protocol=PROTOCOL)
        except Exception:  # closures: plain pickle cannot, which is why cloudpickle exists
            pickleable = False
        else:
            pickleable = True
            variants["pickle"] = lambda call=call: pickle.dumps(call, protocol=PROTOCOL)
        result = timing.compare(variants, rounds=rounds, inner=inner, warmup=20)
        per_call = result.per_call
        serializer = envelope.read_header(envelope.build(fn, args))["serializer"]
        to_pickle = result.ratio("ours", "pickle") if pickleable else None
        to_cloud = result.ratio("ours", "cloudpickle")
        section.rows.append(
            [
                label,
                serializer,
                f"{per_call['pickle'] * 1e6:.1f}" if pickleable else "n/a (unpicklable)",
                f"{per_call['cloudpickle'] * 1e6:.1f}",
                f"{per_call['ours'] * 1e6:.1f}",
                f"{to_pickle:.2f}" if to_pickle is not None else "—",
                f"{to_cloud:.2f}",
            ]
        )
        section.data[label] = result.to_json()
        if to_pickle is not None:
            section.targets.append(
                Target(
                    f"defer build vs pickle.dumps, {label} (report only)",
                    f"{to_pickle:.2f}x",
                    "—",
                    True,
                )
            )
        section.targets.append(
            Target(
                f"defer build vs cloudpickle.dumps, {label} (report only)",
                f"{to_cloud:.2f}x",
                "—",
                True,
            )
        )
        if label in BUDGETS:
            floor_name, limit = BUDGETS[label]
            value = result.ratio("ours", floor_name)
            section.targets.append(
                ratio_target(f"defer build vs {floor_name}, {label}", value, limit)
            )
            section.notes.append(
                f"{label}: {floor_name} floor {per_call[floor_name] * 1e6:.1f} us, defer build "
                f"{per_call['ours'] * 1e6:.1f} us, ratio {value:.2f}x (budget ≤ {limit:g}x)"
            )
        if "minimum work" in per_call:
            minimum = per_call["minimum work"]
            section.notes.append(
                f"{label}: the C-level work no defer() can skip (pickle, random task name, "
                "clock, HMAC-SHA256 over an envelope with a header of the real size, the Cloud "
                f"Tasks protobuf; `_minimum_work`) takes {minimum * 1e6:.1f} us, "
                f"{result.ratio('minimum work', 'cloudpickle'):.2f}x cloudpickle.dumps; the "
                f"other {(per_call['ours'] - minimum) * 1e6:.1f} us are defer()'s Python: "
                "checking the options, the header's fields and JSON, the task description "
                "and the envelope objects"
            )
    section.notes.append(
        f"the 50 KB case includes zlib level {gae_deferred.Settings().compression_level} on "
        "the body (the default); the compression section below gives that part's cost per level."
    )
    return section


LEVELS = (0, 1, 6, 9)


def run_compression(*, quick: bool) -> Section:
    """Envelope bytes, spill rate and zlib CPU per level over the corpus."""
    items = corpus(quick)
    spec = _spec()
    threshold = settings().spill_threshold
    section = Section(
        key="compression",
        title="Compression",
        what=(
            "Envelope bytes (what goes to Cloud Tasks, or to Datastore when spilled) and whether "
            f"the task spills (envelope + URL + headers > {threshold:,} bytes) for a corpus of "
            "seeded, realistic payloads passed to a module function, per zlib level "
            "(`configure(compression_level=...)`; 0 = off; `compress_min_bytes` 1,024). CPU is "
            "`zlib.compress` of the pickled body at that level and `zlib.decompress` when "
            "running, medians of interleaved rounds."
        ),
        columns=["payload", "raw bytes", *[f"L{level} bytes" for level in LEVELS]],
    )
    totals = {
        level: {"bytes": 0, "spills": 0, "compress": 0.0, "decompress": 0.0} for level in LEVELS
    }
    for label, args in items:
        raw = pickle.dumps((tasks.consume, args, {}), protocol=PROTOCOL)
        row = [label, f"{len(raw):,}"]
        for level in LEVELS:
            gae_deferred.configure(compression_level=level)
            data = envelope.build(tasks.consume, args)
            spilled = spec.size(data) > threshold
            totals[level]["bytes"] += len(data)
            totals[level]["spills"] += spilled
            row.append(f"{len(data):,}{' (spill)' if spilled else ''}")
        section.rows.append(row)
        cpu = _zlib_cpu(raw, quick)
        for level in LEVELS:
            totals[level]["compress"] += cpu[level][0]
            totals[level]["decompress"] += cpu[level][1]
    default_level = gae_deferred.Settings().compression_level
    gae_deferred.configure(compression_level=default_level)
    section.rows.append(["**total**", "", *[f"{totals[lv]['bytes']:,}" for lv in LEVELS]])
    section.rows.append(
        ["spilled tasks", "", *[f"{totals[lv]['spills']}/{len(items)}" for lv in LEVELS]]
    )
    section.rows.append(
        ["compress CPU ms (all)", "", *[f"{totals[lv]['compress'] * 1e3:.1f}" for lv in LEVELS]]
    )
    section.rows.append(
        ["decompress CPU ms (all)", "", *[f"{totals[lv]['decompress'] * 1e3:.1f}" for lv in LEVELS]]
    )
    section.data = {str(level): totals[level] for level in LEVELS}
    recommended, reason = _recommend(totals)
    section.notes.append(f"recommended default: compression_level={recommended} — {reason}")
    section.targets.append(
        Target(
            f"recommended compression_level (current default {default_level})",
            str(recommended),
            "data-driven",
            True,
        )
    )
    return section


def _zlib_cpu(raw: bytes, quick: bool) -> dict[int, tuple[float, float]]:
    """CPU seconds of compress and decompress per level (level 0: no compression, 0 s)."""
    packed = {level: zlib.compress(raw, level) for level in LEVELS if level}
    inner = max(1, min(50, 2_000_000 // max(len(raw), 1)))
    rounds = 3 if quick else 7
    compress = timing.compare(
        {level: (lambda level=level: zlib.compress(raw, level)) for level in LEVELS if level},
        rounds=rounds,
        inner=inner,
        warmup=1,
    ).per_call
    decompress = timing.compare(
        {level: (lambda level=level: zlib.decompress(packed[level])) for level in LEVELS if level},
        rounds=rounds,
        inner=inner,
        warmup=1,
    ).per_call
    result = {0: (0.0, 0.0)}
    result.update({level: (compress[level], decompress[level]) for level in LEVELS if level})
    return result


def _recommend(totals: dict[int, dict[str, float]]) -> tuple[int, str]:
    """Fewest spills first (a spill costs Datastore RPCs), then the least compress CPU among
    levels whose bytes are within 5% of the smallest (a few KB more on the wire cost nothing
    billable, CPU does)."""
    best_bytes = min(t["bytes"] for t in totals.values())
    fewest_spills = min(t["spills"] for t in totals.values())
    candidates = [
        level
        for level in LEVELS
        if totals[level]["spills"] == fewest_spills and totals[level]["bytes"] <= best_bytes * 1.05
    ]
    choice = min(candidates, key=lambda level: totals[level]["compress"])
    t = totals[choice]
    others = ", ".join(
        f"L{lv} {totals[lv]['compress'] * 1e3:.1f} ms / {totals[lv]['bytes']:,} B / "
        f"{int(totals[lv]['spills'])} spills"
        for lv in LEVELS
        if lv != choice
    )
    reason = (
        f"fewest spills ({int(t['spills'])}), {t['bytes']:,} bytes "
        f"({t['bytes'] / best_bytes * 100 - 100:+.1f}% vs the smallest), least compress CPU "
        f"among such levels ({t['compress'] * 1e3:.1f} ms for the corpus; {others})"
    )
    return choice, reason
