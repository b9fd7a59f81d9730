"""The math-verify worker processes of ``corea.grading``: a fresh interpreter per worker, fed over a socket.

A worker receives (gold, responses, timeout_s), parses ``math_gold_text(gold)`` once, and sends one verdict per
response: ``verify(parsed_gold, parse(response))``, math-verify's defaults without its signal timeouts. Each
response runs under an interval timer of ``timeout_s`` (a miss is False); every expression math-verify is about
to parse passes ``prescreen`` first (a rejected one makes the response False). The parent kills a worker
that stays silent past the deadline plus a grace period (stuck in C code) and starts another.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection

from corea.grading.answers import _limits, math_gold_text, prescreen

MEMORY_LIMIT_MB = 4096  #: address-space limit of a worker, MiB (None: unlimited)

_WARMUP = [("\\frac{1}{2}", "0.5"), ("\\frac{8\\pi}{9}", "-\\frac{8\\pi}{9}"), ("x^2+2x+1", "(x+1)^2"),
           ("5x - 7y + 4 = 0", "5x - 8y + 4 = 0"), ("(1, \\infty)", "[1, \\infty)"), ("\\{1, 2\\}", "2, 1"),
           ("\\sec^2 x", "\\tan^2 x + 1"), ("\\sqrt{2}/2", "0.7071"), ("x \\in [0, 1]", "0 \\le x \\le 1"),
           ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"),
           ("e^{i\\pi}", "-1"), ("f(x) = x + C", "x + C"), ("\\text{Yes}", "\\text{No}"), ("\\log_2 8", "3")]
_PROBE_POINT = (0.7391, 1.2347, 0.5813, 1.618, 0.9127, 1.4142, 0.3433)


class _Deadline(BaseException):
    """The response's time is up (a BaseException: math-verify's ``except Exception`` lets it through)."""


class _Rejected(BaseException):
    """math-verify was about to parse a pathological expression."""


def _install_guard(parser, screen: dict) -> None:
    """Run ``prescreen`` on every string math-verify's extraction is about to parse (LaTeX or expression), and
    record in ``screen["first"]`` whether the first one parsed. The first string parsed is the first group of
    the first match tried; when it parses, that match is the extraction, so the verdict is a function of the
    gold and that match's strings alone (the parent reuses it for responses with the same first match)."""
    for name in ("parse_latex_cached", "parse_expr_cached"):
        original = getattr(parser, name)

        def guarded(text, _original=original):
            first, screen["first"] = screen["first"] is None, screen["first"] or False
            if screen["gold"] is not None and prescreen(text, screen["gold"], screen["limits"]) is not None:
                raise _Rejected()
            parsed = _original(text)  # raises when it does not parse: the first match then did not decide
            if first:
                screen["first"] = True
            return parsed

        setattr(parser, name, guarded)


