"""Cheap, in-process answer checks: the fast path and the pre-screen of ``corea.grading``.

Fast path (no sympy): plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands commas, ``\\$``,
``\\%``, a trailing ``\\text{unit}``), choice letters, word answers and answers spelled like the gold.
Pre-screen: an answer that would make sympy hang is rejected in microseconds (see ``prescreen``).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

KINDS = ("math", "choice")
MAX_NESTING = 50  #: deepest bracket nesting graded
MAX_EXPONENT_LOG10 = 5.0  #: largest exponent graded: 1e5
MAX_MONOMIALS_LOG10 = math.log10(500)  #: largest expansion of (a + b + ...)^n graded, in monomials
MAX_FACTORIAL_LOG10 = 5.0  #: largest factorial argument graded: 1e5

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


