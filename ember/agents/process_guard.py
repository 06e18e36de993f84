"""Bounds on what one sandbox container may use as a whole, so that model-written code cannot exhaust the host:
how many processes it runs at once (a fork bomb would use up the host's process ids) and how much memory they
hold together (each process's address space is limited, but not their sum).

The kernel's own process limit, RLIMIT_NPROC, cannot do it: it never applies to processes whose host uid is
root, which is what bubblewrap's user namespace maps the sandbox's user to when Ember runs as root; and for any
other user it counts every process that user has, not the container's. cgroups (`pids.max`, `memory.max`)
would, but are not writable everywhere. So a thread watches each container, ten times a second, through the
/proc the container mounts (it lists only the container's PID namespace): one directory listing counts its
processes, and their resident sizes (one small read each) bound their memory; only when those add up past the
limit is the proportional size measured (PSS, which splits the pages that processes share after a fork, and
costs a walk of each process's memory map). Past a limit, the container is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

POLL_S = 0.1
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


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
    is still being set up (its root, and so what /proc is there, is the host's until then: a /proc is the
    container's when its process 1 is in `init`'s PID namespace, that is, is `init`)."""
    proc = f"/proc/{init}/root/proc"
    try:
        if os.readlink(f"{proc}/1/ns/pid") != os.readlink(f"/proc/{init}/ns/pid"):
            return []
        return [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:  # not mounted yet, or the container is gone
        return []


def resident_kb(proc: str, pids: list[str]) -> int:
    """The resident sizes of `pids` summed (statm's second field, in pages): cheap, and at least their PSS."""
    pages = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"{proc}/{pid}/statm") as f:  # OSError: it ended
            pages += int(f.read().split()[1])
    return pages * PAGE_KB


def proportional_kb(proc: str, pids: list[str]) -> int:
    """The proportional set sizes of `pids` summed: shared pages count once among their sharers."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"{proc}/{pid}/smaps_rollup") as f:
            total += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    return total


class ProcessGuard:
    """Watches the container led by the bubblewrap process `pid` until `stop()`; kills it (through a pidfd, so a
    reused pid is never hit) when it runs more than `max_processes` processes at once or their memory passes
    `max_memory_mb`, and says which in `notice`."""

    def __init__(self, pid: int, max_processes: int, max_memory_mb: int) -> None:
        self.pid, self.max_processes, self.max_memory_mb = pid, max_processes, max_memory_mb
        self.notice = ""
        self.stopped = threading.Event()
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # it ended, and asyncio's child watcher reaped it, before the guard began
            return
        threading.Thread(target=self.watch, name=f"ember-process-guard-{pid}", daemon=True).start()

    def watch(self) -> None:
        try:
            init = None
            while not self.stopped.wait(POLL_S):
                init = init or child_of(self.pid)
                self.notice = self.breach(init) if init else ""
                if self.notice:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # its namespace dies with it
                    return
        finally:
            os.close(self.pidfd)

    def breach(self, init: int) -> str:
        """What the container is over, if anything."""
        proc, pids = f"/proc/{init}/root/proc", container_pids(init)
        if len(pids) > self.max_processes:
            return f"[killed: the code ran more than {self.max_processes} processes at once]"
        limit_kb = self.max_memory_mb * 1024
        if resident_kb(proc, pids) > limit_kb and proportional_kb(proc, pids) > limit_kb:
            return f"[killed: the code's processes held more than {self.max_memory_mb} MB of memory together]"
        return ""

    def stop(self) -> None:
        self.stopped.set()

    def __enter__(self) -> ProcessGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
