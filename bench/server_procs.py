"""Servers as subprocesses for the serving benchmarks: start, wait until ready, stop, and account for their CPU.

``Server`` starts a command in its own session (so that its whole process tree can be found and stopped), waits
until ``GET {base}/v1/models`` and a first chat completion answer 200, and stops it with SIGINT (then SIGTERM, then SIGKILL), also ending
any process of its tree that outlived it. ``tree_cpu`` reads the user + system CPU seconds of every process in
a server's tree, labelled by what it is (``ray::ServeReplica:...``, ``VLLM::EngineCore``, ``gcs_server``, ...);
``profile`` samples chosen processes with py-spy while a load runs and ``top_frames`` sums each one's samples
by function and by package.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


class Server:
    def __init__(self, name: str, cmd: list[str], base: str, log_path: Path, env: dict[str, str] | None = None,
                 probe: dict | None = None):
        self.name, self.cmd, self.base, self.log_path, self.probe = name, cmd, base, log_path, probe
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, timeout_s: float) -> float:
        """Start the command and wait until ``/v1/models`` answers and then the chat completion ``probe`` (a
        request body) does: an HTTP front end can answer before the model behind it is loaded. Returns the
        seconds it took."""
        import httpx

        start = time.perf_counter()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; see {self.log_path}")
            try:
                if httpx.get(f"{self.base}/v1/models", timeout=5).status_code == 200 and (
                        self.probe is None or httpx.post(f"{self.base}/v1/chat/completions", json=self.probe,
                                                         timeout=120).status_code == 200):
                    self.startup_s = time.perf_counter() - start
                    return self.startup_s
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready after {timeout_s:.0f} s; see {self.log_path}")

    def descendants(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace_s: float = 90) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the server; then every leftover process of its tree, by pid."""
        import psutil

        if self.proc is None:
            return
        tree = self.descendants()
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        _, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=15)
        for p in alive:  # processes this server started that outlived it (e.g. an engine core)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()
        self.proc = None


def label(proc) -> str:
    """What a process of a server's tree is: its Ray or vLLM process title, else its program (``python -m
    corea.cli``, ``vllm``, ``log_monitor.py``, ``raylet``, ...)."""
    try:
        cmdline = proc.cmdline()
        name = proc.name()
    except Exception:  # noqa: BLE001 - gone or unreadable
        return "?"
    first = cmdline[0] if cmdline else name
    if first.startswith(("ray::", "VLLM::")):
        return first.split()[0]
    args = cmdline[1:]
    if any("spawn_main" in part for part in args):
        return "python (multiprocessing child)"
    if "-m" in args[:-1]:
        return f"python -m {args[args.index('-m') + 1]}"
    script = next((a for a in args if a.endswith(".py") or Path(a).name == "vllm"), None)
    return Path(script).name if script else Path(first).name or name


def tree_cpu(server: Server) -> dict[int, tuple[str, float]]:
    """pid -> (label, user + system CPU seconds so far) for every process of the server's tree; a vLLM process
    under a Ray actor is labelled with that actor too (``VLLM::Worker [ray::ServeReplica:corea:LLM]``)."""
    procs = server.descendants()
    labels = {p.pid: label(p) for p in procs}
    out = {}
    for proc in procs:
        name = labels[proc.pid]
        try:
            if not name.startswith("ray::"):
                owner = next((labels[a.pid] for a in proc.parents() if labels.get(a.pid, "").startswith("ray::")), None)
                name = f"{name} [{owner}]" if owner else name
            times = proc.cpu_times()
            out[proc.pid] = (name, times.user + times.system)
        except Exception:  # noqa: BLE001 - exited meanwhile
            pass
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds spent between two ``tree_cpu`` snapshots)."""
    return {pid: (name, seconds - before.get(pid, (name, 0.0))[1]) for pid, (name, seconds) in after.items()}


def by_label(delta: dict[int, tuple[str, float]]) -> dict[str, float]:
    """``cpu_delta`` summed by label, largest first."""
    sums: dict[str, float] = collections.defaultdict(float)
    for name, seconds in delta.values():
        sums[name] += seconds
    return dict(sorted(((k, round(v, 2)) for k, v in sums.items() if v >= 0.005), key=lambda kv: -kv[1]))


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def profile(pids: dict[int, str], seconds: float, out_dir: Path, rate: int = 50) -> list[tuple[str, Path, subprocess.Popen]]:
    """Start one py-spy per process (pid -> label) for ``seconds``, each writing collapsed stacks (idle threads
    left out, so samples follow CPU use) into ``out_dir``; an empty list when py-spy is not installed."""
    exe = py_spy()
    if exe is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for pid, name in pids.items():
        out = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{pid}.txt"
        cmd = [exe, "record", "--pid", str(pid), "--nonblocking", "--rate", str(rate), "--duration", str(int(seconds)),
               "--format", "raw", "--output", str(out)]
        running.append((name, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    return running


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _where(file: str) -> str:
    parts = Path(file).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:][:2])
    return "/".join(parts[-2:])


def top_frames(path: Path, top: int = 8) -> dict:
    """py-spy's collapsed stacks of one process summed: samples, the functions most often on top (self time)
    and the packages / modules most often on the stack (inclusive)."""
    self_time: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [m for m in (_FRAME.match(f) for f in stack.split(";")) if m]
        if not frames:
            continue
        self_time[f"{frames[-1]['func']} ({Path(frames[-1]['file']).name})"] += n
        for where in {_where(m["file"]) for m in frames}:
            inclusive[where] += n
    return {"samples": samples, "self": dict(self_time.most_common(top)), "inclusive": dict(inclusive.most_common(top))}
