"""Per-question evaluation records: the parquet schema, loading and saving, and matching SLM with LLM rows.

One row per (model, dataset, id, run). ``confidence`` is the verbalized confidence (NaN when the response states
none; for the ``router`` role it is p_router), ``mean_token_prob`` the mean of exp(log p) over output tokens,
``probe_confidence`` the Probe's output (NaN where no probe ran). Token counts are the model's own tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from corea.cost import token_cost

#: Column -> pandas dtype of a records frame; ``response`` and ``finish_reason`` are optional.
COLUMNS: dict[str, str] = {
    "dataset": "object",
    "group": "object",
    "id": "object",
    "run": "int64",
    "model": "object",
    "answer": "object",
    "confidence": "float64",
    "correct": "bool",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "mean_token_prob": "float64",
    "probe_confidence": "float64",
}
OPTIONAL = {"model_path": "object", "gold": "object", "kind": "object", "response": "object", "finish_reason": "object"}
KEY = ["dataset", "id", "run"]


class RecordsError(ValueError):
    """A records frame lacks a column or holds a duplicate (model, dataset, id, run)."""


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the schema's dtypes; a missing ``probe_confidence`` / ``group`` is filled (NaN / registry)."""
    frame = frame.copy()
    if "probe_confidence" not in frame:
        frame["probe_confidence"] = np.nan
    if "group" not in frame:
        from corea.data import DATASETS

        frame["group"] = [DATASETS[d].group if d in DATASETS else "custom" for d in frame["dataset"]]
    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise RecordsError(f"records lack column(s): {', '.join(missing)}")
    for column, dtype in COLUMNS.items():
        if dtype == "object":
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        elif dtype == "float64":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        else:
            frame[column] = frame[column].astype(dtype)
    frame["id"] = frame["id"].astype(str)
    dup = frame.duplicated(["model", *KEY])
    if dup.any():
        first = frame.loc[dup, ["model", *KEY]].iloc[0].tolist()
        raise RecordsError(f"duplicate record (model, dataset, id, run) = {tuple(first)}")
    keep = list(COLUMNS) + [c for c in OPTIONAL if c in frame]
    return frame[keep].reset_index(drop=True)


def save_records(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write records as parquet (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    normalize(frame).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load_records(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Records from a parquet file, a folder of parquet files, or a frame; normalized and checked."""
    if isinstance(source, pd.DataFrame):
        return normalize(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise RecordsError(f"{path}: no parquet files")
        return normalize(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True))
    if not path.is_file():
        raise RecordsError(f"{path}: no such records file")
    return normalize(pd.read_parquet(path))


def split_key(seed: int, dataset: str, qid: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, dataset, id): sha256, independent of order and process."""
    digest = hashlib.sha256(f"{seed}\0{dataset}\0{qid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def question_seed(seed: int, dataset: str, qid: str) -> int:
    """The 31-bit sampling seed of one question (sample r of it is drawn from (this seed, r))."""
    return int(split_key(seed, dataset, qid) * 2**31)


def calibration_mask(frame: pd.DataFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """True for rows whose question falls in the calibration split (split_key < fraction); runs stay together."""
    pairs = frame[["dataset", "id"]].astype(str).drop_duplicates()
    inside = {(d, q) for d, q in pairs.itertuples(index=False) if split_key(seed, d, q) < fraction}
    keys = frame["dataset"].astype(str) + "\0" + frame["id"].astype(str)
    return keys.isin({f"{d}\0{q}" for d, q in inside}).to_numpy()


def join_system(
    records: pd.DataFrame,
    slm: str,
    score: str,
    size_ratio: float,
    router: str | None = None,
) -> pd.DataFrame | None:
    """SLM rows of role ``slm`` matched to LLM rows (and router rows) on (dataset, id, run).

    Columns: dataset, group, id, run, score (the system's confidence, NaN = none), slm_correct, slm_cost,
    llm_correct, llm_cost, router_cost (0 without a router). Costs in SLM input-token units:
    C_SLM = n_in + 4 n_out, C_LLM = size_ratio * (n_in + 4 n_out), C_router = n_in + 4 n_out (ratio 1).
    None when a needed role is absent or the score column holds no value at all.
    """
    slm_rows = records[records["model"] == slm]
    llm_rows = records[records["model"] == "llm"]
    if slm_rows.empty or llm_rows.empty:
        return None
    if router is None and slm_rows[score].isna().all() and score == "probe_confidence":
        return None
    left = pd.DataFrame({
        "dataset": slm_rows["dataset"], "group": slm_rows["group"], "id": slm_rows["id"], "run": slm_rows["run"],
        "score": slm_rows[score].astype(float) if router is None else np.nan,
        "slm_correct": slm_rows["correct"].astype(bool),
        "slm_cost": token_cost(slm_rows["prompt_tokens"], slm_rows["output_tokens"], 1.0),
    })
    right = pd.DataFrame({
        "dataset": llm_rows["dataset"], "id": llm_rows["id"], "run": llm_rows["run"],
        "llm_correct": llm_rows["correct"].astype(bool),
        "llm_cost": token_cost(llm_rows["prompt_tokens"], llm_rows["output_tokens"], size_ratio),
    })
    joined = left.merge(right, on=KEY, how="inner")
    joined["router_cost"] = 0.0
    if router is not None:
        router_rows = records[records["model"] == router]
        if router_rows.empty:
            return None
        r = pd.DataFrame({
            "dataset": router_rows["dataset"], "id": router_rows["id"], "run": router_rows["run"],
            "router_score": router_rows["confidence"].astype(float),
            "router_cost_": token_cost(router_rows["prompt_tokens"], router_rows["output_tokens"], 1.0),
        })
        joined = joined.merge(r, on=KEY, how="inner")
        joined["score"], joined["router_cost"] = joined.pop("router_score"), joined.pop("router_cost_")
    if joined.empty:
        return None
    return joined.sort_values(KEY, kind="stable").reset_index(drop=True)
