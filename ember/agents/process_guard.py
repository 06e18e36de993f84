"""Bounds on what one sandbox container may use as a whole, so that model-written code cannot exhaust the host:
how many processes it runs at once (a fork bomb would use up the host's process ids) and how much memory they
hold together (each process's address space is limited, but not their sum).

The kernel's own process limit, RLIMIT_NPROC, cannot do it: it never applies to processes whose host uid is
root, which is what bubblewrap's user namespace maps the sandbox's user to when Ember runs as root; and for any
other user it counts every process that user has, not the container's. cgroups (`pids.max`, `memory.max`)
would, but are not writable everywhere. So a thread watches each container. Ten times a second it reads two
host figures, the task count (/proc/loadavg) and the memory in use (/proc/meminfo); only when one has grown by
more than its limit since the last look does it measure the container itself, through the container's own
/proc (it lists only the container's PID namespace): its processes, or their proportional memory (PSS, which
splits pages shared after a fork). Over a limit, the container is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

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


def container_pids(init: int) -> list[str]:
    """The processes in the PID namespace of `init`, from the /proc its container mounts; none while the container
    is still being set up (its root, and so its /proc, is the host's until then: a /proc that shows this process,
    which lives outside the container, is the host's)."""
    proc = f"/proc/{init}/root/proc"
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:  # the container is gone
        return []
    return [] if str(os.getpid()) in pids else pids


def count_in_container(init: int) -> int:
    return len(container_pids(init))


def host_memory_used_kb() -> int:
    """Memory in use on the host: total less available (/proc/meminfo)."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    return fields["MemTotal"] - fields["MemAvailable"]


def container_memory_kb(init: int) -> int:
    """The proportional set size of the processes in the PID namespace of `init`, summed."""
    total = 0
    for pid in container_pids(init):
        with contextlib.suppress(OSError), open(f"/proc/{init}/root/proc/{pid}/smaps_rollup") as f:  # ended
            total += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    return total


@dataclass
class Bound:
    """One watched quantity: the host's reading (cheap), the container's own (measured only when the host's has
    grown past `others + limit`), the limit, and what the run is told when the container goes past it."""

    host: Callable[[], int]
    inside: Callable[[int], int]
    limit: int
    notice: str
    others: int = 0  # the host's reading less the container's, at the last look

    def over(self, init: Callable[[], int | None]) -> bool:
        reading = self.host()
        if reading <= self.others + self.limit:
            return False
        container = init()
        used = self.inside(container) if container else 0
        self.others = reading - used  # the host grew, not the container: look again past that
        return used > self.limit


class ProcessGuard:
    """Watches the container led by the bubblewrap process `pid` until `stop()`; kills it (through a pidfd, so a
    reused pid is never hit) when it runs more than `max_processes` processes at once or their memory passes
    `max_memory_mb`, and says which in `notice`."""

    def __init__(self, pid: int, max_processes: int, max_memory_mb: int) -> None:
        self.pid = pid
        self.bounds = [
            Bound(host_task_count, count_in_container, max_processes,
                  f"[killed: the code ran more than {max_processes} processes at once]"),
            Bound(host_memory_used_kb, container_memory_kb, max_memory_mb * 1024,
                  f"[killed: the code's processes held more than {max_memory_mb} MB of memory together]"),
        ]  # fmt: skip
        for bound in self.bounds:
            bound.others = bound.host()
        self.notice = ""
        self.init: int | None = None
        self.pidfd = os.pidfd_open(pid)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, name=f"ember-process-guard-{pid}", daemon=True)
        self.thread.start()

    def container_init(self) -> int | None:
        self.init = self.init or child_of(self.pid)
        return self.init

    def watch(self) -> None:
        try:
            while not self.stopped.wait(POLL_S):
                for bound in self.bounds:
                    if bound.over(self.container_init):
                        self.notice = bound.notice
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # its namespace dies with it
                        return
        finally:
            os.close(self.pidfd)

    def stop(self) -> None:
        self.stopped.set()
