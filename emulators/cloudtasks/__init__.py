"""Local Cloud Tasks emulator (gRPC google.cloud.tasks.v2.CloudTasks + HTTP dispatch).

    from gae_deferred.local.cloudtasks import CloudTasksEmulator
    emu = CloudTasksEmulator(port=0, queue_yaml="queue.yaml").start()
    ...
    emu.stop()

Run it standalone with ``python -m gae_deferred.local.cloudtasks --help``; see README.md.
"""

from .server import CloudTasksEmulator

__all__ = ["CloudTasksEmulator"]
