"""Datasets: records, loaders on the shipped fixtures, the DeepMath split, GPQA shuffling, errors, registry,
Ray Data round-trip and synthetic data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corea.data import (
    DATASETS,
    DatasetError,
    Record,
    arithmetic_records,
    fixture_path,
    from_ray_dataset,
    gpqa_order,
    list_datasets,
    load_commonsenseqa,
    load_dataset,
    load_deepmath,
    load_gpqa,
    load_gsm8k,
    load_math500,
    load_olympiadbench,
    load_qa,
    records_from_rows,
    register_dataset,
    split_deepmath,
    to_ray_dataset,
)
from corea.protocol import build_prompt, chat_messages

GPQA_HEADER = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- records -------------------------------------------------------------------------------------------


def test_record_prompt_and_messages_follow_the_protocol():
    math = Record(id="m", question="What is 1 + 1?", gold="2", kind="math")
    assert math.prompt() == build_prompt("What is 1 + 1?")
    assert math.messages() == chat_messages("What is 1 + 1?")
    choice = Record(id="c", question="Pick one", gold="B", kind="choice", choices=["x", "y"])
    assert choice.choices == ("x", "y") and choice.letters == ("A", "B") and choice.gold_text == "y"
    assert choice.prompt() == build_prompt("Pick one", ("x", "y"))
    assert "(B) y" in choice.prompt()
    assert hash(choice) == hash(Record(id="c", question="Pick one", gold="B", kind="choice", choices=("x", "y")))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="other"),
        dict(kind="choice"),  # no choices
        dict(kind="choice", choices=("x", "y"), gold="C"),  # letter out of range
        dict(kind="math", choices=("x",)),
    ],
)
def test_record_validation(kwargs):
    base = dict(id="r", question="q", gold="A", kind="math")
    with pytest.raises(ValueError):
        Record(**{**base, **kwargs})


def test_record_row_round_trip():
    record = Record(id="c", question="Q", gold="A", kind="choice", choices=("x", "y"), dataset="d", meta={"k": 1})
    row = record.to_row()
    assert row["prompt"] == record.prompt() and row["choices"] == ["x", "y"] and json.loads(row["meta"]) == {"k": 1}
    assert Record.from_row(row) == record
    assert records_from_rows([row]) == [record]


# --- loaders on the shipped fixtures ----------------------------------------------------------------------

EXPECTED = {  # name: (rows, kind, group)
    "deepmath": (1000, "math", "train"),
    "deepmath500": (500, "math", "in_domain"),
    "math500": (100, "math", "ood_math"),
    "gsm8k": (100, "math", "ood_math"),
    "olympiadbench": (100, "math", "ood_math"),
    "gpqa": (12, "choice", "ood_nonmath"),
    "commonsenseqa": (100, "choice", "ood_nonmath"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_fixture_loads(name):
    rows, kind, group = EXPECTED[name]
    records = load_dataset(name)
    assert len(records) == rows
    assert DATASETS[name].kind == kind and DATASETS[name].group == group
    assert len({r.id for r in records}) == rows
    for record in records:
        assert record.kind == kind and record.question and record.gold
        assert isinstance(record.id, str) and record.dataset == ("deepmath" if name == "deepmath500" else name)
        if kind == "choice":
            assert record.choices and record.gold in record.letters
        else:
            assert record.choices is None


def test_list_datasets_by_group():
    assert set(EXPECTED) <= set(list_datasets())
    assert list_datasets("in_domain") == ["deepmath500"]
    assert list_datasets("ood_math") == ["gsm8k", "math500", "olympiadbench"]
    assert list_datasets("ood_nonmath") == ["commonsenseqa", "gpqa"]


def test_math500_fields():
    records = load_math500(fixture_path("math500.jsonl"))
    first = records[0]
    assert first.id == "test/precalculus/807.json"
    assert first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta == {"subject": "Precalculus", "level": 2} and first.dataset == "math500"


def test_gsm8k_fields():
    records = load_gsm8k(fixture_path("gsm8k.jsonl"))
    assert records[0].id == "gsm8k_test_0" and records[0].gold == "18"
    assert all(r.gold.lstrip("-").isdigit() for r in records)


def test_olympiadbench_fields():
    records = load_olympiadbench(fixture_path("olympiadbench.jsonl"))
    assert records[0].id == "olympiadbench_1606" and records[0].gold == "2"
    assert records[0].meta["answer_type"] == "Numerical"
    assert all("$" not in r.gold for r in records)


def test_commonsenseqa_letters_match_answer_text():
    raw = [json.loads(line) for line in fixture_path("commonsenseqa.jsonl").read_text().splitlines()]
    records = load_commonsenseqa(fixture_path("commonsenseqa.jsonl"))
    for row, record in zip(raw, records):
        assert record.letters == ("A", "B", "C", "D", "E")
        assert record.gold == row["answer"] and record.gold_text == row["answer_text"]
    assert "(E) new york" in records[0].prompt()


def test_alternative_public_layouts(tmp_path):
    math = load_math500(_jsonl(tmp_path / "m.jsonl", [{"unique_id": "u1", "problem": "P?", "answer": "3"}]))
    assert (math[0].id, math[0].question, math[0].gold) == ("u1", "P?", "3")
    gsm = load_gsm8k(_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "so 2+2\n#### 1,234"}]))
    assert (gsm[0].id, gsm[0].gold) == ("gsm8k_0", "1234")
    oly = load_olympiadbench(_jsonl(tmp_path / "o.jsonl", [{"id": 5, "question": "Q?", "final_answer": ["$x+1$"]}]))
    assert (oly[0].id, oly[0].gold) == ("5", "x+1")
    official = {
        "id": "q1",
        "answerKey": "B",
        "question": {"stem": "Stem?", "choices": [{"label": "B", "text": "b"}, {"label": "A", "text": "a"}]},
    }
    csqa = load_commonsenseqa(_jsonl(tmp_path / "c.jsonl", [official]))
    assert csqa[0].question == "Stem?" and csqa[0].choices == ("a", "b") and csqa[0].gold_text == "b"


def test_load_qa_generic_layout(tmp_path):
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "a", "question": "2+2?", "answer": "4"},
            {"id": "b", "question": "Colour of sky?", "choices": ["red", "blue"], "answer": "b"},
        ],
    )
    records = load_qa(path, dataset="mine")
    assert [r.kind for r in records] == ["math", "choice"]
    assert records[1].gold == "B" and records[1].gold_text == "blue" and records[1].dataset == "mine"


# --- DeepMath: parquet schema and split ------------------------------------------------------------------


def test_deepmath_parquet_schema():
    path = fixture_path("deepmath103k_schema.parquet")
    assert {"question", "final_answer", "difficulty", "topic", "r1_solution_1"} <= set(pq.read_schema(path).names)
    records = load_deepmath(path)
    assert len(records) == 50
    assert [r.id for r in records[:2]] == ["deepmath_0", "deepmath_1"]
    assert set(records[0].meta) == {"difficulty", "topic"} and isinstance(records[0].meta["difficulty"], float)
    assert all("r1_solution" not in r.meta and r.kind == "math" for r in records)
    train, evaluation = split_deepmath(records, n_train=30, n_eval=10)
    assert len(train) == 30 and len(evaluation) == 10
    assert load_dataset("deepmath", path=path, split="eval", n_eval=10) == evaluation


def test_deepmath_parquet_folder_of_shards(tmp_path):
    table = pq.read_table(fixture_path("deepmath103k_schema.parquet"))
    pq.write_table(table.slice(0, 20), tmp_path / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(20), tmp_path / "train-00001-of-00002.parquet")
    assert load_deepmath(tmp_path) == load_deepmath(fixture_path("deepmath103k_schema.parquet"))


def test_deepmath_split_disjoint_and_sized():
    records = load_dataset("deepmath")
    train, evaluation = split_deepmath(records, n_train=300, n_eval=100, seed=0)
    assert len(train) == 300 and len(evaluation) == 100
    assert not {r.id for r in train} & {r.id for r in evaluation}
    # fewer rows than asked: eval first (at most half), train the rest
    train, evaluation = split_deepmath(records)
    assert len(evaluation) == 500 and len(train) == 500
    assert {r.id for r in train} | {r.id for r in evaluation} == {r.id for r in records}
    train, evaluation = split_deepmath(records[:40], n_train=16000, n_eval=500)
    assert (len(train), len(evaluation)) == (20, 20)
    assert split_deepmath(records[:40], n_train=0, n_eval=500) == ([], split_deepmath(records[:40], 0, 500)[1])
    with pytest.raises(ValueError):
        split_deepmath(records, n_train=-1)


def test_deepmath_split_stable_and_seeded():
    records = load_dataset("deepmath")
    train, evaluation = split_deepmath(records, n_train=200, n_eval=50, seed=0)
    again = split_deepmath(list(reversed(records)), n_train=200, n_eval=50, seed=0)
    assert ([r.id for r in again[0]], [r.id for r in again[1]]) == ([r.id for r in train], [r.id for r in evaluation])
    other = split_deepmath(records, n_train=200, n_eval=50, seed=1)
    assert {r.id for r in other[1]} != {r.id for r in evaluation}
    # eval is the same whatever n_train is
    assert split_deepmath(records, n_train=10, n_eval=50, seed=0)[1] == evaluation
    assert load_dataset("deepmath500", n_eval=50) == evaluation
    assert load_dataset("deepmath", split="train", n_train=200, n_eval=50) == train


def test_deepmath_split_stable_across_processes():
    code = (
        "from corea.data import load_dataset\n"
        "print(','.join(r.id for r in load_dataset('deepmath', split='eval', n_eval=20, seed=3)))"
    )
    outputs = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outputs.add(result.stdout.strip())
    here = ",".join(r.id for r in load_dataset("deepmath", split="eval", n_eval=20, seed=3))
    assert outputs == {here}


# --- GPQA ----------------------------------------------------------------------------------------------


def test_gpqa_shuffle_stable_and_gold_points_at_correct_answer():
    path = fixture_path("gpqa_synthetic.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        raw = list(csv.DictReader(handle))
    records = load_gpqa(path)
    assert len(records) == len(raw) == 12
    for row, record in zip(raw, records):
        assert record.id == row["Record ID"]
        assert record.gold_text == row["Correct Answer"] == record.meta["correct_answer"]
        assert sorted(record.choices) == sorted(row[name] for name in GPQA_HEADER[1:])
    assert load_gpqa(path) == records  # stable
    assert len({r.gold for r in records}) > 1  # really shuffled
    assert "\n" in records[5].question  # a quoted multi-line CSV field
    assert gpqa_order(records[0].question) == gpqa_order(records[0].question)
    assert load_gpqa(path, seed=1) != records


def test_gpqa_without_record_id_and_stable_across_file_order(tmp_path):
    rows = [["What is 1+1?", "2", "3", "4", "5"], ["What is 2+2?", "4", "1", "2", "3"]]
    forward = load_gpqa(_csv(tmp_path / "f.csv", GPQA_HEADER, rows))
    backward = load_gpqa(_csv(tmp_path / "b.csv", GPQA_HEADER, rows[::-1]))
    assert [r.id for r in forward] == ["gpqa_0", "gpqa_1"]
    assert forward[0].choices == backward[1].choices and forward[0].gold == backward[1].gold


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match=f"{path}: file not found"):
        load_math500(path)
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset("math500", path=path)


def test_malformed_json_line(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"id": "1", "question": "q", "answer": "1"}, "", "{not json"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_gsm8k(path)
    path = _jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DatasetError, match=r"list\.jsonl line 1: expected a JSON object"):
        load_gsm8k(path)


def test_missing_and_empty_field(tmp_path):
    rows = [{"id": "1", "question": "q", "answer": "1"}] * 6 + [{"id": "7", "question": "q"}]
    with pytest.raises(DatasetError) as info:
        load_math500(_jsonl(tmp_path / "x.jsonl", rows))
    assert str(info.value) == f"{tmp_path / 'x.jsonl'} line 7: field 'answer' is missing"
    with pytest.raises(DatasetError, match=r"line 1: field 'question' is empty"):
        load_gsm8k(_jsonl(tmp_path / "e.jsonl", [{"question": "  ", "answer": "1"}]))
    with pytest.raises(DatasetError, match=r"c\.jsonl line 1: field 'answer' must be one of A, got 'Z'"):
        load_commonsenseqa(
            _jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": {"label": ["A"], "text": ["a"]}, "answer": "Z"}])
        )
    with pytest.raises(DatasetError, match=r"duplicate id '1'"):
        load_gsm8k(_jsonl(tmp_path / "d.jsonl", rows[:2]))


def test_bad_csv_rows(tmp_path):
    rows = [["Line one\nline two?", "a", "b", "c", "d"], ["Short row", "a", "b"]]
    with pytest.raises(DatasetError, match=r"s\.csv line 4: field 'Incorrect Answer 2' is missing"):
        load_gpqa(_csv(tmp_path / "s.csv", GPQA_HEADER, rows))
    rows = [["Q?", "a", "b", "c", "d", "extra"]]
    with pytest.raises(DatasetError, match=r"l\.csv line 2: 6 fields, the header has 5"):
        load_gpqa(_csv(tmp_path / "l.csv", GPQA_HEADER, rows))
    with pytest.raises(DatasetError, match=r"n\.csv line 2: field 'Correct Answer' is missing"):
        load_gpqa(_csv(tmp_path / "n.csv", ["Question", "Answer"], [["Q?", "a"]]))


def test_bad_parquet_row_and_suffix(tmp_path):
    path = tmp_path / "dm.parquet"
    pq.write_table(pa.table({"question": ["a", "b", "c", "d"], "final_answer": ["1", "2", "3", None]}), path)
    with pytest.raises(DatasetError, match=r"dm\.parquet row 3: field 'final_answer' is missing"):
        load_deepmath(path)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"broken\.parquet: cannot read parquet"):
        load_deepmath(tmp_path / "broken.parquet")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.txt'"):
        load_deepmath(tmp_path / "x.txt")


# --- registry -------------------------------------------------------------------------------------------


def test_load_dataset_options():
    assert len(load_dataset("gsm8k", limit=7)) == 7
    assert load_dataset("gsm8k", limit=7) == load_dataset("gsm8k")[:7]
    with pytest.raises(KeyError, match="unknown dataset"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="no train/eval split"):
        load_dataset("gsm8k", split="eval")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("deepmath", split="test")


@pytest.fixture
def registered():
    names = []
    yield names
    for name in names:
        DATASETS.pop(name, None)


def test_register_dataset(tmp_path, registered):
    path = _jsonl(tmp_path / "own.jsonl", [{"id": "a", "question": "1+2?", "answer": "3"}])
    registered.append("own")
    spec = register_dataset("own", path=path, group="ood_math", description="mine")
    assert spec.group == "ood_math" and "own" in list_datasets("ood_math")
    assert load_dataset("own") == [Record(id="a", question="1+2?", gold="3", kind="math", dataset="own")]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("own", path=path)
    register_dataset("own", loader=load_math500, path=path, overwrite=True)
    assert load_dataset("own")[0].dataset == "math500"
    registered.append("nofile")
    register_dataset("nofile")
    with pytest.raises(DatasetError, match="no default file"):
        load_dataset("nofile")
    with pytest.raises(ValueError, match="group"):
        register_dataset("badgroup", group="elsewhere")


# --- Ray Data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_to_ray_dataset_round_trip(ray_local):
    records = load_dataset("commonsenseqa", limit=5) + load_dataset("math500", limit=5) + load_dataset("gpqa", limit=2)
    dataset = to_ray_dataset(records)
    assert dataset.count() == 12
    rows = dataset.take_all()
    assert {"id", "question", "gold", "kind", "choices", "dataset", "meta", "prompt"} <= set(rows[0])
    assert all(isinstance(row["meta"], str) and isinstance(row["prompt"], str) for row in rows)
    by_id = {r.id: r for r in from_ray_dataset(dataset)}
    assert by_id == {r.id: r for r in records}
    assert rows[0]["prompt"] == records[0].prompt()


# --- synthetic ------------------------------------------------------------------------------------------


def test_arithmetic_records():
    records = arithmetic_records(50, seed=7, low=10, high=20)
    assert records == arithmetic_records(50, seed=7, low=10, high=20)
    assert arithmetic_records(20, seed=7, low=10, high=20) == records[:20]
    assert records != arithmetic_records(50, seed=8, low=10, high=20)
    for record in records:
        a, b = record.meta["a"], record.meta["b"]
        assert 10 <= a <= 20 and 10 <= b <= 20
        assert record.question == f"What is {a} + {b}?" and record.gold == str(a + b) and record.kind == "math"
    assert len({r.id for r in records}) == 50
    assert arithmetic_records(0) == []
    with pytest.raises(ValueError):
        arithmetic_records(3, low=5, high=1)
