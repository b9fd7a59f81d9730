"""Equivalence with math-verify: ``grade`` IS math-verify's verdict, and agrees with public labels.

Public labelled cases (``tests/data/public_math_cases.json``, ``public_gold_cases.json``,
``public_choice_cases.json``), each row naming its origin (repository@commit:path::test); taken from the test
files of
- huggingface/Math-Verify (tests/test_all.py, test_boxed.py, test_numina_cases.py, test_open_thoughts.py,
  test_yujianll.py, test_string_extraction.py), https://github.com/huggingface/Math-Verify
- huggingface/lighteval (tests/unit/metrics/test_extractive_match.py), https://github.com/huggingface/lighteval
- NVIDIA/NeMo-Skills (tests/test_math_equal.py, both directions of each pair), https://github.com/NVIDIA/NeMo-Skills
- hendrycks/math (modeling/math_equivalence_test.py), https://github.com/hendrycks/math
- EleutherAI/lm-evaluation-harness (tests/test_filters.py), https://github.com/EleutherAI/lm-evaluation-harness
- UKGovernmentBEIS/inspect_ai (tests/scorer/math_cases.json: target = gold, output = response; its labels are
  inspect's own math scorer's), https://github.com/UKGovernmentBEIS/inspect_ai
- inclusionAI/AReaL (tests/test_math_verify_reward.py: the plain math-verify cases with a 1.0/0.0 label, golds
  such as "answer is 10000"), https://github.com/inclusionAI/AReaL
The math rows were read from those files with Python's ``ast`` (parametrize tuples gold, pred, expected; tests
run with non-default precision, strictness or language left out). "Plain math-verify" is
``verify(parse(gold), parse(response))`` with its defaults; the reference is the same with the gold as corea
reads it, ``parse(math_gold_text(gold))``: the gold as written, except where math-verify would read nothing or
only a fragment of a bare expression in it (then ``\\boxed{gold}``); so ``grade`` differs from plain math-verify
only on golds it boxes.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from corea.grading import fast as grading_fast
from corea.grading.answers import math_gold_text
from corea.grading import Grader

DATA = Path(__file__).parent / "data"
MATH_CASES = json.loads((DATA / "public_math_cases.json").read_text())
GOLD_CASES = json.loads((DATA / "public_gold_cases.json").read_text())
CHOICE_CASES = json.loads((DATA / "public_choice_cases.json").read_text())


def _verify(gold_text: str, response: str) -> bool:
    import math_verify

    return bool(math_verify.verify(math_verify.parse(gold_text), math_verify.parse(response)))


def _reference_and_plain(gold: str, response: str) -> tuple[bool, bool]:
    """(reference, plain math-verify) verdicts, the response parsed once."""
    import math_verify

    parsed = math_verify.parse(response)
    return tuple(bool(math_verify.verify(math_verify.parse(g), parsed)) for g in (math_gold_text(gold), gold))


def reference(gold: str, response: str) -> bool:
    """math-verify's verdict as corea defines correctness (main thread: its own signal timeouts apply)."""
    return _verify(math_gold_text(gold), response)


@pytest.fixture(scope="module")
def grader():
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    with Grader(processes=2) as g:
        yield g


@pytest.mark.slow  # ~25 s of CPU: 385 cases graded, and twice more by plain math-verify
def test_public_math_cases_are_math_verify_verdicts_and_agree_with_labels_as_often(grader):
    cases = MATH_CASES + GOLD_CASES
    groups = [([c["response"]], c["gold"], "math") for c in cases]
    ours = [row[0] for row in grader.grade_groups(groups)]
    ref, plain = zip(*(_reference_and_plain(c["gold"], c["response"]) for c in cases))
    expected = [c["expected"] for c in cases]
    differ = [(c["gold"], c["response"]) for c, a, b in zip(cases, ours, ref) if a != b]
    assert len(cases) >= 380 and not differ, differ
    # plain math-verify differs only where the gold is boxed: it reads nothing or a fragment of a bare expression
    unlike_plain = [c for c, a, b in zip(cases, ours, plain) if a != b]
    assert all(math_gold_text(c["gold"]) != c["gold"].strip() for c in unlike_plain), unlike_plain
    agree_ours = sum(a == e for a, e in zip(ours, expected))
    agree_plain = sum(a == e for a, e in zip(plain, expected))
    right = sum(a == c["expected"] for a, c in zip(ours, cases) if c in unlike_plain)
    print(f"\npublic math cases: {len(cases)}; grade == plain math-verify on {len(cases) - len(unlike_plain)}; of the "
          f"{len(unlike_plain)} others the label sides with grade on {right}; labels agree with grade {agree_ours}, "
          f"plain math-verify {agree_plain}; grade == reference on all; paths {grader.stats}")
    assert agree_ours >= agree_plain + 5 and right >= 2 * (len(unlike_plain) - right)
    assert agree_ours >= 0.85 * len(cases)


