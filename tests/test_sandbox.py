"""The real bubblewrap sandbox: what code inside it can and cannot reach, and that every limit holds."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ember.agents.sandbox import RunResult, Sandbox, SandboxLimits

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (`make install` installs it as root)"
)
ROOT = Path(__file__).resolve().parents[1]


def run(coro: object) -> RunResult:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_python_and_shell_run_unprivileged_with_their_output_and_exit_code(tmp_path: Path) -> None:
    with Sandbox(tmp_path) as sandbox:
        assert run(sandbox.run_python("print(6 * 7)")) == RunResult(0, "42\n", "")
        failed = run(sandbox.run_python("import sys\nprint('half')\nsys.exit('bad input')"))
        assert (failed.exit_code, failed.stdout, failed.stderr) == (1, "half\n", "bad input\n")
        assert failed.as_text() == "[exit code 1]\nhalf\n[stderr]\nbad input"
        assert run(sandbox.run_shell("id -u; id -g; hostname; pwd")).stdout == "65534\n65534\nsandbox\n/workspace\n"


def test_the_workspace_persists_between_runs_and_is_the_only_host_folder_it_can_write(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("from the host")
    with Sandbox(tmp_path) as sandbox:
        assert run(sandbox.run_shell("cat input.txt && echo 'from run 1' > out.txt")).exit_code == 0
        assert run(sandbox.run_python("print(open('out.txt').read().strip())")).stdout == "from run 1\n"
        for target in ("/usr/evil", "/tmp/../usr/evil", "/bin/evil"):
            assert run(sandbox.run_shell(f"touch {target}")).exit_code != 0
    assert (tmp_path / "out.txt").read_text() == "from run 1\n"


def test_host_files_are_not_visible(tmp_path: Path) -> None:
    with Sandbox(tmp_path) as sandbox:
        result = run(sandbox.run_shell(f"ls {ROOT}; cat /etc/passwd; ls /home /work /var"))
        assert result.exit_code != 0 and result.stdout == ""
        assert "No such file" in result.stderr


def test_there_is_no_network_not_even_the_hosts_loopback(tmp_path: Path) -> None:
    with socket.socket() as listener, Sandbox(tmp_path) as sandbox:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('reached')"
        result = run(sandbox.run_python(code))
        assert result.exit_code == 1 and "reached" not in result.stdout
        assert "ConnectionRefusedError" in result.stderr  # its own empty loopback, not the host's


def test_the_time_limit_kills_the_whole_container(tmp_path: Path) -> None:
    marker = "876.5432"  # a sleep that only this test starts
    with Sandbox(tmp_path, SandboxLimits(timeout_s=1.5)) as sandbox:
        result = run(sandbox.run_shell(f"sleep {marker} & while true; do :; done"))
    assert result.timed_out and result.exit_code is None and result.as_text().startswith("[killed")
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.stdout == "", "a process of the killed container is still running"


def test_memory_and_output_limits_hold(tmp_path: Path) -> None:
    limits = SandboxLimits(timeout_s=5, memory_mb=256, max_output_bytes=1000)
    with Sandbox(tmp_path, limits) as sandbox:
        big = run(sandbox.run_python("x = bytearray(512 * 1024 * 1024)"))
        assert big.exit_code == 1 and "MemoryError" in big.stderr
        flood = run(sandbox.run_python("import sys\nfor _ in range(100_000): sys.stdout.write('x' * 100)"))
        assert flood.exit_code == 0 and flood.truncated and flood.stdout == "x" * 1000
        assert flood.as_text().endswith("[output truncated]")


# Forks up to 600 children that each sleep a while (bounded, should the guard fail, by the count and the sleep).
FORKS = """
import os, time
for _ in range({count}):
    if os.fork() == 0:
        time.sleep(20)
        os._exit(0)
