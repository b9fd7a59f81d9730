"""Cheap, in-process answer checks of ``corea.grading``: gold rules, the pre-screen, multiple choice.

- ``math_gold_text``: the string math-verify parses for a math gold (the gold as written, or ``\\boxed{gold}``).
- ``prescreen``: an expression that would make sympy hang is rejected in microseconds, by its text alone.
- ``extract_choice`` / ``choice_gold_letter``: the option letter of a response, as evaluation harnesses read
  it, and of a gold (``normalize_choice_gold``, the loaders' check: ``X``, ``(X) text`` or ``X text``).

Each reads model output in time linear in its length (``tests/test_grading_linear.py``).
"""

from __future__ import annotations

import math
import re

from corea.grading import fast

KINDS = ("math", "choice")
CHOICE_LETTERS = "ABCDEFGHIJ"
MAX_NESTING = 50  #: deepest bracket nesting graded
MAX_EXPONENT_LOG10 = 5.0  #: largest exponent graded: 1e5
MAX_MONOMIALS_LOG10 = math.log10(500)  #: largest expansion of (a + b + ...)^n graded, in monomials
MAX_FACTORIAL_LOG10 = 5.0  #: largest factorial argument graded: 1e5
MAX_CALCULUS_LOG10 = 2.0  #: largest number or exponent inside an integral, sum, product or limit: 100
MAX_CALCULUS_OPERATORS = 2  #: most integrals, sums, products and limits in one expression
MAX_RESPONSE_CHARS = 64_000  #: longest response graded (4,096 tokens are ~16,000 characters)

_BRACE = re.compile(r"\\[{}]|[{}]")


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


_MATH_WRAP = re.compile(r"^(?:\$\$([^$]*)\$\$|\$([^$]*)\$|\\\((.*)\\\)|\\\[(.*)\\\])$", re.DOTALL)
_DELIMITED = ("latexDisplayDollar", "latexDisplayBracket", "latexInlineDollar", "latexInlineParenthesis", "latexBoxed")
_TOKEN_EDGES = ".,;:!?()[]{}\"'*"
_CONNECTIVES = ("and",)  # math-verify reads "3 and 5" in a box as the set {3, 5}
_COMMAND_ARGUMENT = re.compile(r"\\[A-Za-z]+\s*\{[^{}]*\}")  # \text{ square inches}: the box normalizes it


def _prose(gold: str) -> bool:
    """Whether the gold holds a word: a whitespace-separated token of three or more letters ("odd $n$",
    "4 solutions"), "and" and a LaTeX command's argument excepted; "\\sqrt", "sin(x)" or "cm^2" are not words."""
    for token in _COMMAND_ARGUMENT.sub(" ", gold).split():
        token = token.strip(_TOKEN_EDGES)
        if len(token) >= 3 and token.isalpha() and token.lower() not in _CONNECTIVES:
            return True
    return False


def _as_written(gold: str, match, priority: int) -> bool:
    """Whether math-verify's reading of the gold as written is the gold's meaning (see ``math_gold_text``)."""
    groups = {name: value for name, value in match.groupdict().items() if value}
    if priority < 300 or any(name.split("_", 1)[1] in _DELIMITED for name in groups if name.startswith("first_")):
        return True  # anchored, boxed or delimited: the gold marks its own answer
    if _prose(gold):
        return True
    whole = not gold[: match.start()].strip() and not gold[match.end() :].strip(" .")
    return whole and not groups.get("decimal2", "").startswith(",")  # "2,3" is a list, not 2.3


def math_gold_text(gold: str) -> str:
    """The string math-verify parses for a math gold: the gold as written, or ``\\boxed{gold}``.

    As written, as plain math-verify reads it, when its first match (math-verify's order) is anchored or
    delimited ("answer is 10000", ``odd $n$``, ``\\boxed{5}``), when the gold is prose ("4 solutions"), or when
    that match is the whole gold (``10/9``, ``2**(1/4)``; not a comma decimal such as ``2,3``, read as a list).
    Boxed otherwise: when math-verify finds nothing in it (``\\$10``, ``\\dfrac{1}{3}``) or only a fragment of a
    bare expression (``3\\sqrt{2}`` would read as 3, ``10, 4, -2`` as -2); a whole-string ``$...$``,
    ``\\(...\\)`` or ``\\[...\\]`` is removed first, and ``$gold$`` replaces the box when the braces do not
    balance. ``grade_answer`` reads a bare answer the same way."""
    gold = gold.strip()
    found = fast.first_match(gold)
    if found is not None and _as_written(gold, found[0], found[2]):
        return gold
    if m := _MATH_WRAP.match(gold):
        gold = next(g for g in m.groups() if g is not None).strip()
    if _closing_brace("{" + gold + "}") == len(gold) + 1:
        return "\\boxed{" + gold + "}"
    return "$" + gold + "$"


