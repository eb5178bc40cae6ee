"""`python -m benchmarks --quick` runs end to end and writes its report: not the numbers."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quick_benchmarks_write_the_table(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "performance.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAE_DEFERRED_")}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--legacy",
            "skip",
            "--only",
            "handler",
            "defer",
            "compression",
            "spill",
            "memory",
            "dashboard",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "== Targets ==" in completed.stdout
    text = output.read_text(encoding="utf-8")
    for heading in (
        "## Targets",
        "## Handler cost per task",
        "## defer() CPU without the network",
        "## Compression",
        "## Spill path RPCs",
        "## Memory of a spilled payload",
        "## Dashboard scaling",
    ):
        assert heading in text
    assert "| gae_deferred handler |" in text
    # The memory section measured the run side of the quick 8 MiB payload in its children.
    assert "| 8 MiB run: peak RSS increase (report only) |" in text
    assert (tmp_path / "performance-handler.svg").read_text().startswith("<svg")
    assert (tmp_path / "performance-dashboard.svg").read_text().startswith("<svg")
    assert output.with_suffix(".json").exists()
