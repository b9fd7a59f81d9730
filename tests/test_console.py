"""`corea.console.quiet`: standard error of the process and its children to a log, the terminal kept for the
run's own lines; a failure shows the log's tail."""

import subprocess
import sys
import textwrap


def _run(body: str, tmp_path):
    script = textwrap.dedent(f"""
        import os, subprocess, sys, warnings
        from corea.console import quiet, terminal
        {body}
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_quiet_sends_stderr_of_process_and_children_to_the_log(tmp_path):
    run = _run(f"""
        with quiet({str(tmp_path / 'logs' / 'run.log')!r}) as log:
            print("own line")
            warnings.warn("a library's warning")
            os.write(2, b"a C-level line\\n")
            subprocess.run([sys.executable, "-c", "import sys; print('child stderr', file=sys.stderr)"])
            print("bar 50%", file=terminal())
            print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started")
        print("after", file=sys.stderr)
    """, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "own line\n"
    assert "bar 50%" in run.stderr and "after" in run.stderr
    assert "warning" not in run.stderr and "C-level" not in run.stderr and "child" not in run.stderr
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "a library's warning" in log and "a C-level line" in log and "child stderr" in log
    assert "8 PYTHON worker processes" in log  # Ray's forwarded raylet lines, printed to stdout by Ray's driver


def test_a_failure_prints_the_logs_tail(tmp_path):
    run = _run(f"""
        with quiet({str(tmp_path / 'run.log')!r}):
            print("the cause, logged", file=sys.stderr)
            raise RuntimeError("boom")
    """, tmp_path)
    assert run.returncode == 1
    assert "the last lines of" in run.stderr and "the cause, logged" in run.stderr and "RuntimeError: boom" in run.stderr