# ---------------------------------------------------------------------------------------------- choice
_L = f"[{CHOICE_LETTERS}]"
# The word "answer" in the languages of lighteval's translation literals (English is "answer is", below);
# words of scripts written without spaces match inside a sentence, the others only at a word start.
_ANSWER_WORDS = ("إجابة", "яуап", "erantzuna", "адказ", "উত্তর", "отговор", "resposta", "tubag", "odgovor",
                 "odpověď", "svar", "antwoord", "vastus", "vastaus", "réponse", "antwort", "απάντηση", "જવાબ",
                 "उत्तर", "válasz", "jawaban", "risposta", "одговор", "odpowiedź", "ਜਵਾਬ", "răspuns", "ответ",
                 "ၶေႃႈတွပ်ႇ", "odpoveď", "respuesta", "jibu", "sagot", "பதில்", "җавап", "జవాబు", "cevap",
                 "валэктон", "відповідь", "جواب", "javob", "trả lời")
_UNSPACED_WORDS = ("答案", "回答", "คำตอบ")
_ANSWER_WORD = rf"(?:(?<![^\W\d_])(?:{'|'.join(_ANSWER_WORDS)})|{'|'.join(_UNSPACED_WORDS)})"
_CJK = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"  # ideographs, kana, full-width forms
# Model output is read in time linear in its length: in these patterns no two whitespace runs meet with only
# optional text between them (``\s*(?:\*\*)?\s*`` splits n spaces n + 1 ways and a failed match tries each:
# quadratic); the optional text carries the run after it instead (``\s*(?:\*\*\s*)?``), the same strings match.
_GOLD_LETTER = re.compile(rf"\(({_L})\)(?:\s+\S.*)?|({_L})(?:[.):]?\s+\S.*|[.):]?)", re.DOTALL)
_BOXED_LETTER = re.compile(rf"\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{{\s*)?\(?({_L})\)?"
                           rf"\s*(?:\}}\s*)?(?:[.:)]\s*\S.*)?", re.DOTALL)
_ANSWER_IS = re.compile(rf"(?i:answer\s+is\b|{_ANSWER_WORD})[^\n.。।۔]{{0,40}}?"
                        rf"(?<![A-Za-z])\(?({_L})\)?(?![A-Za-z0-9])")
_ANSWER_COLON = re.compile(rf"(?i:answer|{_ANSWER_WORD})\s*[:：]\s*(?:\*\*\s*)?\(?({_L})\)?(?![A-Za-z0-9])")
_LEADING = re.compile(rf"\s*(?:\*\*\s*)?(?:\(({_L})\)|({_L})(?:[.):।۔]|(?=[{_CJK}])|\s*$))")
_STANDALONE = re.compile(rf"(?<![A-Za-z0-9\\])\(?({_L})\)?(?![A-Za-z0-9])")


def normalize_choice_gold(gold: str) -> str:
    """The letter of a multiple-choice gold written ``X``, ``(X) text`` or ``X text`` (also ``X.``/``X)``);
    a bare lowercase letter is accepted. Anything else raises ``ValueError`` (the loaders' check)."""
    text = str(gold).strip()
    if len(text) == 1 and text.upper() in CHOICE_LETTERS:
        return text.upper()
    if m := _GOLD_LETTER.fullmatch(text):
        return m.group(1) or m.group(2)
    raise ValueError(f"a choice gold must be a letter A-J, '(X) text' or 'X text', got {gold!r}")


