"""Answer grading: is an extracted answer equivalent to the gold answer?

Kinds: ``"math"`` (math-verify equivalence) and ``"choice"`` (exact letter match, A-J). Three tiers, cheapest
first:

1. Fast path, in-process, no sympy: plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands
   commas, ``\\$``, ``\\%``, a trailing ``\\text{unit}``), choice letters and word answers (``Yes``,
   ``\\text{Evelyn}``). Numbers follow math-verify's rules: two integers compare exactly (a percent sign is
   ignored, so 10\\% = 10); with a decimal on either side the values must agree to 6 decimal places;
   otherwise rationals compare exactly. Word answers compare case-insensitively as words.
2. Pre-screen, in-process: an answer that would make sympy hang is False in microseconds: longer than
   max(20 * len(gold), 500) characters, brackets nested deeper than 50, an exponent above 1e5 (power towers
   included), a symbolic power expanding to more than 500 monomials, a factorial of more than 1e5. The limits
   grow to twice the gold's own figure when the gold itself is that large.
3. Worker pool: math-verify in ``Grader.processes`` worker processes ("forkserver" with math-verify
   preloaded, else "spawn"), each gold parsed once per worker. Every step (one gold parse, one answer) has a
   deadline of ``TIMEOUT_S`` seconds; a worker that misses it is killed and replaced, that answer is False
   and the answers queued behind it are re-sent. Math-verify's own signal-based timeouts are off
   (``parsing_timeout=None``, ``timeout_seconds=None``), so grading works from any thread, asyncio loop,
   Ray actor or Serve replica. Model output is only ever read by math-verify's parser, never evaluated.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from fractions import Fraction
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_any
from typing import Sequence

from corea.protocol import parse_response

KINDS = ("math", "choice")
TIMEOUT_S = 5.0  #: deadline of one grading step (a gold parse or one answer) in a worker, seconds
STARTUP_TIMEOUT_S = 120.0  #: time a new worker may take to import math-verify, seconds
MEMORY_LIMIT_MB = 4096  #: address-space limit of a worker, MiB (None: unlimited)
MAX_NESTING = 50  #: deepest bracket nesting graded
MAX_EXPONENT_LOG10 = 5.0  #: largest exponent graded: 1e5
MAX_MONOMIALS_LOG10 = math.log10(500)  #: largest expansion of (a + b + ...)^n graded, monomials
MAX_FACTORIAL_LOG10 = 5.0  #: largest factorial argument graded: 1e5

_CHUNK_MAX = 64  # answers sent to a worker at once (results still come back one by one)

# ---------------------------------------------------------------------------------------------- text
_WRAP = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|textnormal|textit|mathrm|mathbf|mbox)\s*\{")
_BRACE = re.compile(r"\\[{}]|[{}]")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~")
_UNIT = re.compile(r"\s*\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*\{?\d\}?)?$")
_DEGREE = re.compile(r"\s*(?:\^\s*\{?\\circ\}?|\u00b0)$")
_INT = r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)"
_DECIMAL = re.compile(rf"([+-]?)\s*({_INT}(?:\.\d+)?|\.\d+)")
_FRAC = re.compile(r"([+-]?)\s*\\[dtc]?frac\s*(?:\{\s*([+-]?)\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_SLASH = re.compile(r"([+-]?)\s*(\d+)\s*/\s*(\d+)")
_WORD = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")
_WORD_GOLDS = {"yes", "no", "true", "false"}
_PREFIX = re.compile(r"(?:the\s+)?(?:(?:correct\s+)?answer|option|choice)(?:\s+is)?\s*:?\s*", re.I)
_CANON_CMDS = re.compile(r"\\[dt]frac|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[,;:!]")
_CANON_SPACE = re.compile(r"\s+(?![A-Za-z])|(?<![A-Za-z])\s+")
_LETTER = re.compile(r"\(([A-J])\)|([A-J])([.):])?")


def _clean(text: str | bytes | None) -> str | None:
    """Text with invalid UTF-8 and lone surrogates replaced, stripped; None stays None."""
    if text is None:
        return None
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text.strip()


def _closes_at_end(s: str, open_at: int) -> bool:
    depth = 0
    for m in _BRACE.finditer(s, open_at):
        token = m.group()
        if len(token) == 2:
            continue
        depth += 1 if token == "{" else -1
        if depth == 0:
            return m.end() == len(s)
    return False


def _unwrap(s: str) -> str:
    """Strip surrounding ``$`` and whole-string ``\\boxed{}``/``\\text{}``-like wrappers."""
    for _ in range(8):
        s = s.strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
            continue
        m = _WRAP.match(s)
        if m and _closes_at_end(s, m.end() - 1):
            s = s[m.end() : -1]
            continue
        return s
    return s


def _number(s: str) -> tuple[Fraction, bool, bool] | None:
    """(value, written with a decimal point, percent) of a plain number, or None."""
    s = _SPACING.sub(" ", _unwrap(s)).strip()
    if s.startswith("\\$"):
        s = s[2:]
    s = _DEGREE.sub("", _UNIT.sub("", s)).strip()
    pct = s.endswith("%")
    if pct:
        s = s[:-2] if s.endswith("\\%") else s[:-1]
        s = s.strip()
    if m := _DECIMAL.fullmatch(s):
        value = Fraction(m.group(2).replace("{,}", "").replace(",", ""))
        return (-value if m.group(1) == "-" else value), "." in m.group(2), pct
    if (m := _FRAC.fullmatch(s)) or (m := _SLASH.fullmatch(s)):
        g = m.groups()
        num, den = ((g[1] or "") + (g[2] or g[3]), g[4] or g[5]) if len(g) == 6 else (g[1], g[2])
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if g[0] == "-" else value), False, pct
    return None


def _numbers_equal(gold: tuple[Fraction, bool, bool], answer: tuple[Fraction, bool, bool]) -> bool | None:
    """Math-verify's number rules; None where only math-verify's own float rounding can tell."""
    (g, g_dec, g_pct), (a, a_dec, a_pct) = gold, answer
    if not (g_dec or a_dec) and g.denominator == 1 and a.denominator == 1:
        return g == a
    g, a = (g / 100 if g_pct else g), (a / 100 if a_pct else a)
    if g == a:
        return True
    if not (g_dec or a_dec):
        return False
    if abs(g - a) < Fraction(1, 10**6) or max(abs(g), abs(a)) >= 10**9:
        return None
    return False


def _choice_letter(s: str) -> str | None:
    """The letter of ``B``, ``(B)``, ``B.``, ``\\text{B}``, ``\\boxed{B}``, ``B) text``; None otherwise."""
    s = _unwrap(_PREFIX.sub("", _unwrap(s), count=1)).strip("* ")
    m = _LETTER.match(s)
    if not m:
        return None
    rest = s[m.end() :]
    if not rest.strip():
        return m.group(1) or m.group(2)
    separated = m.group(1) is not None or m.group(3) is not None
    return (m.group(1) or m.group(2)) if separated and rest[0].isspace() else None


def _canonical(s: str) -> str:
    """Spelling variants removed: \\dfrac -> \\frac, no \\left/\\right, no spaces except between letters."""
    s = _CANON_CMDS.sub(lambda m: "\\frac" if m.group().endswith("frac") else "", _unwrap(s))
    return _CANON_SPACE.sub("", s)


def _word(s: str) -> str | None:
    s = _unwrap(s).rstrip(".").strip()
    return s.lower() if len(s) <= 64 and _WORD.fullmatch(s) else None


# ------------------------------------------------------------------------------------------ prescreen
_BRACKETS = re.compile(r"[{}()\[\]]")
_OPEN = {"}": "{", ")": "(", "]": "["}
_STRUCTURAL = re.compile(r"\\(?:left|right|cdot|times|[dtc]?frac|sqrt|[bB]igg?[lr]?|[,;:! ])")
_PLAIN = re.compile(r"[+-]?\d+(?:\.\d*)?")
_FACT_ARG = re.compile(r"(\d+)\s*!")


def _pairs(s: str) -> tuple[dict[int, int], int]:
    """Matching bracket positions (both directions) and the deepest nesting."""
    pairs: dict[int, int] = {}
    stacks: dict[str, list[int]] = {"{": [], "(": [], "[": []}
    depth = deepest = 0
    for m in _BRACKETS.finditer(s):
        c, i = m.group(), m.start()
        if c in stacks:
            stacks[c].append(i)
            depth += 1
            deepest = max(deepest, depth)
        elif stacks[_OPEN[c]]:
            j = stacks[_OPEN[c]].pop()
            pairs[j], pairs[i] = i, j
            depth -= 1
    return pairs, deepest


def _top_level(t: str, chars: str) -> list[int]:
    out, depth = [], 0
    for i, c in enumerate(t):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif depth == 0 and c in chars and i > 0 and t[i - 1] not in "+-*/^(":
            out.append(i)
    return out


def _log10_value(t: str, depth: int = 0) -> float | None:
    """Upper bound on log10|value| of a numeric expression (numbers, ^, !, *, +, -); None if symbolic."""
    t = _STRUCTURAL.sub(lambda m: "*" if m.group() in ("\\cdot", "\\times") else "", t).strip()
    while len(t) >= 2 and t[0] in "{(" and t[-1] == "})"["{(".index(t[0])] and _pairs(t)[0].get(0) == len(t) - 1:
        t = t[1:-1].strip()
    if depth > 2 * MAX_NESTING or not t:
        return None
    if _PLAIN.fullmatch(t):
        digits = t.lstrip("+-").split(".")[0].lstrip("0")
        return math.log10(float(digits)) if 0 < len(digits) < 300 else float(len(digits))
    if (m := _FACT_ARG.fullmatch(t)) and len(m.group(1)) < 300:
        return math.lgamma(int(m.group(1)) + 1) / math.log(10)
    for chars in ("+-", "*", "^"):
        cuts = _top_level(t, chars)
        if not cuts:
            continue
        parts = [t[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(t)])]
        if chars == "^":  # right-associative tower: a^(b^(...))
            base, exponent = _log10_value(parts[0], depth + 1), _log10_value(t[cuts[0] + 1 :], depth + 1)
            if base is None or exponent is None:
                return None
            return math.inf if exponent > 300 else base * 10**exponent
        logs = [_log10_value(p, depth + 1) for p in parts]
        if any(x is None for x in logs):
            return None
        return max(logs) + math.log10(len(logs)) if chars == "+-" else sum(logs)
    return None


_TOKEN = re.compile(r"\s*(?:\d+(?:\.\d+)?|\\?[A-Za-z]+)")


def _exponent(s: str, i: int, pairs: dict[int, int]) -> str:
    """The exponent after the ``^`` at ``i``, with any further ``^`` chained to it (a^b^c = a^(b^c))."""
    parts = []
    while True:
        j = i + 1
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] in "{(":
            end = pairs.get(j, len(s))
            parts.append(s[j : end + 1])
        elif m := _TOKEN.match(s, j):
            end = m.end() - 1
            parts.append(m.group())
        else:
            return "^".join(parts)
        i = end + 1
        while i < len(s) and s[i] == " ":
            i += 1
        if i >= len(s) or s[i] != "^":
            return "^".join(parts)


def _base(s: str, i: int, pairs: dict[int, int]) -> tuple[str, bool]:
    """The base before the ``^`` at ``i`` and whether it is bracketed."""
    j = i - 1
    while j >= 0 and s[j] == " ":
        j -= 1
    if j >= 0 and s[j] in "})]" and j in pairs:
        return s[pairs[j] + 1 : j], True
    k = j
    while k >= 0 and (s[k].isalnum() or s[k] in ".\\"):
        k -= 1
    return s[k + 1 : j + 1], False


def _terms(content: str) -> int:
    return len(_top_level(content.replace("\\pm", "+").replace("\\mp", "-").strip().lstrip("+-"), "+-")) + 1


def _measures(s: str) -> tuple[float, float, float, int]:
    """log10 of the largest exponent, expansion (monomials) and factorial argument, and the deepest nesting."""
    s = s.replace("**", "^")
    pairs, deepest = _pairs(s)
    if deepest > MAX_NESTING:
        return 0.0, 0.0, 0.0, deepest
    exp_lg = mono_lg = fact_lg = 0.0
    for m in re.finditer(r"\^", s):
        exponent = _log10_value(_exponent(s, m.start(), pairs))
        if exponent is None:
            continue
        exp_lg = max(exp_lg, exponent)
        base, grouped = _base(s, m.start(), pairs)
        if grouped and re.search(r"[A-Za-z]", _STRUCTURAL.sub("", base)) and (t := _terms(base)) > 1:
            n = 10 ** min(exponent, 12)
            mono_lg = max(mono_lg, (math.lgamma(n + t) - math.lgamma(n + 1) - math.lgamma(t)) / math.log(10))
    for m in re.finditer(r"(\d+|[})\]])\s*!", s):
        arg = m.group(1)
        if arg.isdigit():
            fact_lg = max(fact_lg, math.log10(int(arg)) if len(arg) < 300 else float(len(arg)))
        elif m.start() in pairs:
            value = _log10_value(s[pairs[m.start()] + 1 : m.start()])
            fact_lg = max(fact_lg, value if value is not None else 0.0)
    return exp_lg, mono_lg, fact_lg, deepest


def _limits(gold: str) -> tuple[float, float, float]:
    exp_lg, mono_lg, fact_lg, _ = _measures(gold) if len(gold) < 10_000 else (0.0, 0.0, 0.0, 0)
    slack = math.log10(2)
    return (max(MAX_EXPONENT_LOG10, exp_lg + slack), max(MAX_MONOMIALS_LOG10, mono_lg + slack),
            max(MAX_FACTORIAL_LOG10, fact_lg + slack))


def prescreen(answer: str, gold: str, limits: tuple[float, float, float] | None = None) -> str | None:
    """Why ``answer`` is rejected without sympy (a short reason), or None when it may be graded."""
    if len(answer) > max(20 * len(gold), 500):
        return "too long"
    exp_lg, mono_lg, fact_lg, deepest = _measures(answer)
    max_exp, max_mono, max_fact = limits or _limits(gold)
    if deepest > MAX_NESTING:
        return "nesting too deep"
    if exp_lg > max_exp:
        return "exponent too large"
    if mono_lg > max_mono:
        return "expansion too large"
    if fact_lg > max_fact:
        return "factorial too large"
    return None


# ------------------------------------------------------------------------------------------ fast path
class _Gold:
    """A gold answer prepared once per group: its fast-path forms and pre-screen limits."""

    def __init__(self, gold: str | bytes, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown answer kind {kind!r}; choose from {KINDS}")
        self.kind, self.text = kind, _clean(gold) or ""
        self.letter = _choice_letter(self.text)
        if kind == "choice":
            if self.letter is None:
                raise ValueError(f"a choice gold must be a letter A-J, got {gold!r}")
            return
        bare = _unwrap(self.text)
        if not re.fullmatch(r"\(([A-J])\)", bare):
            self.letter = None  # a bare letter is a variable; only (C) / \text{(C)} is a choice
        self.number = _number(self.text)
        word = _word(self.text)
        wrapped = bare != self.text.strip().strip("$").strip()
        self.word = word if word is not None and (wrapped or word in _WORD_GOLDS) else None
        self.canonical = _canonical(self.text)
        self._limits: tuple[float, float, float] | None = None

    def fast(self, answer: str) -> bool | None:
        """The verdict when no sympy is needed, else None."""
        if self.kind == "choice":
            return _choice_letter(answer) == self.letter
        if len(answer) > max(20 * len(self.text), 500):
            return False
        if _canonical(answer) == self.canonical:
            return True
        if self.number is not None and (number := _number(answer)) is not None:
            return _numbers_equal(self.number, number)
        if self.letter is not None and (letter := _choice_letter(answer)) is not None:
            return letter == self.letter
        if self.word is not None:
            return _word(answer) == self.word
        return None

    def rejects(self, answer: str) -> bool:
        if self._limits is None:
            self._limits = _limits(self.text)
        return prescreen(answer, self.text, self._limits) is not None


# -------------------------------------------------------------------------------------------- workers
def _balanced(s: str) -> bool:
    depth = 0
    for m in _BRACE.finditer(s):
        if len(m.group()) == 1:
            depth += 1 if m.group() == "{" else -1
            if depth < 0:
                return False
    return depth == 0


def _mv_parse(math_verify, text: str) -> list:
    """math-verify's parse of a bare answer, boxed so that its boxed-answer extraction applies."""
    wrapped = "\\boxed{" + text + "}" if _balanced(text) else "$" + text + "$"
    return math_verify.parse(wrapped, parsing_timeout=None)


