"""bench/gpu_check.py runs on a machine with torch alone, and its checks can fail.

The script runs in a subprocess where transformers, Ray and vLLM cannot be imported (an import hook refuses
them), as on a bare GPU machine with only torch; the NCCL and engine verdicts are checked on NCCL logs and
token lists made by hand (CUDA is not needed for those parts of the logic).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
BLOCKED = ("transformers", "ray", "vllm")
RUN_BLOCKED = f"""
import runpy, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, Refuse())
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_BLOCKED, *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_parses_without_transformers():
    done = _run("--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--nccl-only" in done.stdout and "--model" in done.stdout


def test_runs_with_torch_alone_and_skips_what_needs_more(tmp_path):
    out = tmp_path / "results.json"
    done = _run("--json", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = {r["check"]: r for r in json.loads(out.read_text())}
    assert results["environment"]["status"] == "RAN" and results["environment"]["transformers"] is None
    assert results["nccl"]["status"] in ("RAN", "SKIPPED")  # SKIPPED here: no CUDA (and a CPU torch: no NCCL)
    for check in ("policy-step", "reference", "engine", "zero3-export"):
        assert results[check]["status"] == "SKIPPED"
        assert "transformers not importable" in results[check]["why"]
    assert "summary: 1 ran" in done.stdout and "0 failed" in done.stdout


def test_nccl_log_tells_the_efa_plugin_from_sockets(gpu_check):
    efa = ("host:1:1 [0] NCCL INFO NET/Plugin: Loaded net plugin Libfabric (v9)\n"
           "host:1:1 [0] NCCL INFO NET/OFI Initializing aws-ofi-nccl 1.14.0\n"
           "host:1:1 [0] NCCL INFO Using network Libfabric\n")
    sockets = ("host:1:1 [0] NCCL INFO NET/Plugin: Could not find: libnccl-net.so\n"
               "host:1:1 [0] NCCL INFO Using network Socket\n")
    assert gpu_check.parse_nccl_log(efa) == {"network": "Libfabric", "ofi_plugin_loaded": True}
    assert gpu_check.parse_nccl_log(sockets) == {"network": "Socket", "ofi_plugin_loaded": False}


def test_nccl_check_fails_when_the_plugin_is_there_but_not_loaded(gpu_check, monkeypatch, tmp_path):
    (tmp_path / "libnccl-net-ofi.so").write_text("")
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    assert gpu_check.efa_plugin_files() == [str(tmp_path / "libnccl-net-ofi.so")]
    monkeypatch.setattr(gpu_check.torch.cuda.nccl, "version", lambda: (2, 27, 7))
    log = "NCCL INFO Using network Socket\nprobe-sum 1.0\n"
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=log, stderr=""))
    gpu_check.RESULTS.clear()
    gpu_check.check_nccl(types.SimpleNamespace(nccl_timeout=5), True)
    (result,) = gpu_check.RESULTS
    assert result["status"] == "FAILED" and result["nccl"] == "2.27.7" and result["network"] == "Socket"
    assert result["efa_plugin_present"] is True and result["efa_plugin_loaded"] is False


def test_engine_check_can_fail(gpu_check):
    good = {"cuda": [[5, 6], [7]], "cpu": [[5, 6], [8]]}
    assert gpu_check.engine_problems(good, [[5, 6], [7]], vocab=100) == []
    assert gpu_check.engine_problems({"cuda": [[5], []], "cpu": [[5], [1]]}, [[5], []], 100) == [
        "cuda: a prompt got no tokens"]
    assert "outside the vocabulary" in gpu_check.engine_problems({"cuda": [[500]]}, [[500]], 100)[0]
    assert gpu_check.engine_problems(good, [[5, 6], [9]], 100) == [
        "cuda: greedy decoding differs between two identical runs"]
