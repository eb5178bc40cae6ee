"""Local Cloud Tasks emulator (gRPC google.cloud.tasks.v2.CloudTasks + HTTP dispatch).

    from emulators.cloudtasks import CloudTasksEmulator
    emu = CloudTasksEmulator(port=0, queue_yaml="queue.yaml").start()
    ...
    emu.stop()

Run it standalone with ``python -m emulators.cloudtasks --help``; see README.md.
"""

from emulators.cloudtasks.server import CloudTasksEmulator, PortInUseError

__all__ = ["CloudTasksEmulator", "PortInUseError"]
