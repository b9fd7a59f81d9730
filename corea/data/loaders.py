"""Loaders: one local file (``.jsonl``, ``.json``, ``.csv`` or ``.parquet``) -> ``list[Record]``.

Each loader accepts the layout of the shipped fixtures and the public layout of its dataset (field aliases
such as ``problem``/``unique_id`` for MATH-500 or ``answerKey`` for CommonsenseQA). Long fields (solutions,
reasoning traces) are dropped; short descriptive fields go to ``Record.meta``.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any, Sequence

from corea.grading.answers import normalize_choice_gold
from corea.data.readers import Row, read_rows
from corea.data.records import DatasetError, Kind, Record, check_unique_ids
from corea.protocol import CHOICE_LETTERS

PathLike = str | Path


def _records(path: PathLike, build, columns: Sequence[str] | None = None) -> list[Record]:
    records = []
    for row in read_rows(path, columns):
        try:
            records.append(build(row))
        except ValueError as exc:  # Record validation; DatasetError (a ValueError) passes through as is
            if isinstance(exc, DatasetError):
                raise
            raise row.error(str(exc)) from None
    check_unique_ids(records, str(path))
    return records


def _row_id(row: Row, prefix: str, *names: str) -> str:
    for name in names or ("id",):
        if row.has(name):
            return str(row.data[name])
    return f"{prefix}_{row.index}"


def _meta(row: Row, *names: str) -> dict[str, Any]:
    return {name: row.data[name] for name in names if row.has(name)}


# --- DeepMath-103K -------------------------------------------------------------------------------------


def load_deepmath(path: PathLike) -> list[Record]:
    """DeepMath-103K: the published parquet schema (question, final_answer, difficulty, topic,
    r1_solution_1..3, the solutions ignored; ids ``deepmath_<row>``) or the sample layout (id, question, answer)."""

    def build(row: Row) -> Record:
        return Record(
            id=_row_id(row, "deepmath"),
            question=row.text("question"),
            gold=row.text("final_answer", "answer"),
            kind="math",
            dataset="deepmath",
            meta=_meta(row, "difficulty", "topic"),
        )

    return _records(path, build, columns=("id", "question", "final_answer", "answer", "difficulty", "topic"))


def _split_key(seed: int, record_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{record_id}".encode("utf-8")).digest()


def split_deepmath(
    records: Sequence[Record], n_train: int = 16000, n_eval: int = 500, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Deterministic, disjoint (train, eval) split.

    Records are ordered by ``sha256(f"{seed}\\0{id}")``, which depends only on the seed and the ids (not on
    file order, process or ``PYTHONHASHSEED``); eval takes the first ``n_eval``, train the next ``n_train``.
    With fewer than ``n_train + n_eval`` rows, eval gets ``min(n_eval, len // 2)`` (all rows up to ``n_eval``
    when ``n_train == 0``) and train the rest, up to ``n_train``.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    check_unique_ids(records, "split_deepmath")
    total = len(records)
    if total >= n_train + n_eval:
        eval_size, train_size = n_eval, n_train
    else:
        eval_size = min(n_eval, total if n_train == 0 else total // 2)
        train_size = min(n_train, total - eval_size)
    ordered = sorted(records, key=lambda r: _split_key(seed, r.id))
    return ordered[eval_size : eval_size + train_size], ordered[:eval_size]


# --- open-ended maths ---------------------------------------------------------------------------------


def load_math500(path: PathLike) -> list[Record]:
    """MATH-500: id (or unique_id), question (or problem), answer; subject and level kept in meta."""

    def build(row: Row) -> Record:
        return Record(
            id=_row_id(row, "math500", "id", "unique_id"),
            question=row.text("question", "problem"),
            gold=row.text("answer"),
            kind="math",
            dataset="math500",
            meta=_meta(row, "subject", "level"),
        )

    return _records(path, build)


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def load_gsm8k(path: PathLike) -> list[Record]:
    """GSM8K: id, question, answer; an official ``... #### 18`` answer is reduced to ``18`` (commas removed)."""

    def build(row: Row) -> Record:
        answer = row.text("answer")
        match = _GSM8K_FINAL.search(answer)
        if match:
            answer = match.group(1).replace(",", "").strip()
        return Record(
            id=_row_id(row, "gsm8k"),
            question=row.text("question"),
            gold=answer,
            kind="math",
            dataset="gsm8k",
        )

    return _records(path, build)


def load_olympiadbench(path: PathLike) -> list[Record]:
    """OlympiadBench (English, text-only, open-ended): id, question, answer (or the official ``final_answer``
    list, whose first item is used with ``$`` removed); answer_type, unit, subfield kept in meta."""

    def build(row: Row) -> Record:
        if row.has("answer"):
            gold = row.text("answer")
        else:
            final = row.value("final_answer")
            first = final[0] if isinstance(final, (list, tuple)) and final else final
            gold = str(first).replace("$", "").strip()
            if not gold:
                raise row.error("field 'final_answer' is empty")
        return Record(
            id=_row_id(row, "olympiadbench"),
            question=row.text("question"),
            gold=gold,
            kind="math",
            dataset="olympiadbench",
            meta=_meta(row, "answer_type", "unit", "subfield", "is_multiple_answer"),
        )

    return _records(path, build)


# --- multiple choice ----------------------------------------------------------------------------------


