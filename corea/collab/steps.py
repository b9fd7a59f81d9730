"""The step splitter: a step ends at a blank line ``\\n\\n``, or at the final ``\\boxed{}`` / ``\\confidence{}``.

A step keeps its trailing ``\\n\\n`` so that concatenating the steps gives the text back exactly. The last step is
the remainder after the last blank line (it holds the final answer and confidence when the model wrote them).
"""

from __future__ import annotations

import re

STEP_END = "\n\n"
_BLANK = re.compile(r"\n\n+")


def split_steps(text: str) -> list[str]:
    """The steps of ``text``; ``"".join(split_steps(t)) == t``. A run of blank lines ends one step."""
    steps, start = [], 0
    for match in _BLANK.finditer(text):
        steps.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        steps.append(text[start:])
    return steps


def is_final(step: str) -> bool:
    """A step ends the answer when it does not end with a blank line (the model stopped: EOS or length) or it
    holds the final ``\\boxed{}`` or ``\\confidence{}``."""
    return not step.endswith(STEP_END) or "\\boxed{" in step or "\\confidence{" in step
