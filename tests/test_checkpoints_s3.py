"""Checkpoints under an S3 URI (moto's server over HTTP): every rank uploads its part, the marker comes last, and a
crash at any point of an upload leaves the previous checkpoint as the one resume takes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3_moto import moto_s3, object_keys

from corea import storage
from corea.train import checkpoints as ck

RANK_FILES = {0: {"deepspeed/latest": b"state", "deepspeed/state/mp_rank_00_model_states.pt": b"m" * 300,
                  "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 500,
                  "hf/model.safetensors": b"w" * 400, "hf/config.json": b"{}"},
              1: {"deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"p" * 500}}
DRIVER_FILES = {"inflight_rollouts.json": b"{}", "hf/tokenizer.json": b"{}"}
OBJECTS = len(RANK_FILES[0]) + len(RANK_FILES[1]) + len(DRIVER_FILES) + 1 + 1  # + trainer_state.json + COMPLETE


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as root:
        yield root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COREA_CACHE_DIR", str(tmp_path / "cache"))


def _write(step: int):
    """``write(folder, target)`` as the training loop's: two ranks (threads standing for nodes) each write their
    files to their own scratch and upload them (``storage.staged``), then the driver writes its own."""

    def write(folder: Path, target: str) -> None:
        errors = []

        def rank(k):
            try:
                with storage.staged(target) as local:
                    for rel, data in RANK_FILES[k].items():
                        (local / rel).parent.mkdir(parents=True, exist_ok=True)
                        (local / rel).write_bytes(data + str(step).encode())
            except Exception as exc:  # noqa: BLE001 (ray.get re-raises a rank's error in the driver)
                errors.append(exc)

        threads = [threading.Thread(target=rank, args=(k,)) for k in RANK_FILES]
        [t.start() for t in threads]
        [t.join() for t in threads]
        if errors:
            raise errors[0]
        for rel, data in DRIVER_FILES.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)

    return write


def _save(out, uri, step, keep=2):
    return ck.write_checkpoint(out, step, _write(step), {"seed": 0}, keep, uri)


def test_round_trip_and_resume_point(s3, tmp_path):
    uri, out = f"{s3}/round-trip/checkpoints", tmp_path / "run"
    assert ck.latest_checkpoint(out, uri) is None
    target = _save(out, uri, 1)
    assert target == f"{uri}/step_000001"
    keys = object_keys(target)
    assert len(keys) == OBJECTS and keys[0].endswith("step_000001/COMPLETE")
    marker = json.loads(storage.read_text(f"{target}/COMPLETE"))
    assert marker["step"] == 1 and set(marker["files"]) == {k.split("step_000001/")[1] for k in keys} - {"COMPLETE"}
    assert not list((out / "checkpoints").iterdir())  # the local staging folder is gone

    folder = ck.latest_checkpoint(out, uri)
    assert ck.read_state(folder) == {"step": 1, "seed": 0}  # resume continues at step 2
    assert ck.checkpoint_source(folder) == target
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "inflight_rollouts.json", "trainer_state.json"]
    hf = storage.local_path(storage.join(ck.checkpoint_source(folder), "hf"))  # what a rollout worker loads
    assert (hf / "model.safetensors").read_bytes() == b"w" * 400 + b"1" and (hf / "tokenizer.json").exists()
    ds = storage.local_path(f"{target}/deepspeed")  # what each policy rank loads: both ranks' shards
    assert sorted(p.name for p in (ds / "state").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    for step in (2, 3, 4):
        _save(out, uri, step)
    assert ck.list_checkpoints(out, uri) == [f"{uri}/step_000003", f"{uri}/step_000004"]  # keep 2
    assert storage.list_dirs(uri) == ["step_000003", "step_000004"]
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 4


@pytest.mark.parametrize("k", range(OBJECTS))
def test_crash_after_k_objects_keeps_the_previous_checkpoint(s3, tmp_path, monkeypatch, k):
    uri, out = f"{s3}/crash-{k}/checkpoints", tmp_path / "run"
    _save(out, uri, 1)
    real, written, lock = storage._open_output, [], threading.Lock()

    def failing(fs, path):
        with lock:  # the ranks upload concurrently
            if len(written) == k:
                raise ConnectionError(f"injected: the upload dies after {k} objects")
            written.append(path)
        return real(fs, path)

    monkeypatch.setattr(storage, "_open_output", failing)
    with pytest.raises(ConnectionError):
        _save(out, uri, 2)
    monkeypatch.setattr(storage, "_open_output", real)

    assert len(written) == k and not any(p.endswith("COMPLETE") for p in written)
    assert len(object_keys(f"{uri}/step_000002")) == k  # the partial upload is there, without its marker
    assert ck.list_checkpoints(out, uri) == [f"{uri}/step_000001"]
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 1

    # the resumed run writes step 2 again: its leftovers are replaced, and it is the newest checkpoint
    _save(out, uri, 2)
    assert len(object_keys(f"{uri}/step_000002")) == OBJECTS
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 2


_KILLED_WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from corea import storage
from test_checkpoints_s3 import _save
storage.THREADS = 1
real = storage.put_file
def slow(*args):
    real(*args)
    time.sleep(0.3)
storage.put_file = slow
_save(Path({out!r}), {uri!r}, 2)
print("finished", flush=True)
"""