_WARMUP = [("\\frac{1}{2}", "0.5"), ("\\frac{8\\pi}{9}", "-\\frac{8\\pi}{9}"), ("x^2+2x+1", "(x+1)^2"),
           ("5x - 7y + 4 = 0", "5x - 8y + 4 = 0"), ("(1, \\infty)", "[1, \\infty)"), ("\\{1, 2\\}", "2, 1"),
           ("\\sec^2 x", "\\tan^2 x + 1"), ("\\sqrt{2}/2", "0.7071"), ("x \\in [0, 1]", "0 \\le x \\le 1"),
           ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"), ("e^{i\\pi}", "-1"),
           ("f(x) = x + C", "x + C"), ("\\text{Yes}", "\\text{No}"), ("2^{10}", "1024"), ("\\log_2 8", "3")]


_PROBE_POINT = (0.7391, 1.2347, 0.5813, 1.618, 0.9127, 1.4142, 0.3433)


def _install_numeric_probe(grader_module) -> None:
    """Let math-verify skip ``simplify(a - b)`` when a and b clearly differ at one real point.

    Its symbols are real, and ``simplify(a - b)`` is zero only for an identity over the reals, so a relative
    difference |a - b| > 1e-9 (1 + |a| + |b|) at a point where both are finite means "not equal" either way; an
    inconclusive probe (undefined, unevaluated calculus, matrices, sets) defers to ``simplify`` unchanged.
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
        finite = cmath.isfinite(va) and cmath.isfinite(vb)
        return finite and abs(va - vb) > 1e-9 * (1 + abs(va) + abs(vb))

    grader_module.sympy_symbolic_eq = lambda a, b: False if differ(a, b) else simplify_eq(a, b)


def _worker_main(conn, memory_limit_mb: int | None) -> None:
    """Worker loop: receive (gold, answers), send ("gold",) then ("answer", verdict) per answer."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    if memory_limit_mb:
        try:
            import resource

            limit = memory_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        except (ImportError, ValueError, OSError):
            pass
    import math_verify
    import math_verify.grader

    if hasattr(math_verify.grader, "sympy_symbolic_eq"):
        _install_numeric_probe(math_verify.grader)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for gold, answer in _WARMUP:  # first calls into sympy are slow: pay for them before taking work
        math_verify.verify(_mv_parse(math_verify, gold), _mv_parse(math_verify, answer), timeout_seconds=None)
    conn.send(("ready", os.getpid()))
    golds: OrderedDict[str, list] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        gold, answers = message
        parsed = golds.pop(gold, None)
        if parsed is None:
            try:
                parsed = _mv_parse(math_verify, gold)
            except Exception:
                parsed = []
        golds[gold] = parsed
        if len(golds) > 1024:
            golds.popitem(last=False)
        conn.send(("gold",))
        for answer in answers:
            try:
                verdict = bool(parsed) and bool(
                    math_verify.verify(parsed, _mv_parse(math_verify, answer), timeout_seconds=None)
                )
            except Exception:
                verdict = False
            conn.send(("answer", verdict))