print('all forked')
"""


def test_a_fork_bomb_is_killed_and_processes_within_the_limit_run(tmp_path: Path) -> None:
    limits = SandboxLimits(timeout_s=30, max_processes=40)
    with Sandbox(tmp_path, limits) as sandbox:
        bomb = run(sandbox.run_python(FORKS.format(count=600)))
        assert bomb.exit_code == -9 and not bomb.timed_out and "all forked" not in bomb.stdout
        assert bomb.as_text().startswith("[killed: the code ran more than 40 processes at once]")
        within = run(sandbox.run_shell("for i in $(seq 30); do sleep 0.5 & done; wait; echo done"))
        assert (within.exit_code, within.stdout, within.notice) == (0, "done\n", "")


# Forks children that each hold `mb` MB (every page touched) for `seconds`, then waits for them.
HOLDERS = """
import os, time
children = []
for _ in range({count}):
    pid = os.fork()
    if pid == 0:
        block = bytearray({mb} * 1024 * 1024)
        block[::4096] = b"x" * (len(block) // 4096)
        time.sleep({seconds})
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print("done")
"""


def test_processes_holding_too_much_memory_together_are_killed(tmp_path: Path) -> None:
    """Each process is within its own limit (600 MB); four of them together (1.6 GB) are not (1 GB)."""
    limits = SandboxLimits(timeout_s=30, memory_mb=600, max_total_memory_mb=1000)
    with Sandbox(tmp_path, limits) as sandbox:
        hog = run(sandbox.run_python(HOLDERS.format(count=4, mb=400, seconds=20)))
        assert hog.exit_code == -9 and not hog.timed_out and "done" not in hog.stdout
        assert hog.as_text().startswith("[killed: the code's processes held more than 1000 MB of memory together]")
        within = run(sandbox.run_python(HOLDERS.format(count=2, mb=300, seconds=1)))
        assert (within.exit_code, within.stdout, within.notice) == (0, "done\n", "")


def test_as_agent_tools_and_a_workspace_of_its_own_is_removed(tmp_path: Path) -> None:
    sandbox = Sandbox()
    python, shell = sandbox.tools()
    assert (python.name, shell.name) == ("run_python", "run_shell")
    assert python.parameters["required"] == ["code"]
    ok = asyncio.run(python.run({"code": "print('hi')"}))
    bad = asyncio.run(shell.run({"command": "exit 3"}))
    assert (ok.content, ok.is_error) == ("hi", False)
    assert (bad.content, bad.is_error) == ("[exit code 3]", True)
    workspace = sandbox.workspace
    assert workspace.is_dir()
    sandbox.close()
    assert not workspace.exists()


def test_a_lent_virtual_environment_gives_its_packages_read_only(tmp_path: Path) -> None:
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = next(env.glob("lib/python3*/site-packages"))
    (site / "greeting.py").write_text("TEXT = 'from the environment'\n")
    with Sandbox(tmp_path / "workspace", python_env=env) as sandbox:
        assert run(sandbox.run_python("import greeting, sys; print(greeting.TEXT, sys.prefix)")).stdout == (
            f"from the environment {env}\n"
        )
        shell = run(sandbox.run_shell(f"python3 -c 'import greeting; print(greeting.TEXT)'; touch {site}/new.py"))
        assert shell.stdout == "from the environment\n" and "Read-only file system" in shell.stderr
        assert "installed packages" in sandbox.tools()[0].description
    with Sandbox(tmp_path / "workspace") as sandbox:
        missing = run(sandbox.run_python("import greeting"))
        assert missing.exit_code == 1 and "No module named 'greeting'" in missing.stderr
        assert "standard library only" in sandbox.tools()[0].description
    with pytest.raises(ValueError, match="is not a virtual environment"):
        Sandbox(tmp_path / "workspace", python_env=tmp_path)


def test_a_guard_started_after_its_process_ended_and_was_reaped_watches_nothing() -> None:
    """A command that fails at once can end, and be reaped by asyncio's child watcher, before its guard opens a
    pidfd: the guard must take that as nothing to watch (this raised ProcessLookupError under load)."""
    from ember.agents.process_guard import ProcessGuard

    process = subprocess.Popen(["true"])
    process.wait()  # ended and reaped: its pid names no process now
    with ProcessGuard(process.pid, max_processes=8, max_memory_mb=64) as guard:
        pass
    assert guard.notice == ""
