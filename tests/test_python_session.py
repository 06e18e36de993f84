"""The sandbox's persistent Python session, in real bubblewrap containers: state carries over from run to run,
errors and limits are reported the way the model needs them, and no container outlives its session."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ember.agents.mcp_tools import mcp_tools
from ember.agents.sandbox import RunResult, Sandbox, SandboxLimits

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (`make install` installs it as root)"
)


def test_variables_functions_and_imports_carry_over_and_a_last_expression_is_shown(tmp_path: Path) -> None:
    with Sandbox(tmp_path) as sandbox:
        session = sandbox.python_session()
        defined = session.run("import math\nradius = 2.0\ndef area(r):\n    return math.pi * r * r")
        assert defined == RunResult(0, "", "")
        assert session.run("print('area:', round(area(radius), 3))\nradius * 10").stdout == "area: 12.566\n20.0\n"
        assert session.run("_ + 1").stdout == "21.0\n"  # `_` holds the last shown value, as in a REPL
        assert session.run("radius = None\nradius").stdout == ""  # None is not shown
        pickled = session.run("import pickle\nclass Point:\n    x = 3\npickle.loads(pickle.dumps(Point())).x")
        assert pickled.stdout == "3\n"  # what the code defines lives in a real __main__ module


def test_an_error_shows_the_codes_own_traceback_and_the_session_goes_on(tmp_path: Path) -> None:
    with Sandbox(tmp_path) as sandbox:
        session = sandbox.python_session()
        session.run("def invert(n):\n    return 1 / n")
        failed = session.run("done = 'before the error'\ninvert(0)")
        assert failed.exit_code == 1 and failed.stdout == ""
        assert failed.stderr.startswith("Traceback (most recent call last):\n")
        assert 'File "<cell 2>", line 2, in <module>\n    invert(0)' in failed.stderr
        assert 'File "<cell 1>", line 2, in invert\n    return 1 / n' in failed.stderr
        assert failed.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
        assert "<string>" not in failed.stderr  # none of the driver's frames
        syntax = session.run("x = (1 +")
        assert syntax.exit_code == 1 and "SyntaxError" in syntax.stderr
        exited = session.run("import sys\nprint('half')\nsys.exit('bad input')")
        assert (exited.exit_code, exited.stdout, exited.stderr) == (1, "half\n", "bad input\n")
        assert session.run("import sys\nsys.exit(3)").exit_code == 3
        assert session.run("done").stdout == "'before the error'\n"


def test_code_past_the_time_limit_is_interrupted_and_the_session_keeps_its_variables(tmp_path: Path) -> None:
    with Sandbox(tmp_path, SandboxLimits(timeout_s=1)) as sandbox:
        session = sandbox.python_session()
        result = session.run("kept = 42\nprint('started', flush=True)\nwhile True:\n    pass")
        assert result.timed_out and result.exit_code is None and result.stdout == "started\n"
        assert result.as_text().startswith("[interrupted: over the time limit of 1 s; the session keeps its state]")
        assert 'File "<cell 1>", line ' in result.stderr  # where it was when stopped
        assert session.run("try:\n    import time; time.sleep(5)\nexcept Exception:\n    pass").timed_out
        assert session.run("kept").stdout == "42\n"


def test_a_call_that_ignores_the_interrupt_gets_its_container_killed_and_the_next_run_a_new_session(
    tmp_path: Path,
) -> None:
    with Sandbox(tmp_path, SandboxLimits(timeout_s=1)) as sandbox:
        session = sandbox.python_session()
        session.run("lost = 1")
        first = session.process
        assert first is not None
        stuck = session.run("print('in C now', flush=True)\nsum(range(10**12))")  # one C call, minutes long
        assert stuck.timed_out and stuck.stdout == "in C now\n" and first.returncode is not None
        assert stuck.as_text().startswith("[killed: over the time limit of 1 s; the Python session was stopped")
        after = session.run("lost")
        assert after.as_text().startswith("[a new Python session: the variables of the one before are gone]\n")
        assert "NameError" in after.stderr and session.process is not first


def test_a_crash_keeps_what_was_printed_and_the_next_run_starts_a_new_session(tmp_path: Path) -> None:
    with Sandbox(tmp_path) as sandbox:
        session = sandbox.python_session()
        crashed = session.run("import os\nprint('last words')\nos._exit(7)")
        assert (crashed.exit_code, crashed.stdout) == (7, "last words\n")
        assert crashed.as_text().startswith("[the Python session ended and its variables are gone")
        assert session.run("print('alive')").stdout == "alive\n"


def test_a_forked_child_ends_with_the_cell_and_the_session_goes_on(tmp_path: Path) -> None:
    """A child that returns from the code ends there, as a script's child does at the script's end: it must not
    go on as a second driver, answering on the session's channel."""
    with Sandbox(tmp_path) as sandbox:
        session = sandbox.python_session()
        code = "import os\npid = os.fork()\nprint('child' if pid == 0 else 'parent')\nif pid:\n    os.waitpid(pid, 0)"
        forked = session.run(code)
        assert forked.exit_code == 0 and sorted(forked.stdout.split()) == ["child", "parent"]
        assert session.run("pid > 0").stdout == "True\n"  # the same session, the parent's variables


FORKS_IN_THE_BACKGROUND = """
import os, threading, time
def forks():
    for _ in range(600):
        if os.fork() == 0:
            time.sleep(20)
            os._exit(0)
threading.Thread(target=forks, daemon=True).start()
"""