def choice_gold_letter(gold: str | None) -> str | None:
    """The letter grading compares with: ``normalize_choice_gold``'s, else the letter a free-text gold states,
    read as a response is (``"Alina and the answer is\\n(C) Cecile"``: C); None when it names none."""
    try:
        return normalize_choice_gold(gold)
    except ValueError:
        return extract_choice(gold)


def extract_choice(response: str | bytes | None) -> str | None:
    """The option letter a response chooses, read as evaluation harnesses read it, first rule that applies:
    a letter in the last ``\\boxed{}``; the last "answer is X" (a few words may come between), or "X" after the
    word "answer" in another language of lighteval's (``réponse est C``, ``答案是C``); the last "answer: X"; a
    leading "X." / "X)" / "(X)" (or the whole response "X", or "X" before a CJK character or full stop:
    ``B。不是 A``); the last standalone letter A-J."""
    from corea.protocol import parse_response

    text = _clean(response)
    if not text:
        return None
    boxed = parse_response(text).answer
    if boxed is not None and (m := _BOXED_LETTER.fullmatch(boxed)):
        return m.group(1)
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        if found := list(pattern.finditer(text)):
            return found[-1].group(1)
    if m := _LEADING.match(text):
        return m.group(1) or m.group(2)
    found = list(_STANDALONE.finditer(text))
    return found[-1].group(1) if found else None


# ------------------------------------------------------------------------------------------------ pre-screen
_BRACKETS = re.compile(r"[{}()\[\]]")
_OPENER = {"}": "{", ")": "(", "]": "["}
_STRUCTURAL = re.compile(r"\\(?:left|right|cdot|times|[dtc]?frac|sqrt|[bB]igg?[lr]?|[,;:! ])")
_PLAIN = re.compile(r"[+-]?\d+(?:\.\d*)?")
_FACTORIAL = re.compile(r"(\d+)\s*!")
# a number or a closing bracket before "!"; a digit run is read from its first digit only: a search from each of
# its n digits would scan the whole run n times (quadratic), and a match can only start at the first anyway
_FACTORIAL_SITE = re.compile(r"((?<!\d)\d+|[})\]])\s*!")
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


_LEVEL_SCAN = {chars: re.compile(rf"[{{}}()\[\]{re.escape(chars)}]") for chars in ("+-", "*", "^")}
_SAME_BRACKETS = {"{": re.compile(r"[{}]"), "(": re.compile(r"[()]")}
_DEEPEST_READ = 2 * MAX_NESTING  #: deepest recursion of ``_log10_value``; deeper reads are symbolic (None)


def _top_level(t: str, chars: str) -> list[int]:
    """Positions of binary operators in ``chars`` outside brackets."""
    out, depth = [], 0
    if not any(c in t for c in chars):
        return out
    for m in _LEVEL_SCAN[chars].finditer(t):  # brackets and operators only: other characters do not count
        c, i = m.group(), m.start()
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif depth == 0 and i > 0 and t[i - 1] not in "+-*/^(":
            out.append(i)
    return out


def _closing(t: str) -> int | None:
    """Index of the bracket that closes ``t[0]`` (``{`` or ``(``) as ``_pairs`` pairs it; None when none does."""
    depth = 0
    for m in _SAME_BRACKETS[t[0]].finditer(t):
        depth += 1 if m.group() == t[0] else -1
        if depth == 0:
            return m.start()
    return None


def _structural(m: re.Match) -> str:
    return "*" if m.group() in ("\\cdot", "\\times") else ""


def _log10_value(t: str, depth: int = 0, memo: dict | None = None) -> float | None:
    """Upper bound on log10|value| of a numeric expression (numbers, ^, !, *, +, -); None if symbolic or nested
    deeper than ``_DEEPEST_READ`` levels below ``depth``. ``memo``: readings already made, shared between calls
    on parts of one expression (a tower's exponents are each other's suffixes)."""
    room = _DEEPEST_READ - depth
    value, height = _value_height(t, room, {} if memo is None else memo)
    return value if value is not None and height <= room else None


