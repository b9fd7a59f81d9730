"""Checkpoint folders, written atomically, and the deterministic prompt order that makes resume exact.

    OUT/checkpoints/step_000002/
        hf/                  Hugging Face weights + tokenizer (loadable by the engines and by vLLM)
        deepspeed/           DeepSpeed module and optimizer state of every rank
        trainer_state.json   step, seed, data position
A checkpoint is first written to ``.step_000002.tmp`` and renamed into place: a folder named ``step_*``
is always complete. Hugging Face folders (``write_hf_folder``) are written the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

STATE_FILE = "trainer_state.json"


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def write_checkpoint(out_dir: Path, step: int, write: Callable[[Path], None], state: dict[str, Any], keep: int) -> Path:
    """Call ``write(tmp_folder)``, add ``trainer_state.json``, then rename the folder into place."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_hf_folder(module, state: dict, folder: str | Path, tokenizer=None,
                    extra_json: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as a Hugging Face folder (config, generation config, safetensors, optionally the tokenizer
    and ``extra_json``: file name -> JSON value) at ``folder``, atomically: written to ``.NAME.tmp`` beside it,
    then renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, value in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(value))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def prompt_indices(n_records: int, step: int, batch: int, seed: int) -> list[int]:
    """Indices of the prompts of ``step`` (1-based): epochs are seeded permutations, walked in order.

    A pure function of (n_records, step, batch, seed), so a resumed run sees the same data order."""
    if n_records <= 0:
        raise ValueError("no training prompts")
    out: list[int] = []
    position = (step - 1) * batch
    while len(out) < batch:
        epoch, offset = divmod(position, n_records)
        order = np.random.default_rng([seed, epoch]).permutation(n_records)
        take = min(batch - len(out), n_records - offset)
        out.extend(int(i) for i in order[offset : offset + take])
        position += take
    return out


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop metric lines of steps after ``last_step`` (work that was lost with the unsaved steps)."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def select(items: Sequence, indices: Sequence[int]) -> list:
    return [items[i] for i in indices]
