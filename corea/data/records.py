"""The typed question record shared by every dataset, and the error a bad dataset raises."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from corea.protocol import CHOICE_LETTERS, build_prompt, chat_messages

Kind = Literal["math", "choice"]
KINDS = ("math", "choice")


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or holds a malformed row; the message names file, line, field."""


@dataclass(frozen=True)
class Record:
    """One evaluation or training question.

    ``gold`` is the short final answer: a math expression for ``kind="math"``, the option letter (``"A"``...)
    for ``kind="choice"``, whose option texts are ``choices`` in display order.
    """

    id: str
    question: str
    gold: str
    kind: Kind
    choices: tuple[str, ...] | None = None
    dataset: str = "custom"
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"record {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
        if self.kind == "choice":
            if not self.choices:
                raise ValueError(f"record {self.id!r}: a 'choice' record needs choices")
            if len(self.choices) > len(CHOICE_LETTERS):
                raise ValueError(f"record {self.id!r}: at most {len(CHOICE_LETTERS)} choices, got {len(self.choices)}")
            if self.gold not in self.letters:
                raise ValueError(f"record {self.id!r}: gold {self.gold!r} is not one of {self.letters}")
        elif self.choices:
            raise ValueError(f"record {self.id!r}: a 'math' record has no choices")

    @property
    def letters(self) -> tuple[str, ...]:
        """Option letters in display order (empty for math)."""
        return tuple(CHOICE_LETTERS[: len(self.choices or ())])

    @property
    def gold_text(self) -> str:
        """The correct option's text for a choice record, else the gold answer itself."""
        if self.kind == "choice":
            return self.choices[CHOICE_LETTERS.index(self.gold)]  # type: ignore[index]
        return self.gold

    def prompt(self) -> str:
        """The user prompt: question, lettered options if any, then the COREA instruction."""
        return build_prompt(self.question, self.choices)

    def messages(self) -> list[dict[str, str]]:
        """The prompt as a one-turn chat."""
        return chat_messages(self.question, self.choices)

    def to_row(self) -> dict[str, Any]:
        """A flat dict of plain types (``meta`` as a JSON string) for Arrow / Ray Data; includes the prompt."""
        return {
            "id": self.id,
            "question": self.question,
            "gold": self.gold,
            "kind": self.kind,
            "choices": list(self.choices) if self.choices is not None else None,
            "dataset": self.dataset,
            "meta": json.dumps(dict(self.meta), ensure_ascii=False, default=str),
            "prompt": self.prompt(),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Record":
        """Inverse of :meth:`to_row` (extra keys such as ``prompt`` or model outputs are ignored)."""
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        choices = row.get("choices")
        return cls(
            id=str(row["id"]),
            question=str(row["question"]),
            gold=str(row["gold"]),
            kind=row["kind"],
            choices=tuple(choices) if choices is not None and len(choices) else None,
            dataset=str(row.get("dataset") or "custom"),
            meta=dict(meta),
        )


def records_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[Record]:
    """Records from rows made by :meth:`Record.to_row` (e.g. ``ray_dataset.take_all()``)."""
    return [Record.from_row(row) for row in rows]


def check_unique_ids(records: Sequence[Record], source: str) -> None:
    """Raise :class:`DatasetError` naming the first repeated id."""
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise DatasetError(f"{source}: duplicate id {record.id!r}")
        seen.add(record.id)
