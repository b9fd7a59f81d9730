"""Synthetic datasets for demos and benchmarks, generated on the spot and deterministic by seed."""

from __future__ import annotations

import numpy as np

from corea.data.records import Record


def arithmetic_records(n: int, seed: int = 0, low: int = 0, high: int = 99) -> list[Record]:
    """``n`` questions "What is a + b?" with a, b drawn uniformly from [low, high] (inclusive) and the
    integer sum as gold (kind "math"). The same (n, seed, low, high) always gives the same records, and a
    longer list extends a shorter one with the same seed. Operands are kept in ``meta`` (a, b), so the
    difficulty (e.g. number of digits) can be read back for skill-boundary experiments."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if low > high:
        raise ValueError(f"low must be <= high, got {low} > {high}")
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(low, high, size=2, endpoint=True))
        records.append(
            Record(
                id=f"arith_{seed}_{i}",
                question=f"What is {a} + {b}?",
                gold=str(a + b),
                kind="math",
                dataset="arithmetic",
                meta={"a": a, "b": b},
            )
        )
    return records