def test_killed_mid_upload_leaves_no_selectable_partial_step(s3, tmp_path):
    uri, out = f"{s3}/killed/checkpoints", tmp_path / "run"
    _save(out, uri, 1)
    script = _KILLED_WRITER.format(tests=str(Path(__file__).parent), out=str(out), uri=uri)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 60
    while len(object_keys(f"{uri}/step_000002")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = object_keys(f"{uri}/step_000002")
    assert 2 <= len(partial) < OBJECTS and not any(key.endswith("COMPLETE") for key in partial)
    assert ck.list_checkpoints(out, uri) == [f"{uri}/step_000001"]
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 1
    _save(out, uri, 2)
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 2


def test_a_marker_whose_objects_are_missing_is_skipped(s3, tmp_path, caplog):
    uri, out = f"{s3}/damaged/checkpoints", tmp_path / "run"
    _save(out, uri, 1)
    _save(out, uri, 2)
    storage.delete(f"{uri}/step_000002/hf/model.safetensors")
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 1
    assert "missing" in caplog.text
    storage.write_text(f"{uri}/step_000001/COMPLETE", "not json")
    assert ck.latest_checkpoint(out, uri) is None


def test_partial_steps_older_than_a_new_checkpoint_are_removed(s3, tmp_path):
    uri, out = f"{s3}/leftovers/checkpoints", tmp_path / "run"
    storage.write_text(f"{uri}/step_000001/deepspeed/latest", "state")  # a crash's leftovers, no marker
    _save(out, uri, 2)
    assert storage.list_dirs(uri) == ["step_000002"]


@pytest.mark.slow
def test_tiny_training_checkpoints_to_s3_and_resumes(s3, tmp_path):
    """``corea train`` on the tiny config with ``output.checkpoint_uri`` on S3, 3 steps; then step 3's upload is
    cut short (marker and an object gone) and ``--resume`` redoes step 3 from step 2 read back from S3 (the rollout
    worker's weights, the policy rank's DeepSpeed state, the driver's files): the same step 3 as before."""
    import ray

    from corea.train.config import load_config
    from corea.train.loop import train

    uri, out = f"{s3}/tiny-train/checkpoints", tmp_path / "run"
    cfg = load_config("configs/tiny-cpu-rlcc.yaml", {
        "output.dir": str(out), "output.checkpoint_uri": uri, "optim.steps": 3, "rollout.prompts_per_step": 2,
        "optim.train_batch_prompts": 1, "output.tensorboard": False})
    ray.init(num_cpus=2, include_dashboard=False)  # after the AWS and cache variables are set: workers inherit them
    try:
        assert train(cfg, progress=False) == f"{uri}/step_000003"
        straight = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        files = storage.list_files(f"{uri}/step_000003")
        assert {"COMPLETE", "trainer_state.json", "hf/model.safetensors", "hf/config.json", "hf/tokenizer.json",
                "deepspeed/latest"} <= set(files)
        assert any(rel.startswith("deepspeed/state/") and "optim_states" in rel for rel in files)
        assert not list((out / "checkpoints").glob("step_*"))  # nothing only on the driver's node
        storage.delete(f"{uri}/step_000003/COMPLETE")  # step 3's upload cut short
        storage.delete(f"{uri}/step_000003/deepspeed/latest")

        assert train(cfg, resume=True, progress=False) == f"{uri}/step_000003"
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[:2] == straight[:2]
    for key in ("reward/total", "pass_at_1", "loss", "policy_loss", "kl", "entropy", "response_length",
                "weights_version"):
        assert rows[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-6), key
    assert ck.list_checkpoints(out, uri) == [f"{uri}/step_000002", f"{uri}/step_000003"]
    assert ck.read_state(ck.latest_checkpoint(out, uri))["step"] == 3
