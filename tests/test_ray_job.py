"""`ray job submit` of the tiny RLCC config to a `ray start --head` cluster started here, with token auth."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import stop_cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# `python` in the job's entrypoint is whatever the cluster's PATH finds: this environment's interpreter
PATH = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client = (_port() for _ in range(7))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": PATH}
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # own ports, so another Ray cluster on this machine cannot take the job agent's
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_tiny_config(head_node, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PATH": PATH}
    env.pop("RAY_ADDRESS", None)
    for _ in range(10):  # the head's job agent comes up a few seconds after `ray start` returns
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", head_node, "--working-dir", ".", "--",
             "python", "ray_jobs/train_rlcc.py", "--config", "configs/tiny-cpu-rlcc.yaml", "--set", f"output.dir={out}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        if "No available agent" not in submit.stderr + submit.stdout:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoints" / "step_000002" / "hf" / "model.safetensors").exists()
    jobs = subprocess.run([RAY, "job", "list", "--address", head_node], env=env, capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in jobs.stdout
