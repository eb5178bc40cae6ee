"""queue.yaml parsing and validation, Cloud Tasks mapping, the queues CLI on the emulator."""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import tasks_v2

from gae_deferred import cloud_tasks, queues
from gae_deferred.cloud_tasks import client as tasks_client
from gae_deferred.local.cloudtasks import CloudTasksEmulator
from gae_deferred.queue_config import (
    QueueDefinition,
    QueueYamlError,
    RetryParameters,
    load_queue_yaml,
    parse_queue_yaml,
    queue_differences,
    to_cloud_tasks_queue,
)

ROOT = Path(__file__).resolve().parents[1]
PARENT = "projects/p/locations/us-central1"


def errors_of(text: str) -> list[tuple[int, str]]:
    with pytest.raises(QueueYamlError) as info:
        parse_queue_yaml(text)
    return info.value.errors


def test_implicit_default_queue_and_defaults():
    parsed = parse_queue_yaml("queue:\n- name: mail\n  rate: 120/m\n")
    assert parsed["default"] == QueueDefinition("default", 5.0, "5/s", bucket_size=5, line=0)
    mail = parsed["mail"]
    assert (mail.rate, mail.rate_text, mail.line, mail.bucket_size) == (2.0, "120/m", 2, 5)
    assert mail.retry == RetryParameters(None, None, 0.1, 3600.0, 16)
    assert mail.max_concurrent_requests is None and mail.target is None
    assert parse_queue_yaml("") == {"default": parsed["default"]}


def test_full_definition_and_default_override():
    text = """\
total_storage_limit: 120M
queue:
- name: default
  rate: 1000/h
  bucket_size: 10
- name: reports
  mode: push
  rate: 10/d
  max_concurrent_requests: 3
  target: worker
  retry_parameters:
    task_retry_limit: 5
    task_age_limit: 2d
    min_backoff_seconds: 0.5
    max_backoff_seconds: 60
    max_doublings: 3
"""
    parsed = parse_queue_yaml(text)
    assert parsed["default"].rate == pytest.approx(1000 / 3600)
    assert parsed["default"].line == 3
    reports = parsed["reports"]
    assert reports.rate == pytest.approx(10 / 86400)
    assert reports.retry == RetryParameters(5, 172800.0, 0.5, 60.0, 3)
    assert reports.target == "worker" and reports.max_concurrent_requests == 3


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("queue:\n- name: a\n  rate: 5/x\n", 3, "invalid rate '5/x'"),
        ("queue:\n- name: a\n  rate: -1/s\n", 3, "invalid rate '-1/s'"),
        ("queue:\n- name: a\n  rate: 501/s\n", 3, "exceeds Cloud Tasks' maximum"),
        ("queue:\n- name: a\n  rate: 1/s\n  colour: red\n", 4, "unknown key 'colour'"),
        ("queue:\n- name: a_b\n  rate: 1/s\n", 2, "invalid queue name 'a_b'"),
        ("queue:\n- name: " + "a" * 101 + "\n  rate: 1/s\n", 2, "invalid queue name"),
        ("queue:\n- name: a\n  rate: 1/s\n  mode: pull\n", 4, "use Pub/Sub"),
        ("queue:\n- name: a\n  rate: 1/s\n  bucket_size: -3\n", 4, "bucket_size must be >= 1"),
        ("queue:\n- name: a\n  rate: 1/s\n  bucket_size: 2.5\n", 4, "must be an integer"),
        (
            "queue:\n- name: a\n  rate: 1/s\n  max_concurrent_requests: 0\n",
            4,
            "max_concurrent_requests must be >= 1",
        ),
        (
            "queue:\n- name: a\n  rate: 1/s\n  retry_parameters:\n    task_retry_limit: -1\n",
            5,
            "task_retry_limit must be >= 0",
        ),
        (
            "queue:\n- name: a\n  rate: 1/s\n  retry_parameters:\n    task_age_limit: 3w\n",
            5,
            "invalid task_age_limit '3w'",
        ),
        (
            "queue:\n- name: a\n  rate: 1/s\n  retry_parameters:\n"
            "    min_backoff_seconds: 10\n    max_backoff_seconds: 5\n",
            5,
            "min_backoff_seconds (10) is greater than max_backoff_seconds (5)",
        ),
        (
            "queue:\n- name: a\n  rate: 1/s\n  retry_parameters:\n    max_backoff_seconds: x\n",
            5,
            "max_backoff_seconds must be a number",
        ),
        (
            "queue:\n- name: a\n  rate: 1/s\n- name: a\n  rate: 2/s\n",
            4,
            "duplicate queue name 'a' (first defined on line 2)",
        ),
        ("queue:\n- name: a\n", 2, "has no rate"),
        ("queue:\n- rate: 1/s\n", 2, "has no name"),
        ("- a\n- b\n", 1, "must be a mapping"),
        ("queue:\n- just-a-string\n", 2, "must be a mapping"),
        ("queues:\n- name: a\n", 1, "unknown key 'queues'"),
        ("queue:\n- name: a\n  rate: [1\n", 4, "YAML syntax error"),
        ("queue: {\n", 2, "YAML syntax error"),
    ],
)
def test_each_error_has_its_line(text, line, fragment):
    errors = errors_of(text)
    assert any(err_line == line and fragment in message for err_line, message in errors), errors


