"""COPE's planner and executor prompts, in one place.

The planner sees the question without the answer instruction and writes a one-line plan; the executor sees the
question, the plan and the usual instruction (``corea.protocol.INSTRUCTION``), and answers with a confidence.
"""

from __future__ import annotations

from corea.protocol import INSTRUCTION

PLAN_INSTRUCTION = "Write a short plan: the steps to take, in one line. Do not solve it."
EXECUTE_TEMPLATE = "{question}\nFollow this plan: {plan}\n"  # then INSTRUCTION (it holds braces)


def bare_question(content: str) -> str:
    """The user's question without the answer instruction (appended by the serving layer and the datasets)."""
    return content.replace(INSTRUCTION, "").rstrip()


def _with_last_user(messages: list[dict[str, str]], content: str) -> list[dict[str, str]]:
    idx = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [*messages[:idx], {"role": "user", "content": content}, *messages[idx + 1 :]]


def plan_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The planner's prompt for a chat whose last user message is the question."""
    question = bare_question(next(m for m in reversed(messages) if m["role"] == "user")["content"])
    return _with_last_user(messages, f"{question}\n{PLAN_INSTRUCTION}")


def execute_messages(messages: list[dict[str, str]], plan: str) -> list[dict[str, str]]:
    """The executor's prompt: the question, the plan, the instruction."""
    question = bare_question(next(m for m in reversed(messages) if m["role"] == "user")["content"])
    return _with_last_user(messages, EXECUTE_TEMPLATE.format(question=question, plan=plan.strip()) + INSTRUCTION)
