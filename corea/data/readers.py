"""Row readers for dataset files, chosen by suffix: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``; a local path or a
URI (``s3://bucket/data/test.jsonl``, a folder of parquet shards at ``s3://bucket/DeepMath-103K``: see
``corea.storage``), streamed from the store without a local copy.

Every row carries where it came from (``line 7`` for text files, 1-based; ``row 3`` for parquet, 0-based
row index), so a malformed row is reported as ``path line 7: field 'answer' is missing``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.fs as pafs

from corea import storage
from corea.data.records import DatasetError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One raw row and its location in its file."""

    source: str
    where: str
    index: int  # 0-based position among the file's rows
    data: dict[str, Any]

    def error(self, message: str) -> DatasetError:
        return DatasetError(f"{self.source} {self.where}: {message}")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def value(self, *names: str) -> Any:
        """The first of ``names`` present and not null; an error naming the first name if none is."""
        for name in names:
            if self.data.get(name) is not None:
                return self.data[name]
        raise self.error(f"field '{names[0]}' is missing")

    def text(self, *names: str) -> str:
        """Like :meth:`value` but a non-empty string (numbers are converted)."""
        value = self.value(*names)
        name = next(n for n in names if self.data.get(n) is not None)
        if isinstance(value, (dict, list, tuple)):
            raise self.error(f"field '{name}' must be text, got {type(value).__name__}")
        text = str(value).strip()
        if not text:
            raise self.error(f"field '{name}' is empty")
        return text

    def optional(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if self.data.get(name) is not None:
                return self.data[name]
        return default


class _File:
    """One local or URI file or folder: what the readers need of it."""

    def __init__(self, path: str | Path):
        self.fs, self.path = storage.filesystem(path) if storage.is_uri(path) else (None, Path(path))
        if self.fs is None:
            self.exists, self.is_dir = self.path.exists(), self.path.is_dir()
        else:
            kind = self.fs.get_file_info(self.path).type
            self.exists, self.is_dir = kind != pafs.FileType.NotFound, kind == pafs.FileType.Directory
        self.suffix = Path(str(self.path)).suffix

    def open(self, encoding: str, newline: str | None = None):
        if self.fs is None:
            return self.path.open(encoding=encoding, newline=newline)
        return io.TextIOWrapper(self.fs.open_input_stream(self.path), encoding=encoding, newline=newline)

    def read_text(self, encoding: str) -> str:
        with self.open(encoding) as handle:
            return handle.read()

    def parquet_files(self) -> list:
        if self.fs is None:
            return sorted(self.path.glob("*.parquet"))
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def read_rows(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[Row]:
    """Yield the rows of a local or URI file (a folder of parquet shards counts as one parquet file); raise
    :class:`DatasetError` for a missing or unreadable one. ``columns``: for parquet, read only those present
    (e.g. skip DeepMath's long ``r1_solution_*`` columns); other formats ignore it."""
    source = str(path)
    file = _File(path)
    if not file.exists:
        raise DatasetError(f"{source}: file not found")
    suffix = ".parquet" if file.is_dir else file.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(file, source)
    elif suffix == ".json":
        yield from _read_json(file, source)
    elif suffix == ".csv":
        yield from _read_csv(file, source)
    elif suffix == ".parquet":
        yield from _read_parquet(file, source, columns)
    else:
        raise DatasetError(f"{source}: unsupported file type {file.suffix!r} (expected one of {SUFFIXES})")


def _read_jsonl(path: _File, source: str) -> Iterator[Row]:
    index = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{source} line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise DatasetError(f"{source} line {number}: expected a JSON object, got {type(data).__name__}")
            yield Row(source, f"line {number}", index, data)
            index += 1


def _read_json(path: _File, source: str) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{source} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{source}: expected a JSON array of objects")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DatasetError(f"{source} item {index}: expected a JSON object, got {type(item).__name__}")
        yield Row(source, f"item {index}", index, item)


def _read_csv(path: _File, source: str) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames
            if not header:
                raise DatasetError(f"{source} line 1: missing CSV header")
            index = 0
            while True:
                start = reader.line_num + 1
                try:
                    data = next(reader)
                except StopIteration:
                    return
                where = f"line {start}"
                if None in data:
                    raise DatasetError(
                        f"{source} {where}: {len(header) + len(data[None])} fields, the header has {len(header)}"
                    )
                yield Row(source, where, index, {k: (v if v != "" else None) for k, v in data.items()})
                index += 1
        except csv.Error as exc:
            raise DatasetError(f"{source} line {reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: _File, source: str, columns: Sequence[str] | None) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        files = path.parquet_files() if path.is_dir else [path.path]
        if columns is not None:
            names = pq.read_schema(files[0], filesystem=path.fs).names
            columns = [c for c in columns if c in names]
        table = pq.read_table(path.path if path.fs is None else files, columns=columns, filesystem=path.fs)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{source}: cannot read parquet ({exc})") from None
    index = 0
    for batch in table.to_batches(max_chunksize=4096):
        for data in batch.to_pylist():
            yield Row(source, f"row {index}", index, data)
            index += 1
