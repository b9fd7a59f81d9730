"""What the terminal shows during a long run, and where everything else goes.

``quiet(log_path)`` sends the process's standard error (file descriptor 2: Python warnings and logging, Ray's
and its C++ core's lines, the progress bars of libraries, and what child processes such as Ray's own write
there), and the cluster messages Ray's driver prints to standard output (``(raylet) ...``), to ``log_path``,
while ``terminal()`` stays the real terminal for the run's own progress bars. A run
that fails prints the log's tail to the terminal, so nothing a user can act on is lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import IO, Iterator

_terminal: IO[str] | None = None


def terminal() -> IO[str]:
    """The stream for progress bars: the real terminal under ``quiet``, else standard error."""
    return _terminal or sys.stderr


class _StdoutFilter:
    """``sys.stdout`` that sends Ray's forwarded cluster messages (lines prefixed ``(raylet)``, which Ray's driver
    prints to standard output) to the log; everything else goes to the real standard output."""

    PREFIXES = ("(raylet)", "\x1b[33m(raylet)")

    def __init__(self, out: IO[str], log: IO[str]) -> None:
        self._out, self._log, self._to_log = out, log, False

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIXES):
            self._to_log = True
        sink = self._log if self._to_log else self._out
        if text.endswith("\n"):
            self._to_log = False
        return sink.write(text)

    def flush(self) -> None:
        self._out.flush()
        self._log.flush()

    def __getattr__(self, name: str):
        return getattr(self._out, name)


def tail(path: Path, lines: int = 40) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def quiet(log_path: str | Path) -> Iterator[Path]:
    """Standard error (descriptor 2 and ``sys.stderr``) to ``log_path`` (appended) while open; libraries'
    progress bars off. On an exception the log's last lines are printed to the terminal before it propagates."""
    global _terminal
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 2)
    _terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    stdout = sys.stdout
    sys.stdout = _StdoutFilter(stdout, log)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging = None
    try:
        yield log_path
    except BaseException:
        sys.stderr.flush()
        print(f"\n--- the last lines of {log_path} ---\n{tail(log_path)}", file=_terminal, flush=True)
        raise
    finally:
        sys.stdout = stdout
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _terminal.close()
        _terminal = None
        log.close()
        if hf_logging is not None:
            hf_logging.enable_progress_bar()
