"""Whether the process a record names is still running: a pid, when it started, and where it ran.

A pid alone can be reused, and two containers on one host share its hostname and may both have pid 1, so
a record names the process by its host, pid, start time and PID namespace (with the boot), and only a
reader on the same host, in the same namespace of the same boot, can tell it has gone. Used by a part's
lease (a dead holder is taken over at once instead of after the lease time) and by a job's heartbeat
(a rank that dies on this host stops the job at once instead of after `--peer-timeout`).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional


def this_process() -> dict:
    """The record of this process: what `process_gone` compares."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start(os.getpid()),
            "pid_namespace": pid_namespace()}


def process_gone(record: Mapping) -> bool:
    """The process `record` names (`this_process` where it ran) has exited, as far as this process can
    tell: only from the same host and PID namespace of the same boot (elsewhere it says False). A zombie,
    exited but not yet reaped by its parent, has gone."""
    namespace = pid_namespace()
    if namespace is None or record.get("pid_namespace") != namespace or record.get("host") != socket.gethostname():
        return False
    try:
        pid = int(record.get("pid"))
    except (TypeError, ValueError):
        return False
    stat = _stat(pid)
    return stat is None or stat[0] in "ZX" or stat[1] != record.get("pid_started")


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started (clock ticks after boot, from /proc), or None: no such process, or no /proc."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def pid_namespace() -> Optional[str]:
    """This process's PID namespace and boot (two containers on one host share a hostname and may
    both be pid 1: only the same namespace on the same boot makes a pid comparable), or None."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time) of process `pid` from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()   # after the command name, which may hold spaces
    try:
        return fields[0], int(fields[19])          # fields 3 and 22 of proc(5)
    except (ValueError, IndexError):
        return None
