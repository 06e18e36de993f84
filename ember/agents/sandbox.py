"""Sandboxed code execution with bubblewrap: what an agent's code may touch is what the sandbox lends it.

Each run is a fresh bubblewrap container: new user, PID, network, IPC and UTS namespaces (no network at all
unless asked for), every capability dropped, an unprivileged uid, the system's /usr and the Python
interpreter read-only, a private /tmp, one host folder, the workspace, read-write at /workspace, which keeps
files from one run to the next, and any folders lent read-only (e.g. skills, at /skills/<name>). Limits: wall
time (the whole container is killed), address space, file size, CPU time, how many processes run at once and
how much memory they hold together (the container is killed past either: `process_guard.py`), and how much
output is kept (the rest is read and dropped, so a flood cannot fill memory). `python_session()` keeps one
Python interpreter in such a container across runs (`python_session.py`), which is what the run_python tool
uses by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.agents.process_guard import ProcessGuard
from ember.agents.tools import Tool, ToolResult, function_tool

if TYPE_CHECKING:
    from ember.agents.python_session import PythonSession

WORKSPACE = "/workspace"


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 30.0
    memory_mb: int = 1024  # address space of each process
    file_size_mb: int = 64  # largest file a run may write
    max_output_bytes: int = 32_000  # of stdout and of stderr, each
    max_processes: int = 256  # at once, in one container
    max_total_memory_mb: int = 4096  # all of one container's processes together (their PSS)


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None when the run was killed at its time limit
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False
    notice: str = ""  # how a run ended beyond its exit code (a session's restart, a time-out, too many processes)

    def as_text(self) -> str:
        """The result as a model reads it."""
        parts = [self.notice] if self.notice else []
        if self.timed_out:
            if not self.notice:
                parts.append("[killed: over the time limit]")
        elif self.exit_code:
            parts.append(f"[exit code {self.exit_code}]")
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        if self.truncated:
            parts.append("[output truncated]")
        return "\n".join(parts) if parts else "[no output]"


def bubblewrap_path() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(
            "the sandbox needs bubblewrap: install it (Debian/Ubuntu: apt-get install bubblewrap; `make install` "
            "does so when run as root)"
        )
    return path


class CappedOutput:
    """One output stream read to its end, keeping its first `limit` bytes: a flood costs no memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept, self.truncated = limit, bytearray(), False

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            room = self.limit - len(self.kept)
            self.kept += chunk[: max(room, 0)]
            self.truncated = self.truncated or len(chunk) > room

    def text(self) -> str:
        return self.kept.decode(errors="replace")


