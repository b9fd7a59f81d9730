"""cluster.yaml passes Ray's own autoscaler schema validation (no AWS call) and says what the README promises."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())


def test_schema_valid():
    validate_config(prepare_config(CONFIG))


def test_node_types_and_scaling():
    types = CONFIG["available_node_types"]
    assert CONFIG["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    gpu = types["gpu_p5en"]
    assert gpu["node_config"]["InstanceType"] == "p5en.48xlarge"
    assert gpu["resources"]["GPU"] == 8 and gpu["resources"]["accelerator_type:H200"] == 8
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert CONFIG["max_workers"] >= gpu["max_workers"]
    assert CONFIG["idle_timeout_minutes"] > 0
    assert any(n["InterfaceType"] == "efa" for n in gpu["node_config"]["NetworkInterfaces"])


def test_installs_vllm_extra_and_keeps_ports_closed():
    assert any('.[vllm]' in c for c in CONFIG["setup_commands"])
    ingress = CONFIG["provider"]["security_group"]["IpPermissions"]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in ingress for r in p.get("IpRanges", []))
    head_start = " ".join(CONFIG["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
