"""Start `ember serve` in a subprocess on a free 127.0.0.1 port, wait until it is healthy, and stop it: for
`ember agent` without --url, and for the tests that drive a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as a process manager would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@contextmanager
def running_server(*args: str, startup_timeout: float = 120, log: TextIO | None = None) -> Iterator[ServerProcess]:
    """The server's output goes to `log` (a file) or, by default, to a pipe that is read only if it exits early."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "EMBER_API_KEY": ""},
    )
    server = ServerProcess(process, port)

    def output() -> str:
        return process.stdout.read() if process.stdout else Path(log.name).read_text()[-2000:] if log else ""

    try:
        wait_until_healthy(process, server.url, startup_timeout, output)
        yield server
    finally:
        server.stop()


def wait_until_healthy(
    process: subprocess.Popen, url: str, timeout: float, output: Callable[[], str] = lambda: ""
) -> None:
    """Poll `url`/health until it answers 200, at most `timeout` seconds; RuntimeError (with the server's
    `output`) if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early: {output()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become healthy in time")
        time.sleep(0.2)