def test_all_errors_collected_and_formatted():
    text = "queue:\n- name: bad_name\n  rate: 5/x\n- name: ok\n  rate: 1/s\n  mode: pull\n"
    with pytest.raises(QueueYamlError) as info:
        parse_queue_yaml(text, filename="conf/queue.yaml")
    lines = str(info.value).splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "3", "6"]
    assert all(line.startswith("conf/queue.yaml:") for line in lines)
    assert isinstance(info.value, ValueError)


def test_load_queue_yaml_names_the_file(tmp_path):
    path = tmp_path / "queue.yaml"
    path.write_text("queue:\n- name: x\n  rate: 1/q\n")
    with pytest.raises(QueueYamlError, match=rf"{path}:3: invalid rate"):
        load_queue_yaml(path)


def test_mapping_to_cloud_tasks_queue():
    definition = parse_queue_yaml(
        "queue:\n- name: r\n  rate: 120/m\n  bucket_size: 9\n  max_concurrent_requests: 4\n"
        "  target: worker\n  retry_parameters:\n    task_retry_limit: 5\n"
        "    task_age_limit: 1h\n    min_backoff_seconds: 2\n    max_backoff_seconds: 30\n"
        "    max_doublings: 2\n"
    )["r"]
    queue = to_cloud_tasks_queue(definition, PARENT)
    assert queue.name == f"{PARENT}/queues/r"
    assert queue.rate_limits.max_dispatches_per_second == 2.0
    assert queue.rate_limits.max_burst_size == 9
    assert queue.rate_limits.max_concurrent_dispatches == 4
    retry = queue.retry_config
    assert retry.max_attempts == 6
    assert retry.max_retry_duration == datetime.timedelta(hours=1)
    assert retry.min_backoff == datetime.timedelta(seconds=2)
    assert retry.max_backoff == datetime.timedelta(seconds=30)
    assert retry.max_doublings == 2
    assert queue.app_engine_routing_override.service == "worker"
    unlimited = to_cloud_tasks_queue(parse_queue_yaml("")["default"], PARENT)
    assert unlimited.retry_config.max_attempts == -1
    assert unlimited.rate_limits.max_concurrent_dispatches == 1000
    paused = to_cloud_tasks_queue(QueueDefinition("p", 0.0, "0/s"), PARENT)
    assert paused.state == tasks_v2.Queue.State.PAUSED


def test_queue_differences_ignores_burst_and_reports_fields():
    definition = parse_queue_yaml("queue:\n- name: r\n  rate: 5/s\n")["r"]
    wanted = to_cloud_tasks_queue(definition, PARENT)
    actual = to_cloud_tasks_queue(definition, PARENT)
    actual.rate_limits.max_burst_size = 99
    assert queue_differences(wanted, actual) == []
    actual.rate_limits.max_dispatches_per_second = 7
    actual.retry_config.max_attempts = 100
    actual.retry_config.max_backoff = datetime.timedelta(seconds=10)
    assert queue_differences(wanted, actual) == [
        "rate_limits.max_dispatches_per_second: wanted 5/s, actual 7/s",
        "retry_config.max_attempts: wanted -1, actual 100",
        "retry_config.max_backoff: wanted 3600s, actual 10s",
    ]


# -- CLI ---------------------------------------------------------------------------------

