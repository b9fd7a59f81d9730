"""Storage every node of a cluster reaches: local paths, and URIs read and written through ``pyarrow.fs``.

A URI is ``scheme://...``: ``s3://bucket/prefix``, ``gs://``, ``abfs://``, ``hdfs://`` go to pyarrow's own
filesystems; any other scheme an installed fsspec implementation knows (``memory://``, ``gcs://`` with gcsfs, ...)
goes to fsspec, wrapped in ``pyarrow.fs.PyFileSystem``. S3 credentials, region and endpoint come from the usual AWS
environment (instance role, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible store). An object written
here appears whole or not at all (S3 completes a multipart upload only on close).

- ``local_copy(uri)``: the folder (or file) at ``uri`` copied once per node into the cache (``COREA_CACHE_DIR``,
  default ``~/.cache/corea``), atomically, under a lock, keyed by the URI and refreshed when the listing changes.
- ``staged(target)``: a local folder to write into; for a URI, uploaded to it on a clean exit.
- ``upload_dir``/``download_dir``, ``list_files``, ``read_text``/``write_text``, ``delete``/``delete_tree``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
THREADS = 8
CHUNK = 8 << 20
SOURCE_SUFFIX = ".source.json"


def is_uri(path: object) -> bool:
    """True for ``scheme://...`` (``s3://b/k``, ``file:///x``); False for local paths."""
    return isinstance(path, str) and bool(_URI.match(path))


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for URIs and local paths alike."""
    out = str(base).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def cache_root() -> Path:
    return Path(os.environ.get("COREA_CACHE_DIR", "~/.cache/corea")).expanduser()


def scratch_root() -> Path:
    root = cache_root() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a URI: pyarrow's filesystem for its schemes, else fsspec's."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        import fsspec

        try:
            ffs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as fexc:
            raise ValueError(f"{uri}: no filesystem for this URI (pyarrow: {exc}; fsspec: {fexc})") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
    return fs, path.rstrip("/") or path


def _files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    cut = len(root.rstrip("/")) + 1
    return {i.path[cut:]: i for i in infos if i.type == pafs.FileType.File}


def list_files(uri: str) -> dict[str, int]:
    """Every file under ``uri``: relative path -> size (empty when nothing is there)."""
    fs, root = filesystem(uri)
    return {rel: info.size for rel, info in sorted(_files(fs, root).items())}


def list_dirs(uri: str) -> list[str]:
    """Names of the folders (prefixes) directly under ``uri``, sorted."""
    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def _open_output(fs: pafs.FileSystem, path: str):
    try:
        return fs.open_output_stream(path)
    except FileNotFoundError:  # local and fsspec filesystems need the parent folder; object stores do not
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return fs.open_output_stream(path)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    with _open_output(fs, path) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    """Delete one file; nothing if it is not there."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(uri: str) -> None:
    """Delete everything under ``uri``; nothing if it is not there."""
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def put_file(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """One local file -> one object."""
    with open(local, "rb") as src, _open_output(fs, path) as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def get_file(fs: pafs.FileSystem, path: str, local: Path) -> None:
    """One object -> one local file."""
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def upload_dir(local: str | Path, uri: str, threads: int | None = None) -> dict[str, int]:
    """Every file under the local folder -> ``uri/<relative path>``; returns relative path -> size."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    fs, root = filesystem(uri)
    with ThreadPoolExecutor(max(1, min(threads or THREADS, len(files)))) as pool:
        list(pool.map(lambda p: put_file(p, fs, join(root, p.relative_to(local).as_posix())), files))
    return {p.relative_to(local).as_posix(): p.stat().st_size for p in files}


def _skipped(rel: str, skip: Sequence[str]) -> bool:
    return any(fnmatch(rel, pattern) for pattern in skip)


def download_dir(uri: str, dest: str | Path, skip: Sequence[str] = (), threads: int | None = None) -> Path:
    """The files under ``uri`` (but those matching a ``skip`` pattern, e.g. ``"deepspeed/*"``) -> the local folder
    ``dest``, atomically: downloaded beside it, then renamed into place."""
    dest = Path(dest)
    fs, root = filesystem(uri)
    files = [rel for rel in _files(fs, root) if not _skipped(rel, skip)]
    if not files:
        raise FileNotFoundError(f"{uri}: no files there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ThreadPoolExecutor(max(1, min(threads or THREADS, len(files)))) as pool:
            list(pool.map(lambda rel: get_file(fs, join(root, rel), tmp / rel), files))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of one node (``flock`` on ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_copy(uri: str, skip: Sequence[str] = ()) -> Path:
    """A local folder holding the files under ``uri`` (but ``skip`` patterns), made once per node.

    Cached under ``cache_root()/uri/<hash of the URI>-<last part>``; one process downloads while the others of
    the node wait on a lock. The listing (paths, sizes, modification times: 1 s resolution on S3) is recorded
    beside the folder: a copy whose source has changed since (a checkpoint step written again) is downloaded again."""
    fs, root = filesystem(uri)
    files = {rel: i for rel, i in _files(fs, root).items() if not _skipped(rel, skip)}
    if not files:
        raise FileNotFoundError(f"{uri}: no files there")
    key = hashlib.sha256("\0".join([uri.rstrip("/"), *skip]).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:60]
    dest = cache_root() / "uri" / f"{key}-{name}"
    listing = sorted((rel, i.size, i.mtime_ns) for rel, i in files.items())
    fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    meta = dest.with_name(dest.name + SOURCE_SUFFIX)
    with _locked(dest.with_name(dest.name + ".lock")):
        if dest.is_dir() and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
            return dest
        download_dir(uri, dest, skip)
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps({"uri": uri, "fingerprint": fingerprint}))
        tmp.replace(meta)
    return dest


def source_uri(folder: str | Path) -> str | None:
    """The URI a ``local_copy`` folder was copied from; None for any other folder."""
    meta = Path(folder).with_name(Path(folder).name + SOURCE_SUFFIX)
    return json.loads(meta.read_text())["uri"] if meta.is_file() else None


def local_path(path: str | Path) -> Path:
    """A local path as is; a URI as its ``local_copy``."""
    return local_copy(path) if is_uri(path) else Path(path)


@contextmanager
def staged(target: str | Path) -> Iterator[Path]:
    """A local folder to write ``target``'s files into: ``target`` itself when it is local; for a URI a fresh
    scratch folder, uploaded to the URI when the block exits cleanly and removed in any case."""
    if not is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    scratch = Path(tempfile.mkdtemp(prefix="staged-", dir=scratch_root()))
    try:
        yield scratch
        upload_dir(scratch, str(target))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
