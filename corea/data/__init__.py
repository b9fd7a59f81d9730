"""Datasets: typed records, loaders for local files, the registry, Ray Data conversion, synthetic data."""

from corea.data.loaders import (
    gpqa_order,
    load_commonsenseqa,
    load_deepmath,
    load_gpqa,
    load_gsm8k,
    load_math500,
    load_olympiadbench,
    load_qa,
    split_deepmath,
)
from corea.data.records import DatasetError, Record, records_from_rows
from corea.data.registry import (
    DATASETS,
    FIXTURES,
    DatasetSpec,
    fixture_path,
    from_ray_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
    to_ray_dataset,
)
from corea.data.synthetic import arithmetic_records

__all__ = [
    "DATASETS",
    "FIXTURES",
    "DatasetError",
    "DatasetSpec",
    "Record",
    "arithmetic_records",
    "fixture_path",
    "from_ray_dataset",
    "gpqa_order",
    "list_datasets",
    "load_commonsenseqa",
    "load_dataset",
    "load_deepmath",
    "load_gpqa",
    "load_gsm8k",
    "load_math500",
    "load_olympiadbench",
    "load_qa",
    "records_from_rows",
    "register_dataset",
    "split_deepmath",
    "to_ray_dataset",
]
