"""Checkpoint folders, written atomically, and the deterministic prompt order that makes resume exact.

    OUT/checkpoints/step_000002/
        hf/                  Hugging Face weights + tokenizer (loadable by the engines and by vLLM)
        deepspeed/           DeepSpeed module and optimizer state of every rank
        trainer_state.json   step, seed, data position
A checkpoint is first written to ``.step_000002.tmp`` and renamed into place: a folder named ``step_*``
is always complete. Hugging Face folders (``write_hf_folder``) are written the same way.

With ``output.checkpoint_uri`` (``s3://bucket/run/checkpoints``, any ``corea.storage`` URI) the same folder is
written under the URI instead, from every node: each policy rank writes its files to local scratch and uploads
them (``Policy.save`` under ``corea.storage.staged``), then the driver uploads its own, then writes the marker
``step_000002/COMPLETE`` (the listing of every object of the step) last. Only a step with its marker, and every
object the marker lists, is a checkpoint: a crash mid-upload leaves the previous one as the newest. Resume
downloads the driver's files of the newest one; actors read ``hf/`` and ``deepspeed/`` from the URI themselves.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from corea import storage

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
MARKER = "COMPLETE"
STEP = re.compile(r"step_(\d+)")


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def write_checkpoint(out_dir: Path, step: int, write: Callable[[Path, str], None], state: dict[str, Any], keep: int,
                     uri: str | None = None) -> Path | str:
    """Call ``write(folder, target)``, add ``trainer_state.json``, then make the step a checkpoint; keep ``keep``.

    The driver writes into the local ``folder``; the policy ranks write theirs to ``target``: the same folder,
    renamed into place after, or, with ``uri``, the step's URI, completed by its marker (module docstring)."""
    if uri is not None:
        return _write_remote(out_dir, step, write, state, keep, uri)
    final = step_dir(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp, str(tmp))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remote_step(uri: str, step: int) -> str:
    return storage.join(uri, f"step_{step:06d}")


def _write_remote(out_dir: Path, step: int, write: Callable[[Path, str], None], state: dict[str, Any], keep: int,
                  uri: str) -> str:
    target = remote_step(uri, step)
    storage.delete(storage.join(target, MARKER))  # marker first: an older copy of this step stops counting
    storage.delete_tree(target)
    staging = step_dir(out_dir, step).with_name(f".step_{step:06d}.upload")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging, target)  # returns once every rank has uploaded its files
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        storage.upload_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = storage.list_files(target)
    storage.write_text(storage.join(target, MARKER), json.dumps({"step": step, "files": files}))
    complete = list_checkpoints(out_dir, uri)
    for old in complete[:-keep]:
        _delete_remote(old)
    for name in storage.list_dirs(uri):  # partial steps a crash left behind
        if (m := STEP.fullmatch(name)) and int(m.group(1)) < step and storage.join(uri, name) not in complete:
            storage.delete_tree(storage.join(uri, name))
    return target


def _delete_remote(target: str) -> None:
    storage.delete(storage.join(target, MARKER))
    storage.delete_tree(target)


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


def list_checkpoints(out_dir: Path, uri: str | None = None) -> list:
    """Complete checkpoints, oldest first: local folders, or with ``uri`` the URIs of the steps with a marker."""
    if uri is not None:
        steps = [storage.join(uri, name) for name in storage.list_dirs(uri) if STEP.fullmatch(name)]
        return [s for s in steps if storage.exists(storage.join(s, MARKER))]
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def latest_checkpoint(out_dir: Path, uri: str | None = None) -> Path | None:
    """The newest complete checkpoint's local folder. With ``uri``: the newest step whose marker's objects are
    all there, its driver files (not ``hf/``, ``deepspeed/``) copied locally; ``checkpoint_source`` names it."""
    if uri is None:
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    for target in reversed(list_checkpoints(out_dir, uri)):
        if _verified(target):
            return storage.local_copy(target, skip=("hf/*", "deepspeed/*"))
        log.warning("%s: its marker lists objects that are missing; taking an older checkpoint", target)
    return None


def _verified(target: str) -> bool:
    try:
        listed = json.loads(storage.read_text(storage.join(target, MARKER)))["files"]
    except (OSError, ValueError, KeyError):
        return False
    present = storage.list_files(target)
    return all(present.get(rel) == size for rel, size in listed.items())


def checkpoint_source(folder: Path) -> str:
    """Where the actors read a checkpoint (``hf/``, ``deepspeed/``) from: its URI, or its local folder."""
    return storage.source_uri(folder) or str(folder)


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
