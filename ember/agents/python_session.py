"""A Python interpreter that lives in one sandbox container across runs, as a notebook's kernel does: what one
run defines (variables, imports, functions, a loaded data frame) the next run can use.

The container is the sandbox's (same namespaces, mounts and limits); inside it runs `python_session_driver`.
Each run is bounded twice: at the time limit the driver interrupts the code (the session keeps its variables);
a few seconds later, if the code does not give way (a long call in C), the whole container is killed and the
next run starts a new session. The code's output goes through files of a host folder lent to the container
only, so that what was printed before a crash is still read. Runs are thread-safe and independent of any
event loop: the blocking exchange runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.agents import python_session_driver
from ember.agents.process_guard import ProcessGuard
from ember.agents.sandbox import RunResult

if TYPE_CHECKING:
    from ember.agents.sandbox import Sandbox

EXCHANGE = "/run/ember-session"  # where the container sees the host folder of the output files
DRIVER_SOURCE = Path(python_session_driver.__file__).read_text()
GRACE_S = 5.0  # after the time limit, how long the code has to give way before the container is killed


class PythonSession:
    """One long-lived Python process in `sandbox`, started on the first run and again after it died."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.process: subprocess.Popen[bytes] | None = None
        self.guard: ProcessGuard | None = None
        self.exchange: Path | None = None
        self.lock = threading.Lock()  # one run at a time: the session has one namespace

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the session (its variables are gone) and remove its output folder."""
        self.kill()
        with self.lock:
            self._reap()
            self.process = None

    def kill(self) -> None:
        """Kill the container now, even while a run is waiting on it (that run then reports the session's end)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # bubblewrap leads its own process group
                os.killpg(self.process.pid, signal.SIGKILL)

    async def run_async(self, code: str) -> RunResult:
        """`run` in a worker thread; a cancelled run kills the session (no code is left running unseen)."""
        try:
            return await asyncio.shield(asyncio.to_thread(self.run, code))
        except asyncio.CancelledError:
            self.kill()
            raise

    def run(self, code: str) -> RunResult:
        """Run `code` in the session and wait for it (at most the sandbox's time limit, plus a grace period)."""
        with self.lock:
            notices = []
            if self.process is None or self.process.poll() is not None:
                if self.process is not None:  # it died between runs (its processes' own doing, or the guard's)
                    notices.append(self.guard.notice if self.guard else "")
                    notices.append("[a new Python session: the variables of the one before are gone]")
                self._start()
            assert self.process is not None and self.process.stdin is not None and self.exchange is not None
            timeout = self.sandbox.limits.timeout_s
            try:
                self.process.stdin.write((json.dumps({"code": code, "timeout": timeout}) + "\n").encode())
                self.process.stdin.flush()
            except OSError:
                pass  # the session died as it started: the reply below reads its end
            reply = self._read_reply(time.monotonic() + timeout + GRACE_S)
            limit = self.sandbox.limits.max_output_bytes
            (stdout, cut_out), (stderr, cut_err) = (read_capped(self.exchange / n, limit) for n in ("stdout", "stderr"))
            exit_code: int | None
            if reply is not None:
                exit_code = reply["exit_code"]
                if reply["status"] == "interrupted":
                    exit_code = None
                    notices.append(f"[interrupted: over the time limit of {timeout:g} s; the session keeps its state]")
            elif self.process.poll() is None:  # no reply in time, still running: a call that ignores the interrupt
                self.kill()
                self.process.wait()
                exit_code = None
                notices.append(
                    f"[killed: over the time limit of {timeout:g} s; the Python session was stopped and its variables "
                    "are gone (the next run starts a new one)]"
                )
            else:
                exit_code = self.process.wait() or 1
                assert self.guard is not None
                notices.append(self.guard.notice)
                notices.append("[the Python session ended and its variables are gone; the next run starts a new one]")
                if complaint := read_capped(self.exchange / "bubblewrap.log", 2000)[0].strip():
                    notices.append(complaint)
            return RunResult(
                exit_code, stdout, stderr, timed_out=exit_code is None, truncated=cut_out or cut_err,
                notice="\n".join(filter(None, notices)),
            )  # fmt: skip

    def _start(self) -> None:
        self._reap()
        self.exchange = Path(tempfile.mkdtemp(prefix="ember-python-session-"))
        argv = [*self.sandbox.bubblewrap_args(writable={self.exchange: EXCHANGE}), self.sandbox.python, "-I"]
        with open(self.exchange / "bubblewrap.log", "wb") as log:  # bubblewrap's own complaints, if any
            self.process = subprocess.Popen(
                [*argv, "-c", DRIVER_SOURCE, EXCHANGE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=lambda: self.sandbox.set_limits(cpu=False),  # each run has its time limit instead
                start_new_session=True,
            )
        limits = self.sandbox.limits
        self.guard = ProcessGuard(self.process.pid, limits.max_processes, limits.max_total_memory_mb)

    def _reap(self) -> None:
        """Wait for a killed or ended container and remove its output folder."""
        if self.guard is not None:
            self.guard.stop()
        if self.process is not None:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self.exchange is not None:
            shutil.rmtree(self.exchange, ignore_errors=True)
            self.exchange = None

    def _read_reply(self, deadline: float) -> dict[str, Any] | None:
        """The driver's reply line, or None when the session ended or the deadline passed without one."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        received = b""
        while not received.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # the driver ended; bubblewrap exits just after it, and then poll() tells the caller so
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(GRACE_S)
                return None
            received += chunk
        return json.loads(received)


def read_capped(path: Path, limit: int) -> tuple[str, bool]:
    """The first `limit` bytes of a file, as text, and whether there was more."""
    try:
        with open(path, "rb") as f:
            kept = f.read(limit + 1)
    except FileNotFoundError:  # the session died before it made its files
        return "", False
    return kept[:limit].decode(errors="replace"), len(kept) > limit
