"""The watchdog of a private local Ray cluster: it outlives the driver to stop what the driver started.

Started by :func:`genpi.ray_runtime.connect` in its own session, it blocks on a pipe whose only
writer is the driver. The pipe ends when the driver ends, however it ends (``disconnect``, an
exception, SIGTERM, SIGKILL); then it stops every process of that cluster and removes the
cluster's temp folder when the driver created it. A cluster's processes are found by a random
marker the driver put in their environment (Ray renames some daemons, so command lines do not
tell), never by a name pattern: processes of other clusters on the machine are left alone.

Run as ``python genpi/reaper.py MARKER DRIVER_PID TEMP_DIR REMOVE``; it imports nothing of genpi.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

MARKER_VAR = "GENPI_RAY_CLUSTER"
_GRACE_S = 3.0


def marked_pids(marker: str, skip: set[int]) -> list[int]:
    """Processes of this user whose environment carries ``MARKER_VAR=marker``."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone, or another user's
            continue
    return pids


def stop_cluster(marker: str, skip: set[int]) -> None:
    """SIGTERM every marked process, then SIGKILL what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(marker, skip)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + _GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = marked_pids(marker, skip)
        if not pids:
            return


def main(argv: list[str]) -> None:
    marker, driver, temp_dir, remove = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not stop the watch
    sys.stdin.buffer.read()  # returns at EOF: the driver closed the pipe or died
    skip = {os.getpid(), int(driver)}
    stop_cluster(marker, skip)
    if remove == "1":
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
