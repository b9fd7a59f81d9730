"""Model output is read in time linear in its length: each pattern of ``corea.grading.answers`` that reads it, and
the pre-screen's reading of power towers, on the input that made it super-linear (a failed match retrying every
split of a whitespace or digit run, a tower read again for each of its carets). 8,000 and 64,000 characters:
a linear reading takes 8 times as long on the longer one, a quadratic one 64 times; the ratio must stay below
16 (best of 3 runs each), and the longer one must finish within a bound generous for a loaded machine. Times
are the thread's CPU time, which other processes on a busy machine do not inflate.
regexploit (tests/test_redos.py) flags only cubic or worse backtracking, so it does not see these."""

from __future__ import annotations

import time

import pytest

from corea.grading import answers

SHORT, LONG = 8_000, 64_000
MAX_RATIO = 16  # linear: 8; quadratic: 64
MAX_LONG_S = 5.0  # the longer input, on a loaded machine (a quadratic reading takes minutes)
_GOLD = "x" * (LONG // 20 + 100)  # an answer up to 20 times the gold's length is pre-screened, not rejected


def _prescreen(text: str):
    return answers.prescreen(text, _GOLD)


def _tower(unit: str, top: str, head: str = ""):
    """n characters: ``head``, then ``unit`` repeated, then ``top`` (spaces in front make up the length)."""
    def make(n: int) -> str:
        k, pad = divmod(n - len(head) - len(top), len(unit))
        return " " * pad + head + unit * k + top
    return make


CASES = {  # name: (function reading the text, text of n characters)
    "boxed letter, spaces then text": (answers._BOXED_LETTER.fullmatch, lambda n: "A" + " " * (n - 2) + "x"),
    "boxed letter, leading spaces": (answers._BOXED_LETTER.fullmatch, lambda n: " " * (n - 1) + "x"),
    "answer colon, tabs": (lambda t: list(answers._ANSWER_COLON.finditer(t)), lambda n: "answer:" + "\t" * (n - 7)),
    "answer colon, bold then spaces": (lambda t: list(answers._ANSWER_COLON.finditer(t)),
                                       lambda n: "answer: **" + " " * (n - 10)),
    "leading letter, spaces": (answers._LEADING.match, lambda n: " " * (n - 1) + "\x00"),
    "leading letter, bold then spaces": (answers._LEADING.match, lambda n: "**" + " " * (n - 3) + "\x00"),
    "factorial site, digit run": (lambda t: list(answers._FACTORIAL_SITE.finditer(t)), lambda n: "1" * n),
    "factorial site, digits then spaces": (lambda t: list(answers._FACTORIAL_SITE.finditer(t)),
                                           lambda n: "1" * (n // 2) + " " * (n - n // 2)),
    "extract_choice, boxed": (answers.extract_choice, lambda n: "\\boxed{A" + " " * (n - 10) + "x}"),
    "extract_choice, answer colon": (answers.extract_choice, lambda n: "answer:" + "\t" * (n - 8) + "x"),
    "extract_choice, leading": (answers.extract_choice, lambda n: "** " + " " * (n - 4) + "\x00"),
    "prescreen, digit run": (_prescreen, lambda n: "1" * n),
    "prescreen, number tower": (_prescreen, _tower("2^", "2")),
    "prescreen, symbolic tower": (_prescreen, _tower("x^", "2")),
    "prescreen, tower of groups": (_prescreen, _tower("{1+1}^", "2")),
    "prescreen, tower in an exponent": (_prescreen, _tower("2^", "2}", head="x^{")),
    "prescreen, truncated tower": (_prescreen, _tower("2^", "{")),
}


def _best_of_3(read, text: str, first: float | None = None) -> float:
    times = [] if first is None else [first]
    while len(times) < 3:
        start = time.thread_time()
        read(text)
        times.append(time.thread_time() - start)
    return min(times)


@pytest.mark.parametrize("name", list(CASES))
def test_reading_is_linear(name):
    read, make = CASES[name]
    short, long = make(SHORT), make(LONG)
    assert (len(short), len(long)) == (SHORT, LONG)
    start = time.thread_time()
    read(long)  # once first: a super-linear reading fails here, without three more runs
    first = time.thread_time() - start
    assert first < MAX_LONG_S, f"{name}: {first:.2f} s for {LONG:,} characters"
    t_long = _best_of_3(read, long, first)
    t_short = _best_of_3(read, short)
    if t_long < 0.002:  # too quick to time a ratio: a quadratic reading of 64,000 characters is far slower
        return
    assert t_long / t_short < MAX_RATIO, f"{name}: {t_short * 1e3:.2f} ms -> {t_long * 1e3:.2f} ms"


def test_the_readings_are_unchanged():
    """The linear patterns read what the earlier ones did (the same letters, the same factorials)."""
    assert answers.extract_choice(r"\boxed{\text{ (B) }}") == "B"
    assert answers.extract_choice(r"so \boxed{ C } .") == "C" and answers.extract_choice(r"\boxed{D. Paris}") == "D"
    assert answers.extract_choice("Answer:\t ** (E)") == "E" and answers.extract_choice("答案：F") == "F"
    assert answers.extract_choice("**  G.  because") == "G" and answers.extract_choice("H") == "H"
    assert answers.extract_choice(r"\boxed{A x}") == "A"  # not a boxed letter: the standalone letter
    assert [m.group(1) for m in answers._FACTORIAL_SITE.finditer("12! + (3)! + 45 !+ 6")] == ["12", ")", "45"]
    assert answers._measures("0!")[2] == 0.0 and answers.prescreen("0! + 1", "2") is None  # log10(0) raised


def test_towers_read_as_before():
    """A power tower's exponents: each caret's own, up to the depth the reading goes (101 parts)."""
    assert answers.prescreen("2^2^2^2^2", "1") is None  # 2^65536: exponent 65536 < 1e5
    assert answers.prescreen("2^2^2^2^2^2", "1") == "exponent too large"
    assert answers.prescreen("x^{2^{2^{2^{2^{2}}}}}", "1") == "exponent too large"
    exp_lg = answers._measures("2^" * 120 + "2")[0]
    assert exp_lg == float("inf")  # the top carets are deeper than read; the last ones are infinite already
    assert answers._measures("x^" * 300 + "x") == (0.0, 0.0, 0.0, 0)
    assert answers._measures("(x+y)^{" + "1^" * 100 + "7}")[1] > 0  # an exponent of 101 parts: still read
    assert answers._measures("(x+y)^{" + "1^" * 101 + "7}")[1] == 0  # 102 parts: deeper than read
    start = time.thread_time()
    assert answers.prescreen("x^" * 499 + "x", "1") is None  # 999 characters: pre-screened whatever the gold
    assert time.thread_time() - start < 1.0  # seconds when each caret read the whole tower above it again
