"""Rehearsal of cluster.yaml's start on this machine: a head and a worker "node", each a temporary HOME.

Each node gets what `ray up` gives it before `ray start`: the token file mount (a token made by the real
`ray get-auth-token --generate`), the YAML's initialization commands, and ~/corea-venv (a link to this
environment, standing in for the setup commands' pip installs). Then the YAML's start command lines run as
Ray's SSH runner runs them (`bash --login -c -i 'source ~/.bashrc; ...'`, the worker's with RAY_HEAD_IP
exported by Ray's own helper), adapted only as a shared machine needs: free ports instead of 6379 and the
defaults, one CPU, a dedicated --temp-dir, and no --autoscaling-config (the AWS autoscaler is exercised on moto
in tests/test_cluster_aws.py). The YAML's `ray stop` lines are not run: they would stop every Ray cluster on
the machine; this test stops only its own processes.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml
from support import stop_cluster
from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.util import with_head_node_ip

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "cluster.yaml").read_text())
RAY = str(Path(sys.executable).parent / "ray")
CLIENT = """
import json, sys, time, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except ConnectionError as e:
    print("refused:", repr(e.__cause__))
    sys.exit(3)
deadline = time.time() + 60
while time.time() < deadline and sum(n["Alive"] for n in ray.nodes()) < 2:
    time.sleep(0.5)
print(json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fatal_log_lines(temp_dir: str) -> str:
    """Fatal lines of the raylet / GCS logs under temp_dir, for failure messages."""
    lines = []
    for log in sorted(Path(temp_dir).glob("session_*/logs/*.out")):
        lines += [f"{log.name}: {line[:400]}" for line in log.read_text(errors="replace").splitlines()
                  if " C " in line or " E " in line]
    return "\n".join(lines[-20:])


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _on_node(home: Path, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `command` the way Ray's SSH command runner runs it on a node, with HOME as the node's home."""
    argv = _with_interactive(command)
    argv[-1] = shlex.split(argv[-1])[0]  # the quoting is for the remote shell that ssh goes through
    return subprocess.run(argv, env=_env(home), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def _adapted(command: str, replacements: dict[str, str], extra_flags: list[str]) -> str:
    for old, new in replacements.items():
        assert old in command, (old, command)
        command = command.replace(old, new)
    return f"{command} {' '.join(extra_flags)}"


def _node(root: Path, name: str, token: str) -> Path:
    """A node's home as `ray up` leaves it before the start commands."""
    home = root / name
    (home / ".ray").mkdir(parents=True)
    (home / ".bashrc").write_text("")  # Ubuntu's skeleton .bashrc stands here on an AMI
    (home / "corea-venv").symlink_to(sys.prefix)
    for remote, local in CONFIG["file_mounts"].items():
        if local == "~/.ray/auth_token":
            assert remote == "/home/ubuntu/.ray/auth_token"
            (home / ".ray" / "auth_token").write_text(token)
    for command in CONFIG["initialization_commands"]:
        done = _on_node(home, command)
        assert done.returncode == 0, done.stderr[-2000:]
    return home


AGENT_TIMEOUT = "Timed out waiting for file"  # the raylet's fixed 15 s wait for its agents' port files


def _start(home: Path, build, temp_dir: str, stop_own_first: bool) -> None:
    """Run the start command `build()` makes on the node at `home`. On a loaded machine a node's dashboard agent
    can miss the raylet's fixed 15 s wait for its port file (the raylet then aborts): that failure, and only
    that one, is retried, with fresh ports, at most twice, as the autoscaler would relaunch a failed node."""
    for attempt in range(3):
        before = _fatal_log_lines(temp_dir).count(AGENT_TIMEOUT)
        started = _on_node(home, build())
        if started.returncode == 0:
            return
        fatal = _fatal_log_lines(temp_dir)
        if fatal.count(AGENT_TIMEOUT) == before or attempt == 2:
            raise AssertionError(started.stderr[-1500:] + fatal)
        print(f"attempt {attempt + 1}: a dashboard agent missed the raylet's port wait; starting again")
        if stop_own_first:
            stop_cluster(temp_dir)


def _start_commands(key: str) -> list[str]:
    commands_ = CONFIG[key]
    skipped = [c for c in commands_ if c.endswith("ray stop")]
    assert len(skipped) == 1 and all("ray start" in c for c in commands_ if c not in skipped)
    return [c for c in commands_ if c not in skipped]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_head_and_worker_start_commands_join_with_token_auth(tmp_path):
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    generated = subprocess.run([RAY, "get-auth-token", "--generate"], env=_env(laptop), capture_output=True,
                               text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr[-2000:]
    token = (laptop / ".ray" / "auth_token").read_text()
    assert generated.stdout == token and len(token) == 64

    gcs, dashboard, client_server = _port(), _port(), _port()
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    common = ["--num-cpus=1", f"--temp-dir={temp_dir}"]

    def own_ports() -> list[str]:
        return [f"--dashboard-agent-listen-port={_port()}", f"--dashboard-agent-grpc-port={_port()}",
                f"--runtime-env-agent-port={_port()}", f"--metrics-export-port={_port()}"]

    try:
        head = _node(tmp_path, "head", token)
        for command in _start_commands("head_start_ray_commands"):
            _start(head, lambda: _adapted(
                command, {"--port=6379": f"--port={gcs}", " --autoscaling-config=~/ray_bootstrap_config.yaml": ""},
                [*common, f"--dashboard-port={dashboard}", f"--ray-client-server-port={client_server}", *own_ports()],
            ), temp_dir, stop_own_first=True)

        worker = _node(tmp_path, "worker", token)
        for command in _start_commands("worker_start_ray_commands"):
            _start(worker, lambda: with_head_node_ip(
                [_adapted(command, {":6379": f":{gcs}"}, [*common, *own_ports()])], "127.0.0.1")[0],
                temp_dir, stop_own_first=False)

        # a client holding the token (the laptop's, as after `ray get-auth-token --generate`) sees both nodes
        joined = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{gcs}"],
                                env=_env(laptop, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stderr[-3000:]
        nodes = json.loads(joined.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2 and all(n["CPU"] == 1 for n in nodes)

        # clients without the token are refused: the job server over HTTP, and the GCS
        jobs = f"http://127.0.0.1:{dashboard}/api/jobs/"
        assert httpx.get(jobs, timeout=30).status_code == 401
        assert httpx.get(jobs, headers={"Authorization": "Bearer " + "0" * 64}, timeout=30).status_code == 403
        assert httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
        stranger = tmp_path / "stranger"  # no token file, RAY_AUTH_MODE unset: an unauthenticated client
        stranger.mkdir()
        refused = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{gcs}"],
                                 env=_env(stranger, RAY_py_gcs_connect_timeout_s="5"),  # it is refused at once
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 3 and refused.stdout.startswith("refused:"), refused.stderr[-2000:]
        assert "Authentication token is missing or incorrect" in refused.stdout + refused.stderr
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(120)
def test_ray_start_with_token_mode_refuses_to_start_without_a_token(tmp_path):
    """Why the token is generated on the laptop and mounted: `ray start` never creates one."""
    temp_dir = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    try:
        started = subprocess.run([RAY, "start", "--head", f"--port={_port()}", "--num-cpus=1",
                                  f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                                 env=_env(tmp_path, RAY_AUTH_MODE="token"), capture_output=True, text=True,
                                 timeout=100)
        assert started.returncode != 0
        assert "no authentication token was found" in started.stdout + started.stderr
        assert not (tmp_path / ".ray" / "auth_token").exists()
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
