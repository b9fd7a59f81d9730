"""cluster.yaml passes Ray's own autoscaler schema validation (no AWS call) and holds together as the README says.

Ray's AWS bootstrap, the node provider and the updaters are exercised on moto in tests/test_cluster_aws.py;
the start commands are rehearsed locally in tests/test_cluster_rehearsal.py.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
RAW = (ROOT / "cluster.yaml").read_text()
CONFIG = yaml.safe_load(RAW)
PLACEHOLDERS = CONFIG["metadata"]["placeholders"]


def test_schema_valid():
    validate_config(prepare_config(CONFIG))


def test_node_types_and_scaling():
    types = CONFIG["available_node_types"]
    assert CONFIG["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    assert types["head"]["resources"]["CPU"] == 0  # CPU work (reward actors, Ray Data, Serve replicas) on workers
    gpu = types["gpu_p5en"]
    assert gpu["node_config"]["InstanceType"] == "p5en.48xlarge"
    assert gpu["resources"]["GPU"] == 8 and gpu["resources"]["accelerator_type:H200"] == 1
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert CONFIG["max_workers"] >= gpu["max_workers"]
    assert CONFIG["idle_timeout_minutes"] > 0


def test_placeholders_are_named_once_and_used_everywhere():
    """Every subnet, group, placement group and region comes from the block at the top (a YAML alias)."""
    for value in PLACEHOLDERS.values():
        assert RAW.count(value) == 1, value  # written once, as the anchor
    assert CONFIG["provider"]["region"] == PLACEHOLDERS["region"]
    head = CONFIG["available_node_types"]["head"]["node_config"]
    assert head["SubnetIds"] == [PLACEHOLDERS["subnet"]]
    assert head["SecurityGroupIds"] == [PLACEHOLDERS["security_group"]]
    gpu = CONFIG["available_node_types"]["gpu_p5en"]["node_config"]
    assert {(n["SubnetId"], tuple(n["Groups"])) for n in gpu["NetworkInterfaces"]} == {
        (PLACEHOLDERS["subnet"], (PLACEHOLDERS["security_group"],))}
    assert gpu["Placement"]["GroupName"] == PLACEHOLDERS["placement_group"]
    # Ray sets up its own group (SSH from 0.0.0.0/0) when provider.security_group is given or a node has none
    assert "security_group" not in CONFIG["provider"] and CONFIG["provider"]["use_internal_ips"] is True


def test_every_node_runs_the_ami_pinned_once_in_the_metadata_block():
    images = {t["node_config"]["ImageId"] for t in CONFIG["available_node_types"].values()}
    assert images == {PLACEHOLDERS["ami"]} and PLACEHOLDERS["ami"].startswith("ami-")
    assert "resolve:ssm:" not in RAW.replace("# ", "")  # the SSM parameter is only named, to look an ID up
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in RAW


def test_setup_installs_python3_venv_before_making_the_venv():
    """Ubuntu's python3 has no ensurepip until python3-venv is installed; a venv made without it has no pip."""
    commands = [c for c in prepare_config(CONFIG)["worker_setup_commands"]]
    apt = next(i for i, c in enumerate(commands) if "apt-get" in c and "install" in c and "python3-venv" in c)
    venv = next(i for i, c in enumerate(commands) if "python3 -m venv" in c)
    assert apt < venv and "import ensurepip" in commands[apt] and "bin/pip" in commands[venv]
    done = subprocess.run(["bash", "-n", "-c", "; ".join(commands)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_workers_export_nccl_efa_settings_for_ray_start(tmp_path):
    """The worker setup writes the EFA / aws-ofi-nccl environment and ~/.bashrc sources it (Ray runs every
    command, `ray start` too, after `source ~/.bashrc`)."""
    home = tmp_path / "node"
    home.mkdir()
    (home / ".bashrc").write_text("")
    efa = [c for c in CONFIG["worker_setup_commands"] if "nccl-efa" in c]
    for command in efa * 2:  # idempotent
        subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=True)
    shown = subprocess.run(["bash", "-c", "source ~/.bashrc; env"], env={"HOME": str(home), "PATH": "/usr/bin:/bin",
                                                                        "LD_LIBRARY_PATH": "/x"},
                           capture_output=True, text=True, check=True).stdout
    env = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker" and env["NCCL_DEBUG"] == "WARN"
    paths = env["LD_LIBRARY_PATH"].split(":")
    assert "/opt/amazon/ofi-nccl/lib" in paths and "/opt/amazon/efa/lib" in paths and paths[-1] == "/x"
    assert (home / ".bashrc").read_text().count("corea-nccl-efa") == 1


def test_capacity_block_is_an_optional_block_for_the_gpu_nodes():
    block = CONFIG["metadata"]["optional"]["capacity_block"]
    assert block["InstanceMarketOptions"] == {"MarketType": "capacity-block"}
    assert block["CapacityReservationSpecification"]["CapacityReservationTarget"]["CapacityReservationId"]
    assert "# <<: *capacity_block" in RAW  # off by default: one uncommented line turns it on
    with_block = yaml.safe_load(RAW.replace("# <<: *capacity_block", "<<: *capacity_block"))
    gpu = with_block["available_node_types"]["gpu_p5en"]["node_config"]
    assert gpu["InstanceMarketOptions"] == block["InstanceMarketOptions"]
    validate_config(prepare_config(with_block))


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync, which `ray up` itself needs")
def test_synced_repository_leaves_out_what_git_ignores(tmp_path):
    """The rsync Ray runs for `file_mounts` (its own filter arguments), run here between two folders."""
    source, target = tmp_path / "repo", tmp_path / "node"
    for name in ("corea/__init__.py", ".venv/bin/python", "runs/demo/metrics.jsonl", ".git/HEAD", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    shutil.copy(ROOT / ".gitignore", source / ".gitignore")
    runner = SSHCommandRunner.__new__(SSHCommandRunner)  # only its rsync argument builder is used
    args = runner._create_rsync_filter_args({"rsync_filter": CONFIG["rsync_filter"],
                                             "rsync_exclude": CONFIG["rsync_exclude"]})
    subprocess.run(["rsync", "-az", *args, f"{source}/", f"{target}/"], check=True, timeout=60)
    synced = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert synced == {"corea/__init__.py", "README.md", ".gitignore"}


def test_every_node_exports_the_serve_proxy_guard_before_ray_starts():
    """Serve's proxies load COREA's middleware (body deadline, JSON errors) only from their environment."""
    from corea.serve.proxy_guard import CALLBACK, middlewares

    assert callable(middlewares)
    exports = [c for c in CONFIG["initialization_commands"] if "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" in c]
    assert exports and f"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH={CALLBACK}'" in exports[0]
    assert "~/.bashrc" in exports[0]
