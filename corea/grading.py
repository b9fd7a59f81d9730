"""Answer grading: is an extracted answer equivalent to the gold answer?

Kinds: ``"math"`` (math-verify equivalence) and ``"choice"`` (exact letter match, A-J). Three tiers, cheapest first:

1. Fast path, in-process, no sympy: plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands commas,
   ``\\$``, ``\\%``, a trailing ``\\text{unit}``), choice letters, word answers (``Yes``, ``\\text{Evelyn}``) and
   answers spelled like the gold. Numbers follow math-verify's rules: two integers compare exactly (a percent
   sign is ignored: 10\\% = 10); with a decimal on either side the values must agree to 6 decimal places;
   otherwise rationals compare exactly.
2. Pre-screen, in-process: an answer that would make sympy hang is False in microseconds: longer than
   max(20 * len(gold), 500) characters, brackets nested deeper than 50, an exponent above 1e5 (power towers
   included), a symbolic power expanding to more than 500 monomials, a factorial of more than 1e5. A limit
   grows to twice the gold's own figure when the gold itself is that large.
3. Worker pool: math-verify in ``Grader.processes`` worker processes (fresh interpreters), each gold parsed once
   per worker. Every step (one gold parse, one answer) has a deadline of ``TIMEOUT_S`` seconds; a worker that
   misses it is killed and replaced, that answer is False and the answers queued behind it are re-sent.
   Math-verify's signal-based timeouts are off (``parsing_timeout=None``, ``timeout_seconds=None``), so grading
   works from any thread, asyncio loop, Ray actor or Serve replica. Model output is only read by math-verify's
   parser, never evaluated.
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
MAX_MONOMIALS_LOG10 = math.log10(500)  #: largest expansion of (a + b + ...)^n graded, in monomials
MAX_FACTORIAL_LOG10 = 5.0  #: largest factorial argument graded: 1e5
_CHUNK_MAX = 64  # answers sent to a worker at once (verdicts still come back one by one)

# ------------------------------------------------------------------------------------------------ fast path
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
_LETTER = re.compile(r"\(([A-J])\)|([A-J])([.):])?")
_CANON_CMD = re.compile(r"\\[dt]frac|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[,;:!]")
_CANON_SPACE = re.compile(r"(?<![A-Za-z0-9])\s+|\s+(?![A-Za-z0-9])")


def _clean(text: str | bytes | None) -> str | None:
    """Text with invalid UTF-8 and lone surrogates replaced, stripped; None stays None."""
    if text is None:
        return None
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace").strip()
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text.strip()


def _closing_brace(s: str, start: int = 0) -> int | None:
    """Index of the brace closing the first unescaped ``{`` at or after ``start``; None when unbalanced."""
    depth = 0
    for m in _BRACE.finditer(s, start):
        if len(m.group()) == 1:
            depth += 1 if m.group() == "{" else -1
            if depth == 0:
                return m.start()
            if depth < 0:
                return None
    return None


def _unwrap(s: str) -> str:
    """Strip surrounding ``$`` and whole-string ``\\boxed{}``/``\\text{}``-like wrappers."""
    for _ in range(8):
        s = s.strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        elif (m := _WRAP.match(s)) and _closing_brace(s, m.end() - 1) == len(s) - 1:
            s = s[m.end() : -1]
        else:
            break
    return s


def _number(s: str) -> tuple[Fraction, bool, bool] | None:
    """(value, written with a decimal point, percent) of a plain number, or None."""
    s = _SPACING.sub(" ", _unwrap(s)).strip()
    s = _DEGREE.sub("", _UNIT.sub("", s[2:] if s.startswith("\\$") else s)).strip()
    pct = s.endswith("%")
    if pct:
        s = (s[:-2] if s.endswith("\\%") else s[:-1]).strip()
    if m := _DECIMAL.fullmatch(s):
        value = Fraction(m.group(2).replace("{,}", "").replace(",", ""))
        return (-value if m.group(1) == "-" else value), "." in m.group(2), pct
    if (m := _FRAC.fullmatch(s)) or (m := _SLASH.fullmatch(s)):
        g = m.groups()
        num, den = ((g[1] or "") + (g[2] or g[3]), g[4] or g[5]) if len(g) == 6 else (g[1], g[2])
        if int(den) == 0:
            return None
        return (-1 if g[0] == "-" else 1) * Fraction(int(num), int(den)), False, pct
    return None


def _numbers_equal(gold: tuple[Fraction, bool, bool], answer: tuple[Fraction, bool, bool]) -> bool | None:
    """Math-verify's number rules; None where only its own float rounding can tell."""
    (g, g_dec, g_pct), (a, a_dec, a_pct) = gold, answer
    if not (g_dec or a_dec) and g.denominator == 1 and a.denominator == 1:
        return g == a
    g, a = (g / 100 if g_pct else g), (a / 100 if a_pct else a)
    if g == a or not (g_dec or a_dec):
        return g == a
    return None if abs(g - a) < Fraction(1, 10**6) or max(abs(g), abs(a)) >= 10**9 else False


def _choice_letter(s: str) -> str | None:
    """The letter of ``B``, ``(B)``, ``B.``, ``\\text{B}``, ``\\boxed{B}``, ``B) text``; None otherwise."""
    s = _unwrap(_PREFIX.sub("", _unwrap(s), count=1)).strip("* ")
    if not (m := _LETTER.match(s)):
        return None
    rest, letter = s[m.end() :], m.group(1) or m.group(2)
    separated = m.group(1) is not None or m.group(3) is not None
    return letter if not rest.strip() or (separated and rest[0].isspace()) else None


def _canonical(s: str) -> str:
    """Spelling variants removed: \\dfrac -> \\frac, no \\left/\\right, spaces only between alphanumerics."""
    s = _CANON_CMD.sub(lambda m: "\\frac" if m.group().endswith("frac") else " ", _unwrap(s))
    return _CANON_SPACE.sub("", s)


def _word(s: str) -> str | None:
    s = _unwrap(s).rstrip(".").strip()
    return s.lower() if len(s) <= 64 and _WORD.fullmatch(s) else None


class _Gold:
    """A gold answer prepared once per group: its fast-path forms and pre-screen limits."""

    def __init__(self, gold: str | bytes, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown answer kind {kind!r}; choose from {KINDS}")
        self.kind, self.text, self._limits = kind, _clean(gold) or "", None
        self.letter = _choice_letter(self.text)
        if kind == "choice" and self.letter is None:
            raise ValueError(f"a choice gold must be a letter A-J, got {gold!r}")
        bare = _unwrap(self.text)
        if kind == "math" and not re.fullmatch(r"\([A-J]\)", bare):
            self.letter = None  # a bare capital is a variable; only (C) or \text{(C)} is a choice
        self.number, word, self.canonical = _number(self.text), _word(self.text), _canonical(self.text)
        wrapped = bare != self.text.strip("$ ")
        self.word = word if word is not None and (wrapped or word in _WORD_GOLDS) else None

    def fast(self, answer: str) -> bool | None:
        """The verdict when no sympy is needed, else None."""
        if self.kind == "choice":
            return _choice_letter(answer) == self.letter
        if len(answer) > max(20 * len(self.text), 500):
            return False
        if _canonical(answer) == self.canonical:
            return True
        if self.number is not None:
            if (number := _number(answer)) is not None:
                return _numbers_equal(self.number, number)
            if (word := _word(answer)) is not None and len(word) > 1:
                return False  # a word ("Yes", "none") is never a number
        if self.letter is not None and (letter := _choice_letter(answer)) is not None:
            return letter == self.letter
        return None if self.word is None else _word(answer) == self.word

    def rejects(self, answer: str) -> bool:
        self._limits = self._limits or _limits(self.text)
        return prescreen(answer, self.text, self._limits) is not None


# ------------------------------------------------------------------------------------------------ pre-screen
_BRACKETS = re.compile(r"[{}()\[\]]")
_OPENER = {"}": "{", ")": "(", "]": "["}
_STRUCTURAL = re.compile(r"\\(?:left|right|cdot|times|[dtc]?frac|sqrt|[bB]igg?[lr]?|[,;:! ])")
_PLAIN = re.compile(r"[+-]?\d+(?:\.\d*)?")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_TOKEN = re.compile(r"\s*(?:\d+(?:\.\d+)?|\\?[A-Za-z]+)")


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
        elif stacks[_OPENER[c]]:
            j = stacks[_OPENER[c]].pop()
            pairs[j], pairs[i], depth = i, j, depth - 1
    return pairs, deepest


def _top_level(t: str, chars: str) -> list[int]:
    """Positions of binary operators in ``chars`` outside brackets."""
    out, depth = [], 0
    for i, c in enumerate(t):
        depth += (c in "{([") - (c in "})]")
        if depth == 0 and c in chars and i > 0 and t[i - 1] not in "+-*/^(":
            out.append(i)
    return out


def _log10_value(t: str, depth: int = 0) -> float | None:
    """Upper bound on log10|value| of a numeric expression (numbers, ^, !, *, +, -); None if symbolic."""
    t = _STRUCTURAL.sub(lambda m: "*" if m.group() in ("\\cdot", "\\times") else "", t).strip()
    while len(t) > 1 and t[0] + t[-1] in ("{}", "()") and _pairs(t)[0].get(0) == len(t) - 1:
        t = t[1:-1].strip()
    if depth > 2 * MAX_NESTING or not t:
        return None
    if _PLAIN.fullmatch(t):
        digits = t.lstrip("+-").split(".")[0].lstrip("0")
        return math.log10(float(digits)) if 0 < len(digits) < 300 else float(len(digits))
    if (m := _FACTORIAL.fullmatch(t)) and len(m.group(1)) < 300:
        return math.lgamma(int(m.group(1)) + 1) / math.log(10)
    for chars in ("+-", "*", "^"):
        if not (cuts := _top_level(t, chars)):
            continue
        if chars == "^":  # right-associative tower: a^(b^(...))
            base, exponent = _log10_value(t[: cuts[0]], depth + 1), _log10_value(t[cuts[0] + 1 :], depth + 1)
            if base is None or exponent is None:
                return None
            return math.inf if exponent > 300 else base * 10**exponent
        logs = [_log10_value(t[a + 1 : b], depth + 1) for a, b in zip([-1, *cuts], [*cuts, len(t)])]
        if any(x is None for x in logs):
            return None
        return max(logs) + math.log10(len(logs)) if chars == "+-" else sum(logs)
    return None


def _exponent(s: str, i: int, pairs: dict[int, int]) -> str:
    """The exponent after the ``^`` at ``i``, with any ``^`` chained to it (a^b^c = a^(b^c))."""
    parts = []
    while i < len(s) and s[i] == "^":
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
            break
        i = end + 1
        while i < len(s) and s[i] == " ":
            i += 1
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


def _measures(s: str) -> tuple[float, float, float, int]:
    """log10 of the largest exponent, expansion (monomials) and factorial argument; the deepest nesting."""
    s = s.replace("**", "^")
    pairs, deepest = _pairs(s)
    exp_lg = mono_lg = fact_lg = 0.0
    if deepest > MAX_NESTING:
        return exp_lg, mono_lg, fact_lg, deepest
    for m in re.finditer(r"\^", s):
        if (exponent := _log10_value(_exponent(s, m.start(), pairs))) is None:
            continue
        exp_lg = max(exp_lg, exponent)
        base, grouped = _base(s, m.start(), pairs)
        terms = len(_top_level(base.replace("\\pm", "+").replace("\\mp", "-").strip().lstrip("+-"), "+-")) + 1
        if grouped and terms > 1 and re.search(r"[A-Za-z]", _STRUCTURAL.sub("", base)):
            n = 10 ** min(exponent, 12)  # (t terms)^n has C(n + t - 1, t - 1) monomials
            mono_lg = max(mono_lg, (math.lgamma(n + terms) - math.lgamma(n + 1) - math.lgamma(terms)) / math.log(10))
    for m in re.finditer(r"(\d+|[})\]])\s*!", s):
        if (arg := m.group(1)).isdigit():
            fact_lg = max(fact_lg, math.log10(int(arg)) if len(arg) < 300 else float(len(arg)))
        elif m.start() in pairs:
            fact_lg = max(fact_lg, _log10_value(s[pairs[m.start()] + 1 : m.start()]) or 0.0)
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
    for failed, reason in ((deepest > MAX_NESTING, "nesting too deep"), (exp_lg > max_exp, "exponent too large"),
                           (mono_lg > max_mono, "expansion too large"), (fact_lg > max_fact, "factorial too large")):
        if failed:
            return reason
    return None


# --------------------------------------------------------------------------------------------------- workers
_WARMUP = [("\\frac{1}{2}", "0.5"), ("\\frac{8\\pi}{9}", "-\\frac{8\\pi}{9}"), ("x^2+2x+1", "(x+1)^2"),
           ("5x - 7y + 4 = 0", "5x - 8y + 4 = 0"), ("(1, \\infty)", "[1, \\infty)"), ("\\{1, 2\\}", "2, 1"),
           ("\\sec^2 x", "\\tan^2 x + 1"), ("\\sqrt{2}/2", "0.7071"), ("x \\in [0, 1]", "0 \\le x \\le 1"),
           ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"),
           ("e^{i\\pi}", "-1"), ("f(x) = x + C", "x + C"), ("\\text{Yes}", "\\text{No}"), ("\\log_2 8", "3")]
_PROBE_POINT = (0.7391, 1.2347, 0.5813, 1.618, 0.9127, 1.4142, 0.3433)


def _mv_parse(math_verify, text: str) -> list:
    """math-verify's parse of a bare answer, boxed so that its boxed-answer extraction applies."""
    balanced = _closing_brace("{" + text + "}") == len(text) + 1
    return math_verify.parse("\\boxed{" + text + "}" if balanced else "$" + text + "$", parsing_timeout=None)


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


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: receive (gold, answers); send ("gold",), then ("answer", verdict) per answer."""
    import logging
    import signal

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

    if hasattr(math_verify.grader, "sympy_symbolic_eq"):
        _install_numeric_probe(math_verify.grader)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for gold, answer in _WARMUP:  # first calls into sympy are slow: pay for them before taking work
        math_verify.verify(_mv_parse(math_verify, gold), _mv_parse(math_verify, answer), timeout_seconds=None)
    conn.send(("ready",))
    golds: OrderedDict[str, list] = OrderedDict()
    while (message := conn.recv()) is not None:
        gold, answers = message
        if (parsed := golds.pop(gold, None)) is None:
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
                verdict = bool(parsed) and bool(math_verify.verify(parsed, _mv_parse(math_verify, answer),
                                                                   timeout_seconds=None))
            except Exception:
                verdict = False
            conn.send(("answer", verdict))


def _worker_entry() -> None:
    """Entry point of a worker process: ``python -c _WORKER_CODE FD MEMORY_LIMIT_MB SYS_PATH_JSON``."""
    try:
        _worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]) or None)
    except (EOFError, OSError):  # the parent went away
        pass


# A fresh interpreter (fork + exec: safe from a threaded parent and, unlike multiprocessing's spawn, it never
# re-runs the parent's __main__); the parent's sys.path comes along so that an uninstalled checkout works.
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
        self.gold, self.answers, self.worker, self.deadline, self.gold_parsed, self.done = gold, answers, None, 0, 0, 0


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
        pending: dict[tuple[str, str], list[tuple[int, int]]] = {}  # distinct (gold, answer) -> positions
        for gi, (answers, gold, kind) in enumerate(groups):
            prepared, row = _Gold(gold, kind), []
            for ai, answer in enumerate(map(_clean, answers)):
                verdict = prepared.fast(answer) if answer else False
                if verdict is None and not prepared.rejects(answer):
                    pending.setdefault((prepared.text, answer), []).append((gi, ai))
                row.append(bool(verdict))
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
        """Start every worker and wait until each has imported and warmed up math-verify."""
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

    def _add_worker(self) -> None:  # self._lock held
        worker = _Worker(self.memory_limit_mb)
        self._workers.add(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            if not self.closed:
                self._add_worker()

    def _acquire(self, block: bool) -> _Worker | None:
        with self._lock:
            if not self._started and not self.closed:
                self._started = True
                for _ in range(self.processes):
                    self._add_worker()
        while not self.closed:
            try:
                return self._idle.get(timeout=0.5) if block else self._idle.get_nowait()
            except queue.Empty:
                if not block:
                    return None
        raise RuntimeError("the grader is closed")

    def _run(self, jobs: deque[_Job]) -> dict[tuple[str, str], bool]:
        """Send jobs to idle workers, collect per-answer verdicts, enforce the per-step deadlines."""
        results: dict[tuple[str, str], bool] = {}
        active: dict[Connection, _Job] = {}
        failed_golds: set[str] = set()
        try:
            while jobs or active:
                while jobs:
                    if jobs[0].gold in failed_golds:
                        results.update(((jobs[0].gold, a), False) for a in jobs.popleft().answers)
                        continue
                    if (worker := self._acquire(block=not active)) is None:
                        break
                    try:
                        if worker.proc.poll() is not None:
                            raise BrokenPipeError("worker exited while idle")
                        worker.conn.send((jobs[0].gold, jobs[0].answers))
                    except OSError:  # died while idle (killed from outside): nothing was started, so retry
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
                for conn, job in [(c, j) for c, j in active.items() if j.deadline <= now]:
                    del active[conn]
                    self._replace(job.worker)
                    if not job.worker.ready:
                        raise RuntimeError("a grading worker failed to start (is math-verify installed?)")
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


# ---------------------------------------------------------------------------------------- module defaults
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
    """Replace the process-wide grader by ``Grader(**grader_kwargs)``, closing the old one; return it."""
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
