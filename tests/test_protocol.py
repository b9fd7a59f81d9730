"""Unit tests of the COREA prompt protocol: response parsing, prompt building, language consistency."""

from __future__ import annotations

import math
import time

import pytest

from corea.protocol import (
    INSTRUCTION,
    build_prompt,
    chat_messages,
    language_consistent,
    parse_confidence,
    parse_response,
)

# The instruction exactly as the method specifies it.
PAPER_INSTRUCTION = (
    "Please reason step by step, and put your final answer within \\boxed{}, then output the confidence "
    "(0.0-1.0) that your answer is correct within \\confidence{}."
)


# ------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    "text, answer",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed {5}", "5"),
        (r"first \boxed{1}, then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{12} and then \boxed{3", "12"),  # a truncated box is not an answer
        (r"\boxed{a{b}c}", "a{b}c"),
        ("no box at all", None),
        (r"\boxed{3", None),
    ],
)
def test_answer_is_the_last_complete_box(text, answer):
    assert parse_response(text).answer == answer


def test_empty_box_has_no_answer():
    parsed = parse_response(r"\boxed{} \confidence{0.5}")
    assert parsed.answer == "" and not parsed.has_answer and parsed.has_confidence


# ---------------------------------------------------------------------------------------- confidence
@pytest.mark.parametrize(
    "text, confidence",
    [
        (r"\confidence{0.8}", 0.8),
        (r"\confidence{ 1 }", 1.0),
        (r"\confidence{0}", 0.0),
        (r"\confidence{.25}", 0.25),
        (r"\confidence{1e-1}", 0.1),
        (r"\confidence{$0.7$}", 0.7),
        (r"\confidence{0.2} then \confidence{0.9}", 0.9),  # the last one holding a number
        (r"\confidence{0.9} then \confidence{high}", 0.9),  # a non-number is skipped
        (r"\confidence{0.9} then \confidence{1.5}", None),  # the last number is out of range
        (r"\confidence{1.5}", None),
        (r"\confidence{-0.1}", None),
        (r"\confidence{nan}", None),
        (r"\confidence{NaN}", None),
        (r"\confidence{inf}", None),
        (r"\confidence{-inf}", None),
        (r"\confidence{high}", None),
        (r"\confidence{80%}", None),
        (r"\confidence{0.8", None),  # truncated
        ("no confidence", None),
    ],
)
def test_confidence(text, confidence):
    assert parse_response(text).confidence == confidence


def test_invalid_confidence_keeps_its_text():
    parsed = parse_response(r"\boxed{1} \confidence{1.5}")
    assert parsed.confidence is None and parsed.confidence_text == "1.5" and not parsed.has_confidence


@pytest.mark.parametrize("raw", ["nan", "inf", "1.0000001", "-0.5", "2", "x", "0.5.5", "9" * 100])
def test_parse_confidence_rejects(raw):
    assert parse_confidence(raw) is None


def test_parse_confidence_accepts_bounds():
    assert parse_confidence("0") == 0.0 and parse_confidence("1.0") == 1.0
    assert not math.isnan(parse_confidence(" 0.5 "))


# --------------------------------------------------------------------------------- robustness / speed
def test_ten_thousand_nested_braces():
    inner = "{" * 10_000 + "x" + "}" * 10_000
    start = time.perf_counter()
    parsed = parse_response(r"\boxed{" + inner + r"} \confidence{0.3}")
    assert time.perf_counter() - start < 1.0
    assert parsed.answer == inner and parsed.confidence == 0.3


def test_unbalanced_deep_nesting_is_fast():
    start = time.perf_counter()
    parsed = parse_response(r"\boxed{" + "{" * 100_000)
    assert time.perf_counter() - start < 1.0 and parsed.answer is None


def test_one_megabyte_response_is_fast():
    text = "word " * 200_000 + r"\boxed{7} \confidence{0.6}"
    assert len(text) > 1_000_000
    start = time.perf_counter()
    parsed = parse_response(text)
    assert time.perf_counter() - start < 1.0
    assert parsed.answer == "7" and parsed.confidence == 0.6


def test_many_boxes_and_confidences_are_linear():
    text = r"\boxed{1} \confidence{0.1} " * 50_000 + r"\boxed{2} \confidence{0.2}"
    start = time.perf_counter()
    parsed = parse_response(text)
    assert time.perf_counter() - start < 2.0
    assert parsed.answer == "2" and parsed.confidence == 0.2


def test_invalid_utf8_bytes_and_surrogates():
    parsed = parse_response(b"\\boxed{\xff\xfe} \\confidence{0.5}")
    assert parsed.answer == "\ufffd\ufffd" and parsed.confidence == 0.5
    parsed = parse_response("\\boxed{\ud800} \\confidence{0.4}")
    assert parsed.answer == "\ud800" and parsed.confidence == 0.4


# ------------------------------------------------------------------------------------------- prompts
def test_instruction_is_verbatim():
    assert INSTRUCTION == PAPER_INSTRUCTION
    assert build_prompt("What is 2+2?") == "What is 2+2?\n" + PAPER_INSTRUCTION


def test_choices_are_lettered():
    prompt = build_prompt("Pick one.", ["red", "green", "blue"])
    assert prompt == f"Pick one.\nAnswer Choices:\n(A) red\n(B) green\n(C) blue\n{PAPER_INSTRUCTION}"


def test_too_many_choices():
    with pytest.raises(ValueError):
        build_prompt("?", [str(i) for i in range(11)])


def test_chat_messages():
    assert chat_messages("Q") == [{"role": "user", "content": build_prompt("Q")}]


# ------------------------------------------------------------------------------------------ language
@pytest.mark.parametrize(
    "prompt, response, consistent",
    [
        ("What is 2+2?", r"Two plus two is four, so \boxed{4}.", True),
        ("What is 2+2?", r"We compute $\alpha + \beta = \pi$, so \boxed{\pi}.", True),  # Greek is maths
        ("What is 2+2?", "Two plus two 等于四，所以答案是四。因此最后答案是四。", False),
        ("2加2等于多少？", "2加2等于4，所以答案是 \\boxed{4}。", True),
        ("What is 2+2?", "Answer: 4", True),
        ("What is 2+2?", "4 = 2 + 2", True),  # no letters at all
        ("Сколько будет 2+2?", "Два плюс два равно четырём, \\boxed{4}.", True),
        ("What is 2+2?", "Два плюс два равно четырём.", False),
    ],
)
def test_language_consistent(prompt, response, consistent):
    assert language_consistent(response, prompt) is consistent


def test_language_consistent_without_prompt_uses_dominant_script():
    assert language_consistent("All English here, nothing else.")
    assert not language_consistent("Mostly English text here with a long tail " + "中文" * 20)
    assert language_consistent(b"bytes \xff work too")