def test_a_fork_bomb_ends_the_session_and_says_why(tmp_path: Path) -> None:
    with Sandbox(tmp_path, SandboxLimits(timeout_s=30, max_processes=40)) as sandbox:
        session = sandbox.python_session()
        session.run("kept = 1")
        bomb = session.run("import os, time\nfor _ in range(600):\n    if os.fork() == 0:\n        time.sleep(20)")
        assert bomb.exit_code == -9 and bomb.as_text().startswith(
            "[killed: the code ran more than 40 processes at once]\n[the Python session ended"
        )
        assert "NameError" in session.run("kept").stderr  # a new session
        # a bomb started in the background, between runs: the next run says what became of the session
        session.run(FORKS_IN_THE_BACKGROUND)
        for _ in range(100):  # at most 10 s for the guard
            if session.process is None or session.process.poll() is not None:
                break
            time.sleep(0.1)
        after = session.run("1").as_text()
        assert after.startswith("[killed: the code ran more than 40 processes at once]\n[a new Python session")


def test_limits_and_isolation_hold_in_the_session(tmp_path: Path) -> None:
    limits = SandboxLimits(timeout_s=10, memory_mb=256, max_output_bytes=1000)
    with Sandbox(tmp_path, limits) as sandbox:
        session = sandbox.python_session()
        big = session.run("x = bytearray(512 * 1024 * 1024)")
        assert big.exit_code == 1 and "MemoryError" in big.stderr
        flood = session.run("for _ in range(10_000): print('x' * 99)")
        assert flood.exit_code == 0 and flood.truncated and flood.stdout == ("x" * 99 + "\n") * 10
        assert "EOFError" in session.run("input()").stderr  # stdin is not the session's request channel
        child = session.run("import os, subprocess\nsubprocess.run(['echo', 'from a child'])\nos.getuid()")
        assert child.stdout == "from a child\n65534\n"  # a child's output is captured too; nobody's uid
        outside = session.run(f"open({str(Path(__file__))!r})")
        assert "FileNotFoundError" in outside.stderr
        session.run("open('made-in-session.txt', 'w').write('kept')")
    assert (tmp_path / "made-in-session.txt").read_text() == "kept"


def test_runs_from_several_threads_take_turns(tmp_path: Path) -> None:
    with Sandbox(tmp_path) as sandbox:
        session = sandbox.python_session()
        session.run("log = []")
        results: list[RunResult] = []

        def append(i: int) -> None:
            results.append(session.run(f"import time\nlog.append({i})\ntime.sleep(0.05)\nlog.append({i})"))

        threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert [r.exit_code for r in results] == [0] * 4
        log = eval(session.run("log").stdout)
        assert sorted(log) == sorted(list(range(4)) * 2) and all(log[i] == log[i + 1] for i in range(0, 8, 2))


def test_tools_use_the_session_a_cancelled_run_stops_it_and_close_leaves_no_container(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path)
    python, _ = sandbox.tools()
    fresh, _ = sandbox.tools(python_session=False)
    assert "persistent" in python.description and "persistent" not in fresh.description

    async def calls() -> tuple[str, str, str]:
        await python.run({"code": "total = 40"})
        kept = (await python.run({"code": "total + 2"})).content
        missing = (await fresh.run({"code": "total"})).content
        task = asyncio.create_task(python.run({"code": "import time\ntime.sleep(20)"}))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return kept, missing, (await python.run({"code": "total"})).content

    kept, missing, after_cancel = asyncio.run(calls())
    assert kept == "42" and "NameError" in missing
    assert after_cancel.startswith("[a new Python session") and "NameError" in after_cancel
    session = sandbox.session
    assert session is not None and session.process is not None
    process, exchange = session.process, session.exchange
    assert exchange is not None and exchange.is_dir()
    sandbox.close()
    assert process.returncode is not None and not exchange.exists()


def test_mcp_sandbox_server_keeps_one_session_unless_asked_for_fresh_programs(tmp_path: Path) -> None:
    async def two_calls(*flags: str) -> list[str]:
        command = f"{sys.executable} -m ember.cli mcp sandbox --workspace {tmp_path} {' '.join(flags)}"
        async with mcp_tools([command]) as tools:
            python = next(tool for tool in tools if tool.name == "run_python")
            return [(await python.run({"code": code})).content for code in ("answer = 41", "answer + 1")]

    assert asyncio.run(two_calls()) == ["[no output]", "42"]
    assert "NameError" in asyncio.run(two_calls("--sandbox-fresh-python"))[1]


def test_the_command_lines_limits_reach_the_sandbox(tmp_path: Path) -> None:
    async def bomb(*flags: str) -> str:
        command = f"{sys.executable} -m ember.cli mcp sandbox --workspace {tmp_path} {' '.join(flags)}"
        async with mcp_tools([command]) as tools:
            python = next(tool for tool in tools if tool.name == "run_python")
            return (await python.run({"code": FORKS_IN_THE_BACKGROUND + "time.sleep(5)"})).content

    assert asyncio.run(bomb("--sandbox-max-processes", "20")).startswith(
        "[killed: the code ran more than 20 processes at once]"
    )
    left = subprocess.run(["pgrep", "-f", "/run/ember-session"], capture_output=True)  # the session containers
    assert left.stdout == b""