def _worker_entry() -> None:
    """Entry point of a worker process: ``python -c ... FD MEMORY_LIMIT_MB``."""
    _worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]) or None)


# A fresh interpreter (fork + exec: safe from a threaded parent, and unlike multiprocessing's spawn it never
# re-runs the parent's __main__); the parent's sys.path comes along so an uninstalled checkout works too.
_WORKER_CODE = "import sys, json; sys.path[:] = json.loads(sys.argv[3]); import corea.grading as g; g._worker_entry()"


class _Worker:
    __slots__ = ("proc", "conn", "ready")

    def __init__(self, memory_limit_mb: int | None):
        parent, child = socket.socketpair()
        try:
            args = [str(child.fileno()), str(memory_limit_mb or 0), json.dumps(sys.path)]
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, *args], pass_fds=[child.fileno()],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            child.close()
        self.conn, self.ready = Connection(parent.detach()), False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


class _Job:
    __slots__ = ("gold", "answers", "worker", "deadline", "gold_parsed", "done")

    def __init__(self, gold: str, answers: list[str]):
        self.gold, self.answers, self.worker, self.deadline, self.gold_parsed, self.done = gold, answers, None, 0.0, False, 0


class Grader:
    """A pool of ``processes`` math-verify workers, started on first need; every method is thread-safe."""

    def __init__(self, processes: int | None = None, timeout_s: float = TIMEOUT_S,
                 memory_limit_mb: int | None = MEMORY_LIMIT_MB):
        self.processes = max(1, int(processes or os.cpu_count() or 1))
        self.timeout_s, self.memory_limit_mb, self.pid = float(timeout_s), memory_limit_mb, os.getpid()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = self.closed = False

    def grade(self, response: str | bytes, gold: str, kind: str = "math") -> bool:
        """Grade a full response: its last \\boxed{} against ``gold``."""
        return self.grade_answer(parse_response(response).answer, gold, kind)

    def grade_answer(self, answer: str | bytes | None, gold: str, kind: str = "math") -> bool:
        """Grade an extracted answer against ``gold``."""
        return self.grade_groups([([answer], gold, kind)])[0][0]

    def grade_groups(self, groups: Sequence[tuple[Sequence[str | bytes | None], str, str]]) -> list[list[bool]]:
        """Verdicts for groups of (answers, gold, kind): fast path, pre-screen, then the pool for the rest."""
        verdicts: list[list[bool]] = []
        pending: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for gi, (answers, gold, kind) in enumerate(groups):
            prepared, row = _Gold(gold, kind), []
            for ai, raw in enumerate(answers):
                answer = _clean(raw)
                verdict = prepared.fast(answer) if answer else False
                if verdict is None:
                    verdict = False
                    if not prepared.rejects(answer):
                        pending.setdefault((prepared.text, answer), []).append((gi, ai))
                row.append(verdict)
            verdicts.append(row)
        if pending:
            by_gold: dict[str, list[str]] = {}
            for gold, answer in pending:
                by_gold.setdefault(gold, []).append(answer)
            size = max(1, min(_CHUNK_MAX, math.ceil(len(pending) / (2 * self.processes))))
            jobs = deque(_Job(g, a[i : i + size]) for g, a in by_gold.items() for i in range(0, len(a), size))
            for key, verdict in self._run(jobs).items():
                for gi, ai in pending[key]:
                    verdicts[gi][ai] = verdict
        return verdicts

    def warmup(self) -> None:
        """Start every worker and wait until each has imported math-verify."""
        self._run(deque(_Job("1", ["1"]) for _ in range(self.processes)))

    def worker_pids(self) -> list[int]:
        return sorted(w.proc.pid for w in list(self._workers))

    def close(self) -> None:
        """Stop the workers; a second call does nothing."""
        with self._lock:
            if self.closed:
                return
            self.closed, workers = True, list(self._workers)
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 1.0
        for w in workers:
            try:
                w.proc.wait(max(0.01, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            w.kill()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            if not self.closed:
                self._add_worker()

    def _add_worker(self) -> None:  # with self._lock held
        worker = _Worker(self.memory_limit_mb)
        self._workers.add(worker)
        self._idle.put(worker)

    def _acquire(self, block: bool) -> _Worker | None:
        with self._lock:
            if not self._started and not self.closed:
                self._started = True
                for _ in range(self.processes):
                    self._add_worker()
        while True:
            if self.closed:
                raise RuntimeError("the grader is closed")
            try:
                return self._idle.get(timeout=0.5) if block else self._idle.get_nowait()
            except queue.Empty:
                if not block:
                    return None

    def _run(self, jobs: deque[_Job]) -> dict[tuple[str, str], bool]:
        """Send jobs to idle workers, collect per-answer verdicts, enforce the per-step deadlines."""
        results: dict[tuple[str, str], bool] = {}
        active: dict[object, _Job] = {}
        failed_golds: set[str] = set()
        try:
            while jobs or active:
                while jobs:
                    if jobs[0].gold in failed_golds:
                        results.update(((jobs[0].gold, a), False) for a in jobs.popleft().answers)
                        continue
                    worker = self._acquire(block=not active)
                    if worker is None:
                        break
                    try:
                        if worker.proc.poll() is not None:
                            raise BrokenPipeError("worker exited while idle")
                        worker.conn.send((jobs[0].gold, jobs[0].answers))
                    except OSError:  # died while idle (killed from outside): nothing was started, retry
                        self._replace(worker)
                        continue
                    job = jobs.popleft()
                    job.worker = worker
                    job.deadline = time.monotonic() + (self.timeout_s if worker.ready else STARTUP_TIMEOUT_S)
                    active[worker.conn] = job
                if not active:
                    continue
                wait_s = max(0.0, min(j.deadline for j in active.values()) - time.monotonic())
                for conn in _wait_any(list(active), wait_s):
                    job = active[conn]
                    try:
                        while job.done < len(job.answers) and conn.poll():
                            message = conn.recv()
                            if message[0] == "ready":
                                job.worker.ready = True
                            elif message[0] == "gold":
                                job.gold_parsed = True
                            else:
                                results[(job.gold, job.answers[job.done])] = message[1]
                                job.done += 1
                            job.deadline = time.monotonic() + self.timeout_s
                    except (EOFError, OSError):  # the worker died: handled like a missed deadline
                        job.deadline = -1.0
                    if job.done == len(job.answers):
                        del active[conn]
                        self._idle.put(job.worker)
                now = time.monotonic()
                for conn, job in list(active.items()):
                    if job.deadline > now:
                        continue
                    del active[conn]
                    if not job.worker.ready:
                        self._replace(job.worker)
                        raise RuntimeError("a grading worker failed to start (is math-verify installed?)")
                    self._replace(job.worker)
                    if not job.gold_parsed:  # the gold itself is the culprit
                        failed_golds.add(job.gold)
                        results.update(((job.gold, a), False) for a in job.answers)
                        continue
                    results[(job.gold, job.answers[job.done])] = False
                    if rest := job.answers[job.done + 1 :]:
                        jobs.appendleft(_Job(job.gold, rest))
        finally:
            for job in active.values():  # interrupted: these workers may still send stale messages
                self._replace(job.worker)
        return results


# ------------------------------------------------------------------------------------ module defaults
_default: Grader | None = None
_default_lock = threading.Lock()


def get_grader() -> Grader:
    """The process-wide grader, created on first use (a forked child gets its own)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default.pid != os.getpid():
            _default = Grader()
        return _default


def configure(**grader_kwargs) -> Grader:
    """Replace the process-wide grader by ``Grader(**grader_kwargs)`` (closing the old one) and return it."""
    global _default
    with _default_lock:
        old, _default = _default, Grader(**grader_kwargs)
    if old is not None and old.pid == os.getpid():
        old.close()
    return _default


@atexit.register
def _close_default() -> None:
    if _default is not None and _default.pid == os.getpid():
        _default.close()


def grade(response: str | bytes, gold: str, kind: str = "math") -> bool:
    """Grade a full response (its last \\boxed{}) against ``gold``; no answer is False."""
    return get_grader().grade(response, gold, kind)


def grade_answer(answer: str | bytes | None, gold: str, kind: str = "math") -> bool:
    """Grade an already-extracted answer against ``gold``."""
    return get_grader().grade_answer(answer, gold, kind)


def grade_groups(groups: Sequence[tuple[Sequence[str | bytes | None], str, str]]) -> list[list[bool]]:
    """Verdicts for (answers, gold, kind) groups; each gold is prepared once, slow answers run in parallel."""
    return get_grader().grade_groups(groups)
