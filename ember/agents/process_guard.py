"""A bound on how many processes one sandbox container may run, so that a fork bomb in model-written code cannot
use up the host's process ids and memory.

The kernel's own limit, RLIMIT_NPROC, cannot do it: it never applies to processes whose host uid is root, which
is what bubblewrap's user namespace maps the sandbox's user to when Ember runs as root; and for any other user
it counts every process that user has, not the container's. cgroups (`pids.max`) would, but are not writable
everywhere. So a thread watches each container: ten times a second it reads the host's task count from
/proc/loadavg (one small read); only when that has grown by more than the limit since the last look does it
count the container's processes, by listing the container's own /proc (it holds only the container's PID
namespace), and it kills the container when they are over the limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

POLL_S = 0.1


def host_task_count() -> int:
    """Every task (process or thread) on the host: /proc/loadavg's fourth field is running/total."""
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[1])


def child_of(pid: int) -> int | None:
    """A process whose parent is `pid` (bubblewrap's first child: the container's init), from one pass over /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # ended while we looked
            continue
        if int(stat[stat.rindex(b")") + 2 :].split(maxsplit=2)[1]) == pid:  # after "pid (comm) state"
            return int(entry.name)
    return None


def count_in_container(init: int) -> int:
    """Processes in the PID namespace of `init`: the entries of the /proc that its container mounts."""
    try:
        return sum(1 for name in os.listdir(f"/proc/{init}/root/proc") if name.isdigit())
    except OSError:  # the container is gone
        return 0


class ProcessGuard:
    """Watches the container led by the bubblewrap process `pid` until `stop()`; kills it (through a pidfd, so a
    reused pid is never hit) when it runs more than `limit` processes, and says so in `tripped`."""

    def __init__(self, pid: int, limit: int) -> None:
        self.pid, self.limit = pid, limit
        self.tripped = False
        self.pidfd = os.pidfd_open(pid)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, name=f"ember-process-guard-{pid}", daemon=True)
        self.thread.start()

    def watch(self) -> None:
        try:
            others = host_task_count()  # the host's tasks that are not the container's
            init = None
            while not self.stopped.wait(POLL_S):
                total = host_task_count()
                if total <= others + self.limit:
                    continue
                init = init or child_of(self.pid)
                inside = count_in_container(init) if init else 0
                if inside > self.limit:
                    self.tripped = True
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # its namespace dies with it
                    return
                others = total - inside  # the host grew, not the container: look again past that
        finally:
            os.close(self.pidfd)

    def stop(self) -> None:
        self.stopped.set()

    @property
    def notice(self) -> str:
        return f"[killed: the code ran more than {self.limit} processes at once]" if self.tripped else ""