def _choice_options(row: Row, raw: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(labels, texts) from ``{label: [...], text: [...]}`` or ``[{label, text}, ...]``, ordered by label."""
    if isinstance(raw, dict):
        labels, texts = raw.get("label"), raw.get("text")
        if labels is None or texts is None or len(labels) != len(texts):
            raise row.error("field 'choices' needs 'label' and 'text' lists of equal length")
        pairs = list(zip(labels, texts))
    elif isinstance(raw, (list, tuple)):
        if all(isinstance(c, dict) for c in raw):
            pairs = [(c.get("label"), c.get("text")) for c in raw]
        else:  # a plain list of option texts, lettered in order
            pairs = [(CHOICE_LETTERS[i] if i < len(CHOICE_LETTERS) else str(i), c) for i, c in enumerate(raw)]
    else:
        raise row.error(f"field 'choices' must be a list or a {{label, text}} object, got {type(raw).__name__}")
    if any(label is None or text is None for label, text in pairs):
        raise row.error("field 'choices' has an option without label or text")
    pairs.sort(key=lambda p: str(p[0]))
    labels = tuple(str(p[0]).strip().upper() for p in pairs)
    if labels != tuple(CHOICE_LETTERS[: len(labels)]):
        raise row.error(f"field 'choices' labels must be A, B, C... in order, got {list(labels)}")
    return labels, tuple(str(p[1]) for p in pairs)


def _letter(row: Row, options: Sequence[str], *names: str) -> str:
    """The answer letter from the first present of ``names``, written ``X``, ``(X) text`` or ``X text``
    (``corea.grading.answers.normalize_choice_gold``), checked against the options; a text after the letter
    must name that option."""
    raw, name = row.text(*names), next(n for n in names if row.has(n))
    letters = CHOICE_LETTERS[: len(options)]
    try:
        letter = normalize_choice_gold(raw)
    except ValueError:
        letter = None
    if letter is None and len(raw.strip()) > 1:
        raise row.error(f"field '{name}' must be a letter {', '.join(letters)}, '(X) text' or 'X text', got {raw!r}")
    if letter is None or letter not in letters:
        raise row.error(f"field '{name}' must be one of {', '.join(letters)}, got {raw!r}")
    text = " ".join(re.sub(r"^\(?[A-J]\)?[.):]?", "", raw.strip(), flags=re.I).split()).lower()
    option = " ".join(options[letters.index(letter)].split()).lower()
    if text and text not in option and option not in text:
        raise row.error(f"field '{name}' is {raw!r} but option {letter} is {options[letters.index(letter)]!r}")
    return letter


def load_commonsenseqa(path: PathLike) -> list[Record]:
    """CommonsenseQA: question, choices ``{label, text}``, answer letter (or ``answerKey``); the official
    layout with ``question: {stem, choices: [{label, text}]}`` is accepted too."""

    def build(row: Row) -> Record:
        question = row.value("question")
        if isinstance(question, dict):  # official jsonl layout
            inner = Row(row.source, row.where, row.index, question)
            text, raw_choices = inner.text("stem"), inner.value("choices")
            concept = question.get("question_concept")
        else:
            text, raw_choices = row.text("question"), row.value("choices")
            concept = row.optional("question_concept")
        _, options = _choice_options(row, raw_choices)
        return Record(
            id=_row_id(row, "commonsenseqa"),
            question=text,
            gold=_letter(row, options, "answer", "answerKey"),
            kind="choice",
            choices=options,
            dataset="commonsenseqa",
            meta={"question_concept": concept} if concept else {},
        )

    return _records(path, build)


GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def gpqa_order(question: str, seed: int = 0) -> list[int]:
    """The fixed option order for one GPQA question: a permutation of [0 (correct), 1, 2, 3 (incorrect)],
    seeded by ``sha256(f"{seed}\\0{question}")`` so it is the same in every process and file order."""
    digest = hashlib.sha256(f"{seed}\x00{question}".encode("utf-8")).digest()
    order = [0, 1, 2, 3]
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def load_gpqa(path: PathLike, seed: int = 0) -> list[Record]:
    """GPQA, official CSV layout (Question, Correct Answer, Incorrect Answer 1..3; id from ``Record ID`` or
    ``id``, else ``gpqa_<row>``). Options are shuffled per question (:func:`gpqa_order`), gold is the letter."""

    def build(row: Row) -> Record:
        question = row.text(GPQA_FIELDS[0])
        answers = [row.text(name) for name in GPQA_FIELDS[1:]]
        order = gpqa_order(question, seed)
        meta = {"correct_answer": answers[0]}
        for key, name in (("subdomain", "Subdomain"), ("domain", "High-level domain")):
            if row.has(name):
                meta[key] = row.data[name]
        return Record(
            id=_row_id(row, "gpqa", "Record ID", "id"),
            question=question,
            gold=CHOICE_LETTERS[order.index(0)],
            kind="choice",
            choices=tuple(answers[i] for i in order),
            dataset="gpqa",
            meta=meta,
        )

    return _records(path, build)


# --- users' own data ----------------------------------------------------------------------------------


def load_qa(path: PathLike, dataset: str = "custom", kind: Kind | None = None) -> list[Record]:
    """A generic layout: id (optional), question (or problem), answer (or gold / final_answer), and for
    multiple choice ``choices`` (list of texts, list of {label, text}, or {label, text} lists) with a letter
    answer. ``kind`` is inferred per row from the presence of ``choices`` unless given."""

    def build(row: Row) -> Record:
        row_kind = kind or ("choice" if row.has("choices") else "math")
        choices = _choice_options(row, row.value("choices"))[1] if row_kind == "choice" else None
        names = ("answer", "gold", "final_answer")
        return Record(
            id=_row_id(row, dataset),
            question=row.text("question", "problem"),
            gold=_letter(row, choices, *names) if choices else row.text(*names),
            kind=row_kind,
            choices=choices,
            dataset=dataset,
        )

    return _records(path, build)
