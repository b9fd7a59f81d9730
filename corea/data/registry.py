"""The dataset registry: names -> loader, kind, shipped fixture and evaluation group; Ray Data conversion.

Groups: ``train`` (DeepMath training pool), ``in_domain`` (DeepMath held-out 500), ``ood_math`` (MATH-500,
GSM8K, OlympiadBench), ``ood_nonmath`` (GPQA, CommonsenseQA), ``custom`` (registered by users).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from corea.data import loaders
from corea.data.records import DatasetError, Kind, Record, records_from_rows
from corea.storage import is_uri

if TYPE_CHECKING:
    import ray.data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPLITS = ("train", "eval")
GROUPS = ("train", "in_domain", "ood_math", "ood_nonmath", "custom")


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one named dataset."""

    name: str
    loader: Callable[[Path], list[Record]]
    kind: Kind
    group: str
    fixture: Path | None = None  # default file when no path is given
    splittable: bool = False  # accepts split="train" | "eval" (the DeepMath split)
    default_split: str | None = None
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    loader: Callable[[Path], list[Record]] | None = None,
    *,
    kind: Kind = "math",
    path: str | Path | None = None,
    group: str = "custom",
    splittable: bool = False,
    default_split: str | None = None,
    description: str = "",
    overwrite: bool = False,
) -> DatasetSpec:
    """Register a dataset. ``loader(path) -> list[Record]`` defaults to :func:`loaders.load_qa` (id, question,
    answer[, choices]); ``path`` is the default file used when :func:`load_dataset` gets none."""
    if name in DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if default_split is not None and (not splittable or default_split not in SPLITS):
        raise ValueError(f"default_split {default_split!r} needs splittable=True and one of {SPLITS}")
    spec = DatasetSpec(
        name=name,
        loader=loader or partial(loaders.load_qa, dataset=name, kind=kind),
        kind=kind,
        group=group,
        fixture=Path(path) if path is not None else None,
        splittable=splittable,
        default_split=default_split,
        description=description,
    )
    DATASETS[name] = spec
    return spec


def list_datasets(group: str | None = None) -> list[str]:
    """Registered names, optionally only those of one group."""
    return sorted(name for name, spec in DATASETS.items() if group is None or spec.group == group)


def load_dataset(
    name: str,
    path: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
    *,
    seed: int = 0,
    n_train: int = 16000,
    n_eval: int = 500,
) -> list[Record]:
    """Load a registered dataset from ``path`` (default: its shipped fixture).

    For splittable datasets (DeepMath), ``split`` picks ``"train"`` or ``"eval"`` of
    :func:`loaders.split_deepmath` (``seed``, ``n_train``, ``n_eval``); None means the dataset's default
    split (``deepmath500``: eval; ``deepmath``: all rows). ``limit`` keeps the first rows after splitting.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets())}")
    spec = DATASETS[name]
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if split is not None and not spec.splittable:
        raise ValueError(f"dataset {name!r} has no train/eval split")
    source = (path if is_uri(path) else Path(path)) if path is not None else spec.fixture  # a URI stays a string
    if source is None:
        raise DatasetError(f"dataset {name!r} has no default file; pass path=")
    records = spec.loader(source)
    split = split or spec.default_split
    if split is not None:
        train, evaluation = loaders.split_deepmath(records, n_train=n_train, n_eval=n_eval, seed=seed)
        records = train if split == "train" else evaluation
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        records = records[:limit]
    return records


def fixture_path(filename: str) -> Path:
    """Path of a shipped fixture file (see ``corea/data/fixtures/README.md``)."""
    path = FIXTURES / filename
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    return path


def to_ray_dataset(records: Sequence[Record]) -> "ray.data.Dataset":
    """A Ray Dataset with one row per record (:meth:`Record.to_row`: plain types, ``meta`` as JSON, prompt)."""
    import ray.data

    return ray.data.from_items([record.to_row() for record in records])


def from_ray_dataset(dataset: "ray.data.Dataset") -> list[Record]:
    """Records back from a dataset made by :func:`to_ray_dataset` (extra columns are ignored)."""
    return records_from_rows(dataset.take_all())


def _register_builtins() -> None:
    builtins = [
        ("deepmath", loaders.load_deepmath, "math", "train", "deepmath_sample.jsonl", None,
         "DeepMath-103K (all rows; split='train' | 'eval' for the fixed-seed split)"),
        ("deepmath500", loaders.load_deepmath, "math", "in_domain", "deepmath_sample.jsonl", "eval",
         "DeepMath-103K held-out evaluation split (500 by default)"),
        ("math500", loaders.load_math500, "math", "ood_math", "math500.jsonl", None, "MATH-500"),
        ("gsm8k", loaders.load_gsm8k, "math", "ood_math", "gsm8k.jsonl", None, "GSM8K test"),
        ("olympiadbench", loaders.load_olympiadbench, "math", "ood_math", "olympiadbench.jsonl", None,
         "OlympiadBench (English, text-only, open-ended)"),
        ("gpqa", loaders.load_gpqa, "choice", "ood_nonmath", "gpqa_synthetic.csv", None,
         "GPQA (official CSV layout; the shipped fixture is synthetic)"),
        ("commonsenseqa", loaders.load_commonsenseqa, "choice", "ood_nonmath", "commonsenseqa.jsonl", None,
         "CommonsenseQA validation"),
    ]
    for name, loader, kind, group, fixture, default_split, description in builtins:
        DATASETS[name] = DatasetSpec(
            name=name,
            loader=loader,
            kind=kind,
            group=group,
            fixture=FIXTURES / fixture,
            splittable=name.startswith("deepmath"),
            default_split=default_split,
            description=description,
        )


_register_builtins()
