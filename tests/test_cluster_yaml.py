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


def test_images_are_resolved_by_ec2_from_the_deep_learning_base_ami_parameter():
    images = {t["node_config"]["ImageId"] for t in CONFIG["available_node_types"].values()}
    assert images == {
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"}


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
