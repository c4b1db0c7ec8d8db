"""Where the CPU goes while a command runs: CPU seconds by process, the machine's own included.

    .venv/bin/python bench/cpu_share.py -- make run ARGS="--store.url fresh"

Every process on the machine is sampled from ``/proc`` every ``--every`` seconds (user + system
time; a process that exits between two samples loses at most that interval). The CPU a process
used since the sample before goes to its name now: a Ray worker's is its process title, the task
or actor it is running (``ray::IDLE`` between tasks). The table groups by name; the last line is
one JSON object: wall seconds, the machine's busy and idle CPU seconds (``/proc/stat``), and CPU
seconds per name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[float, float]:
    """Busy and idle CPU seconds of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK, idle / _TICK


def _group(pid: str) -> str:
    """A process's name: a Ray worker's task or actor, a Python script, else its command."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    if raw.startswith("ray::"):
        return raw.split()[0].split(".")[0]
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    parts = raw.split()
    script = next((Path(p).name for p in parts[1:3] if p.endswith(".py")), None)
    if "ray" in raw and script:
        return f"ray {script}"
    return script or comm or "?"


def _sample(last: dict[str, float], groups: Counter[str] | None) -> None:
    """Each process's CPU seconds since the previous sample, added to its current name in
    ``groups`` (None: only note where every process stands)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / _TICK
            if groups is not None:
                before = last.get(pid, 0.0)
                groups[_group(pid)] += seconds - (before if before <= seconds else 0.0)  # a reused pid starts at 0
            last[pid] = seconds
        except (OSError, IndexError, ValueError):
            continue  # exited while being read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--top", type=int, default=15, help="groups printed in the table")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    last: dict[str, float] = {}
    groups: Counter[str] = Counter()
    _sample(last, None)
    busy0, idle0 = _machine()
    started = time.monotonic()
    process = subprocess.Popen(command)
    while process.poll() is None:
        _sample(last, groups)
        time.sleep(args.every)
    _sample(last, groups)
    wall = time.monotonic() - started
    busy, idle = (a - b for a, b in zip(_machine(), (busy0, idle0)))
    print(f"\n{'CPU s':>8}  {'share':>6}  process")
    for name, seconds in groups.most_common(args.top):
        print(f"{seconds:8.1f}  {seconds / max(busy, 1e-9):6.1%}  {name}")
    print(f"busy {busy:.0f} s, idle {idle:.0f} s of {wall:.0f} s wall; exit {process.returncode}")
    figures = {name: round(s, 1) for name, s in groups.most_common() if s >= 0.5}
    summary = {"bench": "cpu_share", "wall_s": round(wall, 1), "busy_s": round(busy, 1), "idle_s": round(idle, 1)}
    print(json.dumps({**summary, "exit": process.returncode, "cpu_s": figures}))


if __name__ == "__main__":
    main()
