"""corea.storage against moto's S3 server over HTTP: uploads, node-local copies, dataset files and models by URI."""

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from s3_moto import moto_s3, object_keys

from corea import storage
from corea.data import load_dataset
from corea.data.readers import read_rows
from corea.data.records import DatasetError
from corea.models import loading


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as root:
        yield root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COREA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_uri_and_join():
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///tmp") and not storage.is_uri("/mnt/models")
    assert not storage.is_uri(Path("s3:/b/k")) and not storage.is_uri("runs/x")
    assert storage.join("s3://b/run/", "step_000001", "/hf") == "s3://b/run/step_000001/hf"


def test_upload_list_download(s3, tmp_path):
    files = {"a.txt": b"a", "hf/config.json": b"{}", "deepspeed/state/x.pt": b"x" * 1000}
    uri = f"{s3}/upload"
    assert storage.upload_dir(_tree(tmp_path / "src", files), uri) == {k: len(v) for k, v in files.items()}
    assert object_keys(uri) == sorted(f"upload/{k}" for k in files)
    assert storage.list_files(uri) == {k: len(v) for k, v in sorted(files.items())}
    assert storage.list_dirs(uri) == ["deepspeed", "hf"]
    out = storage.download_dir(uri, tmp_path / "dst", skip=("deepspeed/*",))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.txt", "hf/config.json"]
    assert not list(tmp_path.glob(".dst.tmp*"))
    storage.delete_tree(uri)
    assert storage.list_files(uri) == {} and object_keys(uri) == []
    storage.delete_tree(uri)  # nothing there: no error
    with pytest.raises(FileNotFoundError):
        storage.download_dir(uri, tmp_path / "none")


def test_local_copy_once_per_node_and_refreshed(s3, tmp_path, monkeypatch):
    uri = f"{s3}/model-a"
    storage.upload_dir(_tree(tmp_path / "m", {"config.json": b"{}", "model.safetensors": b"w" * 100}), uri)
    gets = []
    real = storage.get_file
    monkeypatch.setattr(storage, "get_file", lambda *a: (gets.append(a[1]), real(*a)))
    copies = []
    threads = [threading.Thread(target=lambda: copies.append(storage.local_copy(uri))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(copies)) == 1 and len(gets) == 2  # four callers, one download (the others waited on the lock)
    assert storage.source_uri(copies[0]) == uri and storage.source_uri(tmp_path) is None
    assert storage.local_copy(uri) == copies[0] and len(gets) == 2
    time.sleep(1.1)  # S3 modification times have 1 s resolution
    storage.write_bytes(f"{uri}/model.safetensors", b"v" * 100)  # the same size, written again: a new copy
    assert (storage.local_copy(uri) / "model.safetensors").read_bytes() == b"v" * 100
    light = storage.local_copy(uri, skip=("*.safetensors",))
    assert light != copies[0] and [p.name for p in light.iterdir()] == ["config.json"]


def test_staged_uploads_only_on_a_clean_exit(s3, tmp_path):
    with storage.staged(f"{s3}/staged-ok") as local:
        (local / "x" / "y.txt").parent.mkdir()
        (local / "x" / "y.txt").write_text("y")
    assert storage.list_files(f"{s3}/staged-ok") == {"x/y.txt": 1} and not local.exists()
    with pytest.raises(RuntimeError), storage.staged(f"{s3}/staged-fail") as local:
        (local / "z.txt").write_text("z")
        raise RuntimeError("rank failed")
    assert storage.list_files(f"{s3}/staged-fail") == {} and not local.exists()
    with storage.staged(tmp_path / "plain") as local:  # a local target is written in place
        assert local == tmp_path / "plain" and local.is_dir()


def test_fsspec_scheme_round_trip(tmp_path):
    uri = "memory://corea-storage-test/run"
    storage.upload_dir(_tree(tmp_path / "src", {"a/b.txt": b"b"}), uri)
    storage.write_text(f"{uri}/marker", "done")
    assert storage.list_files(uri) == {"a/b.txt": 1, "marker": 4} and storage.read_text(f"{uri}/marker") == "done"
    assert (storage.local_copy(uri) / "a" / "b.txt").read_bytes() == b"b"
    storage.delete_tree(uri)
    assert not storage.exists(f"{uri}/marker")


def test_dataset_files_by_uri(s3, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "id": f"q{i}"} for i in range(3)]
    storage.write_text(f"{s3}/data/gsm.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    storage.write_text(f"{s3}/data/t.csv", "question,answer\r\n\"two\nlines\",2\r\n")
    frame = pd.DataFrame({"question": ["q0", "q1", "q2"], "answer": ["0", "1", "2"], "long": ["x"] * 3})
    (tmp_path / "shards").mkdir()
    for i, part in enumerate((frame[:2], frame[2:])):
        part.to_parquet(tmp_path / "shards" / f"part-{i}.parquet")
    storage.upload_dir(tmp_path / "shards", f"{s3}/data/shards")
    assert [r.data["id"] for r in read_rows(f"{s3}/data/gsm.jsonl")] == ["q0", "q1", "q2"]
    csv_rows = list(read_rows(f"{s3}/data/t.csv"))
    assert csv_rows[0].data["question"] == "two\nlines" and csv_rows[0].where == "line 2"
    shard_rows = list(read_rows(f"{s3}/data/shards", columns=["question", "answer", "absent"]))
    assert [r.data for r in shard_rows] == [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    records = load_dataset("gsm8k", path=f"{s3}/data/gsm.jsonl")
    assert [r.gold for r in records] == ["1", "2", "3"]
    with pytest.raises(DatasetError, match="file not found"):
        list(read_rows(f"{s3}/data/missing.jsonl"))


def test_models_by_uri_and_hub_id(s3, tiny_checkpoints, tmp_path, monkeypatch):
    uri = f"{s3}/models/tiny-slm"
    storage.upload_dir(tiny_checkpoints["slm"], uri)
    local = loading.resolve_model_path(uri)
    assert Path(local, "model.safetensors").is_file() and loading.resolve_model_path(uri) == local
    assert not list(Path(loading.resolve_model_path(uri, weights=False)).glob("*.safetensors"))
    model, tokenizer = loading.load_model_and_tokenizer(uri, device="cpu")
    assert model.config.vocab_size > 0 and tokenizer.pad_token is not None
    assert loading.resolve_model_path(str(tiny_checkpoints["slm"])) == str(tiny_checkpoints["slm"])
    assert loading.resolve_model_path(f"file://{tiny_checkpoints['slm']}") == str(tiny_checkpoints["slm"])

    calls = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: (calls.append((repo, kw)), str(tiny_checkpoints["llm"]))[1])
    assert loading.resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == str(tiny_checkpoints["llm"])
    assert loading.resolve_model_path("Qwen/Qwen2.5-7B-Instruct", weights=False)
    assert calls[0][0] == "Qwen/Qwen2.5-7B-Instruct" and "*.safetensors" not in calls[0][1]["ignore_patterns"]
    assert "*.safetensors" in calls[1][1]["ignore_patterns"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        loading.resolve_model_path("no-such/model")
