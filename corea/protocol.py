"""The COREA prompt protocol: the instruction, prompt building and response parsing.

A response states its final answer in the last ``\\boxed{...}`` (balanced braces, nesting allowed) and its
confidence in the last ``\\confidence{...}`` that holds a number. A number outside [0, 1], NaN or inf is an
invalid confidence (``None``). Parsing is one linear pass over the text, so a 1 MB response or 10,000
nested braces cost milliseconds, never a hang.

Which answer is used where: the last-box answer of ``parse_response`` is what the cascade and the serving API
show users, and what the format reward checks (an answer present). Correctness is not read from it: it is
math-verify's verdict on the whole response (``corea.grading``: boxed answers first, several close boxes as one
set, then its LaTeX and number fallbacks), or the harness-style option letter for multiple choice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

INSTRUCTION = (
    "Please reason step by step, and put your final answer within \\boxed{}, then output the confidence "
    "(0.0-1.0) that your answer is correct within \\confidence{}."
)

CHOICE_LETTERS = "ABCDEFGHIJ"

# One token stream for the whole parse: escaped braces (ignored), the two commands, and plain braces.
_TOKENS = re.compile(r"\\[{}]|\\(boxed|confidence)\s*\{|[{}]")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_MAX_CONFIDENCE_CHARS = 64

# Scripts whose letters mark the language of a text; Greek is left out on purpose (pi, theta in maths).
_SCRIPTS = {
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
    "cjk": re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]"),
    "hangul": re.compile(r"[\uac00-\ud7af]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff]"),
    "hebrew": re.compile(r"[\u0590-\u05ff]"),
    "devanagari": re.compile(r"[\u0900-\u097f]"),
    "thai": re.compile(r"[\u0e00-\u0e7f]"),
}
# LaTeX command names (\boxed, \frac, \confidence) and $...$ maths are notation, not language.
_NOTATION = re.compile(r"\\[A-Za-z]+|\$[^$]*\$")
#: Share of a response's script letters allowed outside the prompt's scripts before it counts as a switch.
LANGUAGE_SWITCH_TOLERANCE = 0.02


@dataclass(frozen=True)
class ParsedResponse:
    """What the reward and the cascade need from one response."""

    answer: str | None  # content of the last complete \boxed{...}: shown to users, checked by the format reward
    confidence: float | None  # last \confidence{number}, None when absent or invalid
    confidence_text: str | None  # raw content of that \confidence{...}, for logging invalid values

    @property
    def has_answer(self) -> bool:
        return self.answer is not None and self.answer.strip() != ""

    @property
    def has_confidence(self) -> bool:
        return self.confidence is not None


def build_prompt(question: str, choices: Sequence[str] | None = None) -> str:
    """The user turn: the question, its lettered options if any, then the COREA instruction."""
    text = question.strip()
    if choices:
        if len(choices) > len(CHOICE_LETTERS):
            raise ValueError(f"at most {len(CHOICE_LETTERS)} choices are supported, got {len(choices)}")
        options = "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))
        text = f"{text}\nAnswer Choices:\n{options}"
    return f"{text}\n{INSTRUCTION}"


def chat_messages(question: str, choices: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The prompt as a one-turn chat, ready for a tokenizer's chat template."""
    return [{"role": "user", "content": build_prompt(question, choices)}]


def _as_text(text: str | bytes) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    return text


def _command_spans(text: str) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """Content spans of the last complete \\boxed{} and of every complete \\confidence{}, in one pass.

    A brace stack records, for each open brace, which command (if any) opened it; a command's span ends at
    its matching close brace. Unbalanced trailing commands (a truncated response) are simply incomplete.
    """
    stack: list[tuple[str | None, int]] = []
    last_boxed: tuple[int, int] | None = None
    confidences: list[tuple[int, int]] = []
    for match in _TOKENS.finditer(text):
        token = match.group(0)
        if token[0] == "\\" and len(token) == 2:  # \{ or \}
            continue
        if token == "}":
            if not stack:
                continue
            command, start = stack.pop()
            if command == "boxed":  # closes arrive in text order, so the latest is the last box
                last_boxed = (start, match.start())
            elif command == "confidence":
                confidences.append((start, match.start()))
        else:
            stack.append((match.group(1), match.end()))
    return last_boxed, confidences


def parse_confidence(raw: str) -> float | None:
    """A confidence in [0, 1] from the text of a \\confidence{}; None when not a valid number."""
    value = raw.strip().strip("$").strip()
    if len(value) > _MAX_CONFIDENCE_CHARS or not _NUMBER.fullmatch(value):
        return None
    number = float(value)
    if math.isnan(number) or math.isinf(number) or not 0.0 <= number <= 1.0:
        return None
    return number


def parse_response(text: str | bytes) -> ParsedResponse:
    """Extract the answer (last \\boxed{}) and the confidence (last \\confidence{} holding a number)."""
    text = _as_text(text)
    boxed, confidences = _command_spans(text)
    answer = text[boxed[0] : boxed[1]] if boxed else None
    confidence, confidence_text = None, None
    for start, end in reversed(confidences):
        raw = text[start:end]
        candidate = raw.strip().strip("$").strip()
        if len(candidate) <= _MAX_CONFIDENCE_CHARS and _NUMBER.fullmatch(candidate):
            confidence, confidence_text = parse_confidence(raw), raw
            break
        if confidence_text is None:
            confidence_text = raw
    return ParsedResponse(answer=answer, confidence=confidence, confidence_text=confidence_text)


def script_counts(text: str) -> dict[str, int]:
    """Number of letters of each tracked script in ``text``, LaTeX commands and $...$ maths left out."""
    text = _NOTATION.sub(" ", text)
    if text.isascii():  # only Latin letters can occur: one pass instead of one per script
        return {name: len(pattern.findall(text)) if name == "latin" else 0 for name, pattern in _SCRIPTS.items()}
    return {name: len(pattern.findall(text)) for name, pattern in _SCRIPTS.items()}


def language_consistent(response: str | bytes, prompt: str | None = None) -> bool:
    """True unless more than ``LANGUAGE_SWITCH_TOLERANCE`` of the response's letters are in a script
    the prompt does not use. Without a prompt, the response's own dominant script stands in for it."""
    counts = script_counts(_as_text(response))
    total = sum(counts.values())
    if total == 0:
        return True
    if prompt is not None:
        allowed = {name for name, n in script_counts(prompt).items() if n > 0} or {"latin"}
    else:
        allowed = {max(counts, key=counts.get)}
    foreign = sum(n for name, n in counts.items() if name not in allowed)
    return foreign / total <= LANGUAGE_SWITCH_TOLERANCE
