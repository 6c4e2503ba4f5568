"""Which process owns a run, and whether it is still alive.

A run directory says `running` from the moment it is created. A process stopped by an exception records
`failed` or `interrupted` itself, but one killed by `kill -9` or the out-of-memory killer records nothing: its
manifest would say `running` forever. So the manifest also records the owner (pid, host, and the process's
start time), and a reader on the same host asks the kernel whether that process still exists.

The start time matters because pids are reused: a pid that exists now but started at another time is another
process, and the run's owner is gone. On Linux it is the process's start in clock ticks since boot
(/proc/PID/stat, field 22) with the boot id, so a reboot cannot make an old pid look alive. Elsewhere only the
pid is checked. On another host nothing can be checked, and the run keeps the status it recorded.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (the state) on, or None where there is no such file (not Linux, no pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    return stat[stat.rindex(")") + 2:].split()


def process_start(pid: int) -> str | None:
    """An identity for when process `pid` started (Linux), or None where that cannot be read."""
    fields = _stat(pid)
    return f"{_boot_id()}:{fields[19]}" if fields else None  # field 22 is the 20th from field 3


def this_process() -> dict:
    """The owner record of the calling process: pid, host and start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start(os.getpid())}


def owner_state(owner: dict | None) -> str:
    """alive, dead, or unknown (no record, or recorded on another host)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return "unknown"
    if owner.get("host") != socket.gethostname():
        return "unknown"
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return "unknown"
    fields = _stat(pid)
    if fields is None:
        return "alive"  # not Linux: the pid exists, and that is all that can be known
    if fields[0] in ("Z", "X"):
        return "dead"  # killed, and only waiting for its parent to collect the exit status
    recorded = owner.get("started")
    if recorded is not None and f"{_boot_id()}:{fields[19]}" != recorded:
        return "dead"  # the pid was reused by a later process
    return "alive"
