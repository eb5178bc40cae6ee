"""Settings from the environment: local mode is explicit and never on App Engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gae_deferred
from gae_deferred import ConfigurationError
from tests.fixtures import ROOT


def test_an_emulator_alone_does_not_turn_local_mode_on(monkeypatch):
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", "127.0.0.1:8081")
    monkeypatch.delenv("GAE_DEFERRED_LOCAL", raising=False)
    assert gae_deferred.settings().local_mode is False
    gae_deferred.reset_clients()
    monkeypatch.setenv("GAE_DEFERRED_LOCAL", "1")
    assert gae_deferred.settings().local_mode is True


def test_local_mode_is_refused_on_app_engine(monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_LOCAL", "1")
    monkeypatch.setenv("GAE_ENV", "standard")
    with pytest.raises(ConfigurationError, match="refused where GAE_ENV is set"):
        gae_deferred.settings()
    monkeypatch.delenv("GAE_DEFERRED_LOCAL")
    with pytest.raises(ConfigurationError, match="refused where GAE_ENV is set"):
        gae_deferred.configure(local_mode=True)


def test_local_flag_must_be_1_or_0(monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_LOCAL", "yes")
    with pytest.raises(ConfigurationError, match="must be 1 or 0"):
        gae_deferred.settings()


def test_the_app_refuses_to_start_in_local_mode_on_app_engine():
    env = {**os.environ, "GAE_DEFERRED_LOCAL": "1", "GAE_ENV": "standard"}
    result = subprocess.run(
        [sys.executable, "-c", "import main"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "refused where GAE_ENV is set" in result.stderr


def test_queue_yaml_beside_the_app_is_found(monkeypatch, tmp_path):
    monkeypatch.delenv("GAE_DEFERRED_QUEUE_YAML", raising=False)
    monkeypatch.chdir(tmp_path)
    assert gae_deferred.settings().queue_yaml is None
    (tmp_path / "queue.yaml").write_text("queue:\n- name: default\n  rate: 1/s\n")
    gae_deferred.reset_clients()
    assert gae_deferred.settings().queue_yaml == str(tmp_path / "queue.yaml")
    monkeypatch.setenv("GAE_DEFERRED_QUEUE_YAML", "/elsewhere/queue.yaml")
    gae_deferred.reset_clients()
    assert gae_deferred.settings().queue_yaml == "/elsewhere/queue.yaml"