class Sandbox:
    """Runs code in throw-away containers that share one workspace folder. Use as a context manager, or call
    close(): a workspace the sandbox made itself is deleted then."""

    def __init__(
        self,
        workspace: str | Path | None = None,
        limits: SandboxLimits | None = None,
        network: bool = False,
        read_only: Mapping[str | Path, str] | None = None,
        python_env: str | Path | None = None,
    ) -> None:
        """`read_only` lends host folders read-only: {host path: absolute path inside the sandbox}.
        `python_env`, a virtual environment, is lent read-only at its own path and its Python is the sandbox's
        `python3`, so that sandboxed code can import its packages (numpy, pandas, ...)."""
        self.bwrap = bubblewrap_path()
        self.python_env = None if python_env is None else Path(python_env).absolute()
        prefixes = [os.path.realpath(sys.base_prefix)]
        if self.python_env is not None:
            prefixes.append(virtual_env_base(self.python_env))
        self.prefixes = [p for p in dict.fromkeys(prefixes) if not p.startswith("/usr/")]  # /usr is lent anyway
        self.limits = limits or SandboxLimits()
        self.network = network
        self.read_only = {Path(host).resolve(): inside for host, inside in (read_only or {}).items()}
        for host, inside in self.read_only.items():
            if not host.is_dir():
                raise ValueError(f"cannot lend {host} to the sandbox: it is not a folder")
            if not inside.startswith("/") or inside.rstrip("/") in ("", WORKSPACE, "/tmp", "/usr", "/proc", "/dev"):
                raise ValueError(f"cannot lend a folder at {inside!r}: give an absolute path of its own")
        self.owns_workspace = workspace is None
        self.workspace = Path(tempfile.mkdtemp(prefix="ember-sandbox-") if workspace is None else workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        if self.python_env is None:
            self.python = os.path.realpath(os.path.join(sys.base_prefix, "bin", "python3"))
        else:
            self.python = str(self.python_env / "bin" / "python3")  # not resolved: its pyvenv.cfg makes it the env
        self.session: PythonSession | None = None
        self.check()

    def check(self) -> None:
        """Start one empty container, so that a host where bubblewrap cannot work says so now, clearly."""
        probe = subprocess.run([*self.bubblewrap_args(), "/bin/true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            self.close()
            raise SandboxUnavailable(f"bubblewrap could not start a sandbox here: {probe.stderr.strip()}")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.owns_workspace:
            shutil.rmtree(self.workspace, ignore_errors=True)

    def bubblewrap_args(self, writable: Mapping[Path, str] | None = None) -> list[str]:
        """The container's command line, up to the program to run; `writable` adds host folders lent read-write
        at the given paths (a Python session's output folder)."""
        args = [self.bwrap, "--unshare-all", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
        args += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        if self.network:
            args.append("--share-net")
        args += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        args += ["--ro-bind-try", "/etc/alternatives", "/etc/alternatives"]
        if self.network:
            args += ["--ro-bind-try", "/etc/resolv.conf", "/etc/resolv.conf"]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for prefix in self.prefixes:  # an interpreter outside /usr (pyenv, a conda env): lent read-only
            args += ["--ro-bind", prefix, prefix]
        path = "/usr/local/bin:/usr/bin:/bin"
        if self.python_env is not None:  # after /tmp's mount, which would hide an environment under /tmp
            args += ["--ro-bind", str(self.python_env), str(self.python_env)]
            path = f"{self.python_env}/bin:{path}"
        args += ["--bind", str(self.workspace.resolve()), WORKSPACE, "--chdir", WORKSPACE]
        for host, inside in self.read_only.items():
            args += ["--ro-bind", str(host), inside]
        for host, inside in (writable or {}).items():
            args += ["--bind", str(host), inside]
        args += ["--clearenv", "--setenv", "PATH", path, "--setenv", "HOME", WORKSPACE]
        args += ["--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--"]
        return args

    def set_limits(self, cpu: bool = True) -> None:
        """Runs in the child before exec: the limits hold for every process of the container. `cpu`: CPU time
        as long as the time limit (a Python session, which outlives many runs, has none)."""
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (self.limits.memory_mb * mb,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limits.file_size_mb * mb,) * 2)
        if cpu:
            seconds = int(self.limits.timeout_s) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    async def run(self, argv: list[str], stdin: str = "") -> RunResult:
        """Run argv inside a fresh container, with `stdin` as its standard input."""
        process = await asyncio.create_subprocess_exec(
            *self.bubblewrap_args(),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self.set_limits,
            start_new_session=True,
        )
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        with ProcessGuard(process.pid, self.limits.max_processes, self.limits.max_total_memory_mb) as guard:
            out, err = CappedOutput(self.limits.max_output_bytes), CappedOutput(self.limits.max_output_bytes)
            readers = asyncio.gather(out.drain(process.stdout), err.drain(process.stderr))
            timed_out = False
            try:
                process.stdin.write(stdin.encode())
                await process.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the program exited without reading its input
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), self.limits.timeout_s)
            except TimeoutError:
                timed_out = True
            finally:
                if process.returncode is None:  # over time, or cancelled: leave no container behind
                    process.kill()  # bwrap's death takes the container's PID namespace with it (--die-with-parent)
            with contextlib.suppress(TimeoutError):  # bounded, should anything outlive the container and hold its pipes
                await asyncio.wait_for(asyncio.gather(process.wait(), readers), 5)
            return RunResult(
                None if timed_out else process.returncode,
                out.text(),
                err.text(),
                timed_out,
                out.truncated or err.truncated,
                guard.notice,
            )

    async def run_python(self, code: str) -> RunResult:
        """Run a Python program in isolated mode (the standard library, and `python_env`'s packages if given)."""
        return await self.run([self.python, "-I", "-"], stdin=code)

    async def run_shell(self, command: str) -> RunResult:
        return await self.run(["/bin/sh", "-c", command])

    def python_session(self) -> PythonSession:
        """The sandbox's persistent Python session (started on its first run, stopped by close())."""
        from ember.agents.python_session import PythonSession  # it builds on this module

        if self.session is None:
            self.session = PythonSession(self)
        return self.session

    def tools(self, python_session: bool = True) -> list[Tool]:
        """The sandbox as two agent tools, run_python and run_shell. `python_session`: run_python runs in the
        sandbox's persistent Python session (variables carry over); otherwise each call is a fresh program."""

        async def run_python(code: str) -> ToolResult:
            if python_session:
                return tool_result(await self.python_session().run_async(code))
            return tool_result(await self.run_python(code))

        async def run_shell(command: str) -> ToolResult:
            return tool_result(await self.run_shell(command))

        packages = "standard library only" if self.python_env is None else "standard library and installed packages"
        description = RUN_PYTHON_SESSION_DESCRIPTION if python_session else RUN_PYTHON_DESCRIPTION
        return [
            function_tool(run_python, description=description.format(packages=packages)),
            function_tool(run_shell, description=RUN_SHELL_DESCRIPTION),
        ]


RUN_PYTHON_DESCRIPTION = (
    "Run a Python 3 program in a sandbox ({packages}, no network; files persist in the working directory "
    "/workspace) and return what it printed. Use print() to show results."
)
RUN_PYTHON_SESSION_DESCRIPTION = (
    "Run Python 3 code in a persistent sandboxed session ({packages}, no network), like a notebook cell: "
    "variables, imports and functions carry over to the next call, and the value of a last bare expression is "
    "shown; print() shows anything else. Files persist in the working directory /workspace."
)
RUN_SHELL_DESCRIPTION = (
    "Run a shell command in a sandbox (no network; files persist in the working directory /workspace) and "
    "return its output."
)


def virtual_env_base(env: Path) -> str:
    """The prefix of the interpreter a virtual environment was made from (its pyvenv.cfg's `home` is its bin)."""
    config = env / "pyvenv.cfg"
    if not config.is_file() or not (env / "bin" / "python3").exists():
        raise ValueError(f"{env} is not a virtual environment (no pyvenv.cfg and bin/python3)")
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return os.path.realpath(os.path.dirname(value.strip().rstrip("/")))
    raise ValueError(f"{config} does not say which Python the environment was made from (no `home`)")


def tool_result(result: RunResult) -> ToolResult:
    return ToolResult(result.as_text(), is_error=result.timed_out or result.exit_code != 0)
