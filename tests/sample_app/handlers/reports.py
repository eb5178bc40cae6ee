"""What the sample app defers: functions of its own module, pickled by reference."""

import os
import pathlib

from gae_deferred import queue_name


def write(directory, label):
    pathlib.Path(directory, label).write_text(f"{queue_name()} {os.getpid()}")
