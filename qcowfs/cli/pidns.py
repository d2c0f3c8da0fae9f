"""Containers: whether a qcowfs daemon's exit ends the PID namespace it runs in.

`qcowfs umount` waits for the daemon's clean shutdown; in a container whose PID namespace ends
with the daemon, the kernel kills every process left in it, the waiting command too.
"""

from __future__ import annotations

import contextlib
import os


def exit_ends_pid_namespace(pid: int) -> bool:
    """Whether the daemon's exit ends our PID namespace, so that the kernel kills this command
    too (`docker exec ... qcowfs umount` exited 137): the daemon is the namespace's init (pid 1),
    or pid 1 has no other child than the daemon. The second is what a container's minimal init
    looks like (docker's and podman's --init: tini, catatonit; dumb-init; a shell running the
    daemon), and each of those exits when that one child does. An init with more children
    (systemd, or a container's main process beside a daemon started later) outlives the daemon,
    and then umount waits as usual. The cost of a wrong yes is only not waiting."""
    if pid == 1:
        return True
    try:
        return _parent(pid) == 1 and _children_of_init() == {pid}
    except (OSError, ValueError, IndexError):
        return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces


def _children_of_init() -> set[int]:
    """The pids whose parent is pid 1 (/proc/1/task/*/children, else a walk of /proc)."""
    children: set[int] = set()
    try:
        for task in os.listdir("/proc/1/task"):
            with open(f"/proc/1/task/{task}/children") as f:
                children.update(int(c) for c in f.read().split())
        return children
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if _parent(int(entry)) == 1:
                        children.add(int(entry))
        return children