def _within(seconds: float | None, fn, *args):
    """``fn(*args)`` under an ITIMER_REAL deadline that raises ``_Deadline``; no deadline when None."""
    if seconds is None:
        return fn(*args)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _install_numeric_probe(grader_module) -> None:
    """Let math-verify skip ``simplify(a - b)`` when a and b clearly differ at one real point.

    Its symbols are real and ``simplify(a - b)`` is zero only for an identity, so a difference
    |a - b| > 1e-9 (1 + |a| + |b|) where both are finite means "not equal" either way; an inconclusive probe
    (undefined values, unevaluated sums or integrals, matrices, sets) leaves the decision to ``simplify``.
    """
    import cmath

    import sympy

    simplify_eq = grader_module.sympy_symbolic_eq
    heavy = (sympy.Sum, sympy.Product, sympy.Integral, sympy.Limit, sympy.Derivative)

    def differ(a, b) -> bool:
        try:
            if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)) or a.has(*heavy) or b.has(*heavy):
                return False
            symbols = sorted(a.free_symbols | b.free_symbols, key=str)
            point = {x: sympy.Float(_PROBE_POINT[i % 7] + i // 7, 30) for i, x in enumerate(symbols)}
            va, vb = complex(a.subs(point).evalf(30)), complex(b.subs(point).evalf(30))
        except Exception:
            return False
        return cmath.isfinite(va) and cmath.isfinite(vb) and abs(va - vb) > 1e-9 * (1 + abs(va) + abs(vb))

    grader_module.sympy_symbolic_eq = lambda a, b: False if differ(a, b) else simplify_eq(a, b)


def _install_two_stage_parsing(latex2sympy_module) -> None:
    """ANTLR's two-stage parsing for latex2sympy: each LaTeX string is parsed first in SLL prediction mode and,
    on any error, again in the default LL mode.

    ANTLR's ``PredictionMode.SLL`` contract: an SLL parse either returns the same tree as LL or reports a
    syntax error (which latex2sympy's listener raises), so the verdicts are math-verify's; SLL skips the
    full-context predictions that LL recomputes on every parse (about 20% of a worker's time). A latex2sympy
    without these hooks is left as it is."""
    converter = getattr(latex2sympy_module, "_Latex2Sympy", None)
    if converter is None or not hasattr(converter, "create_parser") or not hasattr(converter, "parse"):
        return
    from antlr4.atn.PredictionMode import PredictionMode

    create_parser, parse = converter.create_parser, converter.parse
    state = {"sll": False}

    def create_two_stage(self, latex_str):
        parser = create_parser(self, latex_str)
        if state["sll"]:
            parser._interp.predictionMode = PredictionMode.SLL
        return parser

    def parse_two_stage(self, latex_str):
        state["sll"] = True
        try:
            return parse(self, latex_str)
        except Exception:
            state["sll"] = False
            return parse(self, latex_str)
        finally:
            state["sll"] = False

    converter.create_parser, converter.parse = create_two_stage, parse_two_stage


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: receive (gold, responses, timeout_s); send ("gold",), then ("answer", verdict, note, decided)
    per response, note being "", "rejected" (pre-screen) or "deadline", decided: its first match parsed."""
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def exit_when_orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    if memory_limit_mb:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = memory_limit_mb * 2**20 if hard == resource.RLIM_INFINITY else min(memory_limit_mb * 2**20, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    import math_verify
    import math_verify.grader
    import math_verify.parser

    def on_alarm(signum, frame):
        raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    if hasattr(math_verify.grader, "sympy_symbolic_eq"):
        _install_numeric_probe(math_verify.grader)
    screen: dict = {"gold": None, "limits": None, "first": None}
    _install_guard(math_verify.parser, screen)
    from latex2sympy2_extended import latex2sympy2

    _install_two_stage_parsing(latex2sympy2)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    def parse(text: str) -> list:
        return math_verify.parse(text, parsing_timeout=None)

    def judge(gold_parsed: list, response: str) -> bool:
        return bool(gold_parsed) and bool(math_verify.verify(gold_parsed, parse(response), timeout_seconds=None))

    for gold, answer in _WARMUP:  # first calls into sympy are slow: pay for them before taking work
        judge(parse(math_gold_text(gold)), math_gold_text(answer))
    conn.send(("ready",))
    golds: OrderedDict[str, list] = OrderedDict()
    while (message := conn.recv()) is not None:
        gold, responses, timeout_s = message
        if (parsed := golds.pop(gold, None)) is None:
            screen["gold"] = None  # the gold is trusted data: parsed without the screen, under the deadline
            try:
                parsed = _within(timeout_s, parse, math_gold_text(gold))
            except (Exception, _Deadline, _Rejected):
                parsed = []
        golds[gold] = parsed
        if len(golds) > 1024:
            golds.popitem(last=False)
        conn.send(("gold",))
        screen["gold"], screen["limits"] = gold, _limits(gold)
        for response in responses:
            note, screen["first"] = "", None
            try:
                verdict = _within(timeout_s, judge, parsed, response)
            except _Deadline:
                verdict, note = False, "deadline"
            except _Rejected:
                verdict, note = False, "rejected"
            except Exception:
                verdict = False
            conn.send(("answer", verdict, note, note == "" and screen["first"] is True))


def _worker_entry() -> None:
    """Entry point of a worker process: ``python -c _WORKER_CODE FD MEMORY_LIMIT_MB SYS_PATH_JSON``."""
    try:
        _worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]) or None)
    except (EOFError, OSError):  # the parent went away
        pass


# A fresh interpreter (fork + exec: safe from a threaded parent and, unlike multiprocessing's spawn, it never
# re-runs the parent's __main__); the parent's sys.path comes along so that an uninstalled checkout works.
_WORKER_CODE = "import sys, json; sys.path[:] = json.loads(sys.argv[3]); import corea.grading.worker as w; w._worker_entry()"


class _Worker:
    __slots__ = ("proc", "conn", "ready", "_lock")

    def __init__(self, memory_limit_mb: int | None):
        parent, child = socket.socketpair()
        try:
            args = [str(child.fileno()), str(memory_limit_mb or 0), json.dumps(sys.path)]
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, *args], pass_fds=[child.fileno()],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            child.close()
        self.conn, self.ready, self._lock = Connection(parent.detach()), False, threading.Lock()

    def kill(self) -> None:
        """Kill the process and close the socket; safe to call from two threads at once (the pool's ``close`` and
        a batch in flight replacing the same worker)."""
        with self._lock:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if not self.conn.closed:
                self.conn.close()
