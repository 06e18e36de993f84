"""The inside of a persistent Python session: runs in the sandbox as `python -I -c <this file's source> FOLDER`,
with the standard library only (it may run under another interpreter than Ember's).

Reads one JSON request per line on stdin, {"code": ..., "timeout": seconds}, runs the code in a `__main__`
module that lives as long as the process (so variables, imports and functions carry over, as in a notebook),
and answers one JSON line on its original stdout: {"status": "ok" | "error" | "exit" | "interrupted",
"exit_code": int}. The code's own stdout and stderr, and those of any process it starts, go to the files
`stdout` and `stderr` of FOLDER (emptied before each request), which the host reads; its stdin is /dev/null.
The value of a last bare expression is printed, as a notebook shows it.
"""

import ast
import builtins
import contextlib
import json
import linecache
import os
import signal
import sys
import traceback
import types


class CellTimeout(BaseException):
    """Raised in the running code at its time limit: a BaseException, so that `except Exception` lets it pass."""


def on_alarm(signum: int, frame: object) -> None:
    raise CellTimeout("interrupted: the code ran past its time limit")


def user_traceback(error: BaseException) -> str:
    """The traceback without this driver's frames (the exec call, the alarm's handler): they are not the code's."""
    report = traceback.TracebackException.from_exception(error)
    driver = on_alarm.__code__.co_filename
    report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != driver])
    return "".join(report.format())


def run_cell(source: str, filename: str, namespace: dict, timeout: float) -> dict:
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError) as error:  # ValueError: a NUL byte in the source
        sys.stderr.write("".join(traceback.format_exception_only(type(error), error)))
        return {"status": "error", "exit_code": 1}
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # source lines in tracebacks
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None:
                print(repr(value))
                namespace["_"] = value
        return {"status": "ok", "exit_code": 0}
    except CellTimeout as error:
        sys.stderr.write(user_traceback(error))
        return {"status": "interrupted", "exit_code": 1}
    except SystemExit as error:  # sys.exit() ends the code, not the session
        code = error.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
        return {"status": "exit", "exit_code": code if isinstance(code, int) else int(code is not None)}
    except BaseException as error:
        sys.stderr.write(user_traceback(error))
        return {"status": "error", "exit_code": 1}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main(folder: str) -> None:
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")  # dup'ed descriptors are not inherited by children
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        output = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        os.dup2(output, fd)
        os.close(output)
    # the session's streams, open as long as the process, line-buffered: what was printed before a crash is kept
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the file-size limit a write fails instead of killing us
    signal.signal(signal.SIGALRM, on_alarm)
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    sys.modules["__main__"] = module  # functions and classes the code defines belong to a real __main__
    driver = os.getpid()
    for count, line in enumerate(requests, 1):
        request = json.loads(line)
        for fd in (1, 2):
            os.ftruncate(fd, 0)
        try:
            reply = run_cell(request["code"], f"<cell {count}>", module.__dict__, request["timeout"])
        except CellTimeout:  # the alarm went off as the code finished, in this driver's own lines
            reply = {"status": "interrupted", "exit_code": 1}
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # the code closed or overfilled it
                stream.flush()
        if os.getpid() != driver:  # a process the code forked, back from the cell: it ends, as at a script's end
            os._exit(reply["exit_code"])
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main(sys.argv[1])