GOOD_YAML = """\
queue:
- name: default
  rate: 5/s
- name: reports
  rate: 2/s
  retry_parameters:
    task_retry_limit: 3
- name: held
  rate: 0/s
"""


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = queues.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def emulator(tmp_path, monkeypatch) -> Iterator[CloudTasksEmulator]:
    empty = tmp_path / "empty.yaml"
    empty.write_text("queue:\n- name: default\n  rate: 1/s\n- name: legacy\n  rate: 1/s\n")
    emu = CloudTasksEmulator(port=0, queue_yaml=empty, project="cli-p", location="us-central1")
    emu.start()
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", f"127.0.0.1:{emu.port}")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "cli-p")
    monkeypatch.delenv("GAE_DEFERRED_LOCATION", raising=False)
    cloud_tasks.reset_client()
    yield emu
    cloud_tasks.reset_client()
    emu.stop()


def test_cli_validate(tmp_path):
    good = tmp_path / "queue.yaml"
    good.write_text(GOOD_YAML)
    code, out, _ = run_cli("validate", str(good))
    assert code == 0 and "3 queues OK" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue:\n- name: x\n  rate: 5/x\n")
    code, _, err = run_cli("validate", str(bad))
    assert code == 1 and f"{bad}:3: invalid rate '5/x'" in err
    code, _, err = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read" in err
    assert run_cli("frobnicate")[0] == 2


def test_cli_diff_sync_dry_run_against_emulator(emulator, tmp_path):
    path = tmp_path / "queue.yaml"
    path.write_text(GOOD_YAML)
    code, out, _ = run_cli("diff", str(path))
    assert code == 1
    assert "+ missing: reports" in out and "+ missing: held" in out
    assert "~ differs: default:" in out
    assert "rate_limits.max_dispatches_per_second: wanted 5/s, actual 1/s" in out
    assert "legacy: not in queue.yaml" in out

    code, out, _ = run_cli("sync", str(path), "--dry-run")
    assert code == 0 and "would create reports" in out and "would update default" in out
    assert run_cli("diff", str(path))[0] == 1  # dry run changed nothing

    code, out, _ = run_cli("sync", str(path))
    assert code == 0 and "synced: 2 created, 1 updated" in out
    code, out, _ = run_cli("diff", str(path))
    assert code == 0, out
    client = tasks_client()
    parent = "projects/cli-p/locations/us-central1/queues"
    assert client.get_queue(name=f"{parent}/reports").retry_config.max_attempts == 4
    assert client.get_queue(name=f"{parent}/held").state == tasks_v2.Queue.State.PAUSED
    assert client.get_queue(name=f"{parent}/legacy")  # never deleted
    assert emulator.rpc_counts["UpdateQueue"] == 1


def test_cli_connection_error_and_missing_project(tmp_path, monkeypatch):
    path = tmp_path / "queue.yaml"
    path.write_text(GOOD_YAML)
    monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", "127.0.0.1:1")
    cloud_tasks.reset_client()
    try:
        code, _, err = run_cli("diff", str(path), "--project", "p", "--timeout", "5")
        assert code == 2 and "Cloud Tasks call failed (127.0.0.1:1)" in err
        monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        code, _, err = run_cli("sync", str(path))
        assert code == 2 and "no project" in err
    finally:
        cloud_tasks.reset_client()


def test_cli_as_module(tmp_path):
    path = tmp_path / "queue.yaml"
    path.write_text("queue:\n- name: x\n  rate: 1/s\n  max_doublings: 2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "gae_deferred.queues", "validate", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"{path}:4: unknown key 'max_doublings'" in proc.stderr


def test_cli_validate_of_an_empty_file_says_it_defines_no_queues(tmp_path):
    empty = tmp_path / "queue.yaml"
    empty.write_text("")
    code, out, _ = run_cli("validate", str(empty))
    assert code == 0
    assert "defines no queues; only App Engine's implicit 'default' queue" in out
    assert "1 queues OK" not in out


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "soon"])
def test_cli_refuses_a_timeout_that_is_not_a_positive_number(tmp_path, timeout, capsys):
    path = tmp_path / "queue.yaml"
    path.write_text(GOOD_YAML)
    code, _, _ = run_cli("diff", str(path), "--project", "p", f"--timeout={timeout}")
    assert code == 2
    assert "--timeout" in capsys.readouterr().err
