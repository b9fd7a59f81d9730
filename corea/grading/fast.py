"""The in-process fast path of ``corea.grading``: math-verify's own extraction, without its LaTeX parser.

``math_verify.parse(text)`` (default configs: LaTeX, then expressions) tries regex matches in a fixed order:
priority groups from 0 (``final answer is ... I hope``) over 50 (boxed, ``final answer ... is``), 100/200
(``answer:`` / ``answer``) to 300 (any LaTeX environment, any number), and within a group the rightmost match
first. The first match whose text parses wins; ``first_match`` fallback then appends that match's normalized
string. ``first_candidate`` reproduces that order with math-verify's own compiled regexes and its own
``normalize_latex``; ``fast_parse`` then predicts the parse of that first match when its text is a plain number
(``-12``, ``0.75``, ``\\frac{3}{4}``), built exactly as latex2sympy builds it (``sympy.Number`` of the digits,
negated; ``Rational`` for a fraction of integers), so the slow ANTLR parser never runs for them. Anything else
returns ``None`` and goes to the worker pool, which runs math-verify itself. A response without any match
parses to ``[]`` (math-verify's verdict is then False). ``tests/test_grading_equivalence.py`` checks the
predictions against latex2sympy and the verdicts against plain math-verify.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from itertools import groupby

_PLAIN_INT = re.compile(r"(-?)(\d{1,40})")
_PLAIN_DECIMAL = re.compile(r"(-?)(\d{1,20}\.\d{1,20})")
_PLAIN_FRAC = re.compile(r"(-?)\\frac\{(\d{1,20})\}\{(\d{1,20})\}")
_MAX_EXPR_DIGITS = 40
_EXPR_NUMBER = re.compile(r"-?(?:[1-9]\d*|0)(?:\.\d+)?")


_IMPORT_LOCK = threading.Lock()


def _mv():
    """math-verify's pieces, imported on first use (sympy takes a second to import) by one thread at a time."""
    if _MV:
        return _MV[0]
    with _IMPORT_LOCK:
        if not _MV:
            _MV.append(_load())
    return _MV[0]


_MV: list = []


def _quiet_disabled_timeout(record) -> bool:
    """math-verify warns on every call without a timeout; the fast path's values cannot hang (plain numbers)."""
    return "Timeout is disabled" not in record.getMessage()


def _load():
    import logging

    import sympy
    from latex2sympy2_extended.latex2sympy2 import normalize_latex
    from math_verify import grader, parser

    logging.getLogger("math_verify.grader").addFilter(_quiet_disabled_timeout)
    targets = [parser.LatexExtractionConfig(), parser.ExprExtractionConfig()]  # parse()'s defaults
    patterns = sorted(((p, t, prio) for pats, t in parser.get_extraction_regexes(targets) for p, prio in pats),
                      key=lambda x: x[2])
    groups = [list(g) for _, g in groupby(patterns, key=lambda x: x[2])]
    return sympy, normalize_latex, parser, grader, groups


def first_match(text: str):
    """(match, extraction config, priority) of the first match math-verify's ``parse`` tries on ``text``;
    None if none. Priorities below 300 are anchored ("final answer", "answer") or boxed."""
    for group in _mv()[4]:
        matches = [(m, m.start(), m.end(), t) for p, t, _ in group for m in p.finditer(text)]
        if matches:
            matches.sort(key=lambda x: (x[2], -x[1]), reverse=True)  # as math-verify: rightmost end first
            return matches[0][0], matches[0][3], group[0][2]
    return None


def first_candidate(text: str):
    """(match, extraction config) of the first match math-verify's ``parse`` tries on ``text``; None if none."""
    found = first_match(text)
    return None if found is None else found[:2]


def candidate_strings(match, target) -> list[tuple[str, bool]]:
    """The strings math-verify would parse for this match: (normalized LaTeX or expression, is a percentage)."""
    sympy, normalize_latex, parser, _, _ = _mv()
    groups = match.groupdict()
    if not isinstance(target, parser.LatexExtractionConfig):
        if groups.get("expr"):
            return [(groups["expr"], False)]
        number = next((v for n, v in groups.items() if n.startswith(("integer", "decimal")) and v), "")
        return [(number, bool(groups.get("percent")))]
    out = []
    names = ["first_latex"] + [f"next{i}_latex" for i in range(1, 6)]
    for prefix in names:  # as math_verify.parser.extract_latex
        found = next(((v, n) for n, v in groups.items() if n.startswith(prefix) and v), None)
        if found is None:
            continue
        latex, name = found
        config = target.normalization_config
        if name.split("_")[1] == "latexBoxed":
            config = replace(config, boxed="last")
        out.append((normalize_latex(latex, config=config), bool(groups.get(f"{name.split('_')[0]}_percent"))))
    return out


def _plain_number(s: str):
    """latex2sympy's value of a plain number string, or None when ``s`` is not one."""
    sympy = _mv()[0]
    if m := _PLAIN_INT.fullmatch(s) or _PLAIN_DECIMAL.fullmatch(s):
        digits = m.group(2)
        # sympy.Number(digits), without its string parser: Integer, or Float at the string's own precision
        value = sympy.Integer(int(digits)) if digits.isdigit() else sympy.Float(digits)
    elif (m := _PLAIN_FRAC.fullmatch(s)) and int(m.group(3)) != 0:
        value = sympy.Rational(int(m.group(2)), int(m.group(3)))
    else:
        return None
    return -value if m.group(1) else value


def fast_parse(text: str, found=False, strings: list[tuple[str, bool]] | None = None):
    """``math_verify.parse(text)`` when predictable without the LaTeX parser, else None.

    Returns ``[]`` when nothing matches, ``[value, fallback string]`` for a plain-number first match.
    ``found``: ``first_candidate(text)`` and ``strings``: its ``candidate_strings``, when already computed."""
    found = first_candidate(text) if found is False else found
    if found is None:
        return []
    match, target = found
    _, _, parser, _, _ = _mv()
    if isinstance(target, parser.LatexExtractionConfig):
        strings = candidate_strings(match, target) if strings is None else strings
        if len(strings) != 1 or strings[0][1]:
            return None
        value = _plain_number(strings[0][0])
        return None if value is None else [value, strings[0][0]]
    groups = match.groupdict()
    if groups.get("expr") or sum(len(v) for n, v in groups.items() if v and n != "percent") > _MAX_EXPR_DIGITS:
        return None
    integer = next((v for n, v in groups.items() if n.startswith("integer") and v), "")
    decimal = next((v for n, v in groups.items() if n.startswith("decimal") and v), "")
    integer = integer.translate(str.maketrans("", "", ", ")).lstrip("0") or "0"  # as parser.extract_expr
    text = f"{integer}{decimal.replace(',', '.')}"
    if not _EXPR_NUMBER.fullmatch(text):
        return None
    sympy = _mv()[0]
    value = sympy.Integer(int(text)) if decimal == "" else sympy.Float(text)  # = sympy.Number(text)
    if groups.get("percent"):
        from latex2sympy2_extended.latex2sympy2 import convert_to_pct

        value = convert_to_pct(value)
    return [value, text]


def verify(gold: list, prediction: list) -> bool:
    """math-verify's ``verify`` (default precision), without its signal-based timeout: for fast-path values."""
    return bool(_mv()[3].verify(gold, prediction, timeout_seconds=None))