def _value_height(t: str, room: int, memo: dict) -> tuple[float | None, float]:
    """``(value, height)`` of ``t`` read with ``room`` levels of recursion left: ``value`` is the bound and
    ``height`` the depth of its reading when that fits in ``room``; ``(None, inf)`` when symbolic; ``(None, h)``,
    h > room a lower bound of the height, when the reading is deeper than ``room``. A reading is a function of
    the text after the structural commands are removed, whatever its depth, so it is remembered by that text
    with its height: ``_log10_value`` at any depth is the value when depth + height fits, else None."""
    t = _STRUCTURAL.sub(_structural, t).strip()
    if (known := memo.get(t)) is not None and (known[0] is not None or known[1] > room):
        return known
    key = t
    while len(t) > 1 and t[0] + t[-1] in ("{}", "()") and _closing(t) == len(t) - 1:
        t = t[1:-1].strip()
    if room < 0:
        return None, 0  # deeper than the room: not remembered
    memo[key] = found = _read(t, room, memo)
    return found


def _read(t: str, room: int, memo: dict) -> tuple[float | None, float]:
    """``_value_height`` of ``t`` once stripped and unwrapped."""
    if not t:
        return None, math.inf
    if _PLAIN.fullmatch(t):
        digits = t.lstrip("+-").split(".")[0].lstrip("0")
        return (math.log10(float(digits)) if 0 < len(digits) < 300 else float(len(digits))), 0
    if (m := _FACTORIAL.fullmatch(t)) and len(m.group(1)) < 300:
        return math.lgamma(int(m.group(1)) + 1) / math.log(10), 0
    for chars in ("+-", "*", "^"):
        if not (cuts := _top_level(t, chars)):
            continue
        if chars == "^":  # right-associative tower: a^(b^(...)), one level deeper per ^
            if len(cuts) > room:
                return None, len(cuts)
            pieces = [t[: cuts[0]], t[cuts[0] + 1 :]]
        else:
            pieces = [t[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(t)])]
        found = [_value_height(piece, room - 1, memo) for piece in pieces]
        if any(value is None and height == math.inf for value, height in found):
            return None, math.inf
        if (height := 1 + max(height for _, height in found)) > room:
            return None, height  # a piece is read deeper than the room
        logs = [value for value, _ in found]
        if chars == "^":
            base, exponent = logs
            return (math.inf if exponent > 300 else base * 10**exponent), height
        return (max(logs) + math.log10(len(logs)) if chars == "+-" else sum(logs)), height
    return None, math.inf


def _exponent_part(s: str, i: int, pairs: dict[int, int]) -> tuple[str | None, int]:
    """The first part of the exponent after the ``^`` at ``i`` (a bracketed group or a token; None when there is
    none) and the index after it and the spaces that follow (a ``^`` there chains: a^b^c = a^(b^c))."""
    j = i + 1
    while j < len(s) and s[j] == " ":
        j += 1
    if j < len(s) and s[j] in "{(":
        end = pairs.get(j, len(s))
        part = s[j : end + 1]
    elif m := _TOKEN.match(s, j):
        end = m.end() - 1
        part = m.group()
    else:
        return None, i
    i = end + 1
    while i < len(s) and s[i] == " ":
        i += 1
    return part, i


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
    """log10 of the largest exponent, expansion (monomials) and factorial argument; the deepest nesting.

    The exponent of a ``^`` runs on through any ``^`` chained to it (a^b^c = a^(b^c)). The carets are read from
    the right, each exponent built from the one of the next caret in its chain and read with the readings of
    that one remembered; an exponent of more than ``_DEEPEST_READ + 1`` parts is deeper than ``_log10_value``
    reads (None) and is not built. So a tower costs time linear in its length."""
    s = s.replace("**", "^")
    pairs, deepest = _pairs(s)
    exp_lg = mono_lg = fact_lg = 0.0
    if deepest > MAX_NESTING:
        return exp_lg, mono_lg, fact_lg, deepest
    memo: dict = {}
    towers: dict[int, tuple[str | None, int]] = {}  # caret -> (its exponent or None when too long, its parts)
    for i in reversed([m.start() for m in re.finditer(r"\^", s)]):
        part, after = _exponent_part(s, i, pairs)
        if part is None:
            towers[i] = ("", 0)
            continue
        rest, parts = towers.get(after, ("", 0)) if after < len(s) and s[after] == "^" else ("", 0)
        parts += 1
        text = None if parts > _DEEPEST_READ + 1 else f"{part}^{rest}" if rest else part
        towers[i] = (text, parts)
        if text is None or (exponent := _log10_value(text, memo=memo)) is None:
            continue
        exp_lg = max(exp_lg, exponent)
        base, grouped = _base(s, i, pairs)
        terms = len(_top_level(base.replace("\\pm", "+").replace("\\mp", "-").strip().lstrip("+-"), "+-")) + 1
        if grouped and terms > 1 and re.search(r"[A-Za-z]", _STRUCTURAL.sub("", base)):
            n = 10 ** min(exponent, 12)  # (t terms)^n has C(n + t - 1, t - 1) monomials
            mono_lg = max(mono_lg, (math.lgamma(n + terms) - math.lgamma(n + 1) - math.lgamma(terms)) / math.log(10))
    for m in _FACTORIAL_SITE.finditer(s):
        if (arg := m.group(1)).isdigit():
            # 0! is 1: log10 of the argument counts from 1
            fact_lg = max(fact_lg, math.log10(max(int(arg), 1)) if len(arg) < 300 else float(len(arg)))
        elif m.start() in pairs:
            fact_lg = max(fact_lg, _log10_value(s[pairs[m.start()] + 1 : m.start()], memo=memo) or 0.0)
    return exp_lg, mono_lg, fact_lg, deepest


