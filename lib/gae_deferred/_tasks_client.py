"""The process-wide CloudTasksClient, pointed at the local emulator when asked to.

Set ``CLOUD_TASKS_EMULATOR_HOST=127.0.0.1:8123`` to talk to the local emulator over a
plain (insecure) gRPC channel without credentials; otherwise the client uses Google's
endpoint and Application Default Credentials::

    from gae_deferred._tasks_client import tasks_client
    tasks_client().get_queue(name="projects/p/locations/us-central1/queues/default")

The client is cached per process; tests that switch emulators call
``tasks_client.cache_clear()``.
"""

from __future__ import annotations

import functools
import os

import grpc
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

EMULATOR_HOST_ENV = "CLOUD_TASKS_EMULATOR_HOST"


@functools.lru_cache(maxsize=1)
def tasks_client() -> tasks_v2.CloudTasksClient:
    """A CloudTasksClient for this process (emulator-aware, see module docstring)."""
    host = os.environ.get(EMULATOR_HOST_ENV)
    if host:
        channel = grpc.insecure_channel(host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()