# (gold, public response): prose golds with inline math and "answer is X" golds, read as written
AS_WRITTEN = [("odd $n$", "odd $n$"),
              (r"$g(x)=\frac{1}{3} ((2x)^a +(2x)^{-a})$ for some $a>0$",
               r"$g(x)=\frac{1}{3} ((2x)^a +(2x)^{-a})$ for some $a>0$"),
              ("answer is 10000", r"Area equals \boxed{10^4} square units"),
              ("answer is 0.25 + 3", r"Result: \boxed{(1/2)^{2} + \sqrt{9}}"),
              ("answer is 0.6666667", r"The final answer is \boxed{2/3}.")]
# (gold, response): bare expressions plain math-verify reads a fragment of (3, -2, 1/2), so that it accepts a
# wrong answer; boxed, the whole gold is compared (constructed pairs, not public labels)
FRAGMENTS = [(r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{3}"), ("10, 4, -2", r"\boxed{-2}"),
             (r"918\frac{1}{2}", r"\boxed{\frac{1}{2}}"), (r"3\sqrt{2}", r"so \boxed{3}"), ("5x - 7y + 4 = 0", "x = 0")]


def test_golds_as_plain_math_verify_reads_them_unless_it_reads_nothing_or_a_fragment(grader):
    for gold, response in AS_WRITTEN:
        assert math_gold_text(gold) == gold
        assert grader.grade(response, gold) is _verify(gold, response) is True, gold
    assert grader.grade("10", r"\$10") and not _verify(r"\$10", "10")  # math-verify finds nothing in "\$10"
    for gold, response in FRAGMENTS:
        assert math_gold_text(gold) == f"\\boxed{{{gold}}}"
        assert _verify(gold, response) and not grader.grade(response, gold), gold
    assert grader.grade(r"so \boxed{\left(3, \frac{\pi}{2}\right)}", FRAGMENTS[0][0])
    assert grader.grade(r"\boxed{10, 4, -2}", "10, 4, -2") and grader.grade(r"\boxed{918.5}", r"918\frac{1}{2}")


@pytest.mark.parametrize("gold, text", [("18", "18"), ("2,3", r"\boxed{2,3}"), ("1,000", "1,000"), ("18.", "18."),
                                        ("4 solutions", "4 solutions"), ("3 and 5", r"\boxed{3 and 5}"),
                                        (r"3*sqrt(2)", r"\boxed{3*sqrt(2)}"), ("2**(1/4)", "2**(1/4)"),
                                        ("Yes", r"\boxed{Yes}"), ("$x^2+1$", "$x^2+1$"), ("{1", "${1$"),
                                        (r"\(\frac{1}{2}\)", r"\(\frac{1}{2}\)"),
                                        (r"\dfrac{1}{3}", r"\boxed{\dfrac{1}{3}}")])
def test_gold_reading(gold, text):
    assert math_gold_text(gold) == text


def test_fast_path_parse_of_golds_equals_math_verify_parse():
    import math_verify
    from sympy import srepr

    decided = 0
    for text in {math_gold_text(c["gold"]) for c in MATH_CASES + GOLD_CASES}:
        if (fast := grading_fast.fast_parse(text)) is not None:
            decided += 1
            assert [v if isinstance(v, str) else srepr(v) for v in fast] == \
                [v if isinstance(v, str) else srepr(v) for v in math_verify.parse(text)], text
    assert decided >= 80


def _variants(rng: random.Random) -> list[tuple[str, str]]:
    """(gold, response) pairs in the shapes rollouts take: boxed or not, numbers in many spellings."""
    golds = ["18", "-7", "0", "1000", "0.75", "3.5", r"\frac{3}{4}", r"-\frac{1}{2}", r"\frac{10}{4}", "25",
             r"\dfrac{7}{3}", "2,1", r"\sqrt{2}", "x^2+1", r"(3, \frac{\pi}{2})", r"\{1,2,3\}", "12.50", "007"]
    answers = ["18", "19", "-7", "7", "0", "0.0", "1,000", "1000", "1000.0", ".75", "0.75", r"\frac34",
               r"\frac{3}{4}", "3/4", "75\\%", "3.5", r"\frac{7}{2}", "-0.5", r"-\frac{1}{2}", "2.5", r"\frac{5}{2}",
               r"\$25", r"25\text{ cm}", "25.0000001", "2.333333", r"\frac{7}{3}", "1, 2", r"\sqrt 2", "1.414214",
               "x^2 + 1", r"\left( 3, \frac{\pi}{2} \right)", "{1, 2, 3}", "12.5", "7", "08", "12.500"]
    frames = [r"So the answer is \boxed{{{a}}}. \confidence{{0.8}}", r"Thus $\boxed{{{a}}}$", "The final answer is {a}",
              "Answer: ${a}$", r"We get $x = {a}$.", "{a}", r"\boxed{{{a}}} or maybe \boxed{{{b}}}",
              r"\boxed{{{a}}}, \boxed{{{b}}}", r"first \boxed{{{b}}}, and after checking again the value is \boxed{{{a}}}",
              "<think>it could be {b}</think> the answer is {a}", r"\[ {a} \]"]
    pairs = []
    for _ in range(160):
        a, b = rng.choice(answers), rng.choice(answers)
        pairs.append((rng.choice(golds), rng.choice(frames).format(a=a, b=b)))
    return pairs


def test_generated_variants_equal_plain_math_verify(grader):
    pairs = _variants(random.Random(0))
    before = dict(grader.stats)
    ours = [row[0] for row in grader.grade_groups([([r], g, "math") for g, r in pairs])]
    ref = [reference(g, r) for g, r in pairs]
    differ = [(g, r, a, b) for (g, r), a, b in zip(pairs, ours, ref) if a != b]
    assert not differ, differ
    fast = grader.stats["fast"] - before["fast"]
    assert fast >= len(pairs) // 4 and any(ours) and not all(ours)  # the fast path decided many of them


@pytest.mark.parametrize("text", ["18", "-7", "007", "0", "-0", "3.5", "12.50", "-0.125", "1000000000000000000001",
                                  "2.71828182845904523536", r"\frac{3}{4}", r"-\frac{1}{2}", r"\frac{10}{4}",
                                  r"\frac{4}{2}", r"\frac{0}{5}"])
def test_fast_path_builds_what_latex2sympy_builds(text):
    from latex2sympy2_extended.latex2sympy2 import latex2sympy
    from sympy import srepr

    parsed = latex2sympy(text, is_real=True, convert_degrees=False, normalization_config=None)
    assert srepr(grading_fast._plain_number(text)) == srepr(parsed)
    assert grading_fast._plain_number("2.718281828459045235360") is None  # too long for the fast path: the pool


def test_fast_path_parse_equals_math_verify_parse():
    import math_verify
    from sympy import srepr

    decided = 0
    for text in [r"so \boxed{18} \confidence{0.9}", "The final answer is 3.5", r"Answer: $-\frac{1}{2}$", "x", "",
                 r"$\frac{7}{3}$ and then 12", r"\boxed{1,000}", r"\boxed{x+1}", "It is 42 percent", "so 0012",
                 "-7 apples", "it is 1,000.50 dollars", "we get -0.25.", "0", "costs $18", "x = 007.5", "12,5",
                 "2.718281828459045235360287", r"\boxed{-0.125}", r"\boxed{3.0}", r"\boxed{0.5}"]:
        fast = grading_fast.fast_parse(text)
        decided += fast is not None
        if fast is not None:
            assert [srepr(v) if not isinstance(v, str) else v for v in fast] == \
                [srepr(v) if not isinstance(v, str) else v for v in math_verify.parse(text)], text
    assert decided >= 15


def test_public_choice_cases_as_harnesses_read_them(grader):
    """Every case agrees with its label: free-text golds ("Alina and the answer is\\n(C) Cecile") and answers
    in French and Chinese included."""
    verdicts = grader.grade_groups([([c["response"]], c["gold"], "choice") for c in CHOICE_CASES])
    wrong = [c for c, (v,) in zip(CHOICE_CASES, verdicts) if v != c["expected"]]
    assert len(CHOICE_CASES) >= 21 and not wrong, wrong


@pytest.mark.parametrize("response, letter", [
    ("Die Antwort ist B, nicht A", "B"), ("Ответ: C", "C"), ("所以答案是D，不是A", "D"), ("答案：B", "B"),
    ("La respuesta es (C).", "C"), ("Jawaban yang benar adalah B", "B"), ("The answer is B。", "B"),
    ("Svaret er B", "B"), ("It is A, no: B. The answer is C", "C"),
])
def test_answer_is_in_other_languages(response, letter):
    from corea.grading.answers import extract_choice

    assert extract_choice(response) == letter


def test_choice_extraction_is_linear_in_the_text():
    import time

    from corea.grading.answers import extract_choice

    for text in ("answer " * 9000, "réponse " * 8000, "答案" * 30000, "answer is " * 6000, "(" * 64000, "B" * 64000):
        start = time.perf_counter()
        extract_choice(text)
        assert time.perf_counter() - start < 2.0, text[:20]


def test_two_stage_parsing_gives_the_ll_parse(monkeypatch):
    """The workers parse LaTeX in ANTLR's SLL mode first, LL on an error: every public case's gold and answer
    parses to what latex2sympy's default (LL) parse gives, or fails as it does, and SLL is really used."""
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended import latex2sympy2

    from corea.grading.worker import _install_two_stage_parsing

    def outcome(text):
        try:
            return str(latex2sympy2.latex2sympy(text))
        except Exception as exc:  # a syntax error or an unsupported construct: the same either way
            return type(exc).__name__

    texts = sorted({t for case in MATH_CASES for t in (case["gold"], case["response"]) if len(t) < 300})
    ll = [outcome(t) for t in texts]
    converter, modes = latex2sympy2._Latex2Sympy, []
    monkeypatch.setattr(converter, "parse", converter.parse)  # restored after the test
    original = converter.create_parser

    def recording(self, latex_str):
        parser = original(self, latex_str)
        modes.append(lambda: parser._interp.predictionMode)
        return parser

    monkeypatch.setattr(converter, "create_parser", recording)
    _install_two_stage_parsing(latex2sympy2)
    assert [outcome(t) for t in texts] == ll
    assert PredictionMode.SLL in {mode() for mode in modes}