_CALCULUS = re.compile(r"\\(?:i{1,3}nt|oint|sum|prod|coprod|lim(?:sup|inf)?)(?![A-Za-z])|\\frac\s*\{\s*(?:d|\\partial)\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _log10_literal(n: str) -> float:
    digits = n.split(".")[0].lstrip("0")
    return float(len(digits)) if len(digits) > 300 else math.log10(max(float(n), 1.0))


def _calculus(s: str, exp_lg: float) -> tuple[int, float]:
    """Integrals, sums, products, limits and derivatives in ``s``, and log10 of its largest number or exponent
    (0 when it has no such operator)."""
    count = len(_CALCULUS.findall(s))
    if not count:
        return 0, 0.0
    numbers = [_log10_literal(n) for n in _NUMBER.findall(s)]
    return count, max([exp_lg, *numbers])


def _limits(gold: str) -> tuple[float, ...]:
    """The pre-screen's limits for answers to ``gold``: the defaults, or twice the gold's own figures."""
    exp_lg, mono_lg, fact_lg, _ = _measures(gold) if len(gold) < 10_000 else (0.0, 0.0, 0.0, 0)
    count, calc_lg = _calculus(gold, exp_lg) if len(gold) < 10_000 else (0, 0.0)
    slack = math.log10(2)
    return (max(MAX_EXPONENT_LOG10, exp_lg + slack), max(MAX_MONOMIALS_LOG10, mono_lg + slack),
            max(MAX_FACTORIAL_LOG10, fact_lg + slack), max(MAX_CALCULUS_LOG10, calc_lg + slack),
            max(MAX_CALCULUS_OPERATORS, count))


def prescreen(answer: str, gold: str, limits: tuple[float, ...] | None = None) -> str | None:
    """Why the expression ``answer`` is rejected without sympy (a short reason), or None when it may be parsed.

    Rejected: longer than max(20 * len(gold), 1000) characters, brackets nested deeper than 50, an exponent
    above 1e5 (power towers included), a symbolic power expanding to more than 500 monomials, a factorial of
    more than 1e5, an integral, sum, product, limit or derivative holding a number or exponent above 100, or
    more than two of them. A limit grows to twice the gold's own figure when the gold itself is that large."""
    if len(answer) > max(20 * len(gold), 1000):
        return "too long"
    exp_lg, mono_lg, fact_lg, deepest = _measures(answer)
    count, calc_lg = _calculus(answer, exp_lg)
    max_exp, max_mono, max_fact, max_calc, max_ops = limits or _limits(gold)
    for failed, reason in ((deepest > MAX_NESTING, "nesting too deep"), (exp_lg > max_exp, "exponent too large"),
                           (mono_lg > max_mono, "expansion too large"), (fact_lg > max_fact, "factorial too large"),
                           (count and calc_lg > max_calc, "calculus with large parameters"),
                           (count > max_ops, "too many integrals, sums, products or limits")):
        if failed:
            return reason
    return None
