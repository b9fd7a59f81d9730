"""The 7B training layout on Ray's fake multinode autoscaler: p5en nodes start from zero and go away when idle.

A head started with ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` runs Ray's v1 autoscaler
with ``FakeMultiNodeProvider``, which "launches" a node by starting a raylet with the node type's resources on
this machine. The autoscaling config takes cluster.yaml's node types and resources (the head offers no CPU; a
p5en worker CPU 192, GPU 8, accelerator_type:H200 1, with a 100 MB object store here) and a 15 s idle timeout.
A driver places the placement groups of ``configs/paper-qwen2.5-7b-rlcc-l1.yaml`` with the trainer's own
functions (``training_layout``, ``pools.place``) and reports where each bundle landed; then it removes them and
the test waits for the nodes to be terminated. The config is written in full because the monitor reads the file
as it is (no defaults are merged in; Ray's example.yaml for this provider is missing from the 2.60 wheel, which
is also why ``ray.cluster_utils.AutoscalingCluster`` cannot be used, besides its ``ray stop --force``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from support import free_port, stop_cluster

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
OBJECT_STORE = 100 * 1024 ** 2
IDLE_TIMEOUT_MIN = 0.25
HOLD_S = 25  # the placement groups are held this long after placement, past the idle timeout

DRIVER = """
import json, logging, sys, time
import ray
from ray.util.placement_group import placement_group_table, remove_placement_group
from corea.train.config import load_config
from corea.train.placement import training_layout
from corea.train.pools import place

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
ray.init(address=sys.argv[1], log_to_driver=False)
cfg = load_config(sys.argv[2])
layout = training_layout(cfg)
began = time.monotonic()
groups = place(layout, "fake-7b", timeout_s=480, log_every_s=20)
placed_s = time.monotonic() - began
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
where = [placement_group_table(g)["bundles_to_node_id"] for g in groups]
time.sleep(float(sys.argv[3]))  # longer than the idle timeout: reserved bundles keep their nodes
held = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))

@ray.remote(num_cpus=cfg.resources.reward_cpus)
class Reward:  # a reward actor's resource shape, outside the placement groups
    def node(self):
        return ray.get_runtime_context().get_node_id()

reward = Reward.remote()
reward_node = ray.get(reward.node.remote(), timeout=120)
ray.kill(reward)
for g in groups:
    remove_placement_group(g)
print(json.dumps({"placed_s": placed_s, "removed_at": time.time(), "held": held, "nodes": nodes, "where": [{str(k): v for k, v in w.items()} for w in where],
                  "policy": [[s.group, s.bundle] for s in layout.policy],
                  "rollout": [[s.group, s.bundle] for s in layout.rollout], "reward_node": reward_node}))
"""

COUNT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]))
"""


def autoscaling_config(gcs_address: str) -> dict:
    types = CLUSTER["available_node_types"]
    head, gpu = types[CLUSTER["head_node_type"]], types["gpu_p5en"]
    return {
        "cluster_name": "fake-p5en",
        "max_workers": CLUSTER["max_workers"],
        "upscaling_speed": CLUSTER["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        # as Ray's own example config for this provider: every fake node shares this machine's IP, so the
        # autoscaler must key nodes (and their idle times) by node ID
        "provider": {"type": "fake_multinode", "launch_multiple": True, "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            # the fake provider tags its head with this type name
            "ray.head.default": {"resources": dict(head["resources"]), "node_config": {}, "max_workers": 0},
            "gpu_p5en": {"resources": {**gpu["resources"], "object_store_memory": OBJECT_STORE}, "node_config": {},
                         "min_workers": gpu["min_workers"], "max_workers": gpu["max_workers"]},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(ROOT), **extra}


def _alive(address: str, home: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", COUNT, address], env=_env(home), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_7b_layout_brings_two_p5en_nodes_up_from_zero_and_they_go_away_when_idle(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="fm", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(address)))
    flags = [f"--port={gcs}", "--num-cpus=0", f"--temp-dir={temp_dir}", f"--autoscaling-config={config}",
             f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
    try:
        started = subprocess.run([RAY, "start", "--head", *flags], env=_env(home, RAY_FAKE_CLUSTER="1"),
                                 capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert len(_alive(address, home)) == 1  # the head only: GPU workers start at zero

        began = time.monotonic()
        driver = subprocess.run([sys.executable, "-c", DRIVER, address,
                                 str(ROOT / "configs" / "paper-qwen2.5-7b-rlcc-l1.yaml"), str(HOLD_S)],
                                env=_env(home), capture_output=True, text=True, timeout=600)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        report = json.loads(driver.stdout.strip().splitlines()[-1])
        workers = {n: r for n, r in report["nodes"].items() if r.get("GPU")}
        assert len(workers) == 2 and all(r["GPU"] == 8 and r["CPU"] == 192 for r in workers.values())
        assert all(r["accelerator_type:H200"] == 1 for r in workers.values())
        policy_nodes = {report["where"][g][str(b)] for g, b in report["policy"]}
        rollout_nodes = {report["where"][g][str(b)] for g, b in report["rollout"]}
        assert len(policy_nodes) == 1 and len(rollout_nodes) == 1 and policy_nodes != rollout_nodes
        assert policy_nodes | rollout_nodes == set(workers)
        assert report["reward_node"] in workers  # the head offers no CPU: the reward actor runs on a p5en node
        assert report["held"] == sorted(workers)  # nodes holding reserved bundles are not idle
        waiting = [line for line in driver.stderr.splitlines() if "waiting" in line and "for placement" in line]
        up_s = report["placed_s"]

        driver_s = time.monotonic() - began - HOLD_S

        # scale-down: the placement groups are gone; after the idle timeout the autoscaler terminates both nodes
        # (polled with a fresh driver each time, a few seconds apart)
        while len(_alive(address, home)) > 1:
            assert time.time() - report["removed_at"] < 300, "the idle p5en nodes were not terminated within 300 s"
            time.sleep(1)
        down_s = time.time() - report["removed_at"]
        print(f"\nscale-up: both placement groups placed {up_s:.0f} s after they were created, from zero GPU "
              f"nodes ({driver_s:.0f} s for the whole driver); {len(waiting)} waiting lines, e.g. {waiting[:1]}\n"
              f"scale-down: head alone again {down_s:.0f} s after the groups were removed (idle timeout "
              f"{60 * IDLE_TIMEOUT_MIN:.0f} s)")
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
