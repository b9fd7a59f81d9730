"""cluster.yaml through Ray's own `ray up` code on a simulated AWS account (moto).

What runs for real: Ray 2.60's config preparation and resource detection (`_bootstrap_config`: prepare_config,
fillout_available_node_types_resources, validate_config, bootstrap_aws), the AWS node provider's
`create_node`, `get_or_create_head_node` (the head's updater) and the v1 autoscaler's `spawn_updater` (a
worker's updater, as `ray up`'s head autoscaler runs it), all against moto. Only SSH is absent: the updaters get a process runner that records the ssh and
rsync command lines instead of running them, and the assertions read those lines.

moto creates the 16 interfaces in the given subnet and group but keeps neither `NetworkCardIndex` nor
`InterfaceType` (it records every one as card 0, type "interface"): the EFA layout is asserted on the
RunInstances request Ray sends, captured with botocore's `provide-client-params` event hook. moto does not
implement placement groups either; the request's `Placement` is asserted instead.
"""

import copy
import json
import shlex
import time
import types
from pathlib import Path

import boto3
import pytest
import ray
import yaml
from moto import mock_aws
from moto.ec2.models.instance_types import InstanceTypeBackend
from ray.autoscaler._private import commands
from ray.autoscaler._private.aws import config as aws_config
from ray.autoscaler._private.aws import utils as aws_utils
from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_USER_NODE_TYPE,
)
from ray.autoscaler._private.autoscaler import StandardAutoscaler
from ray.autoscaler._private.node_tracker import NodeTracker
from ray.autoscaler._private.util import hash_runtime_conf

ROOT = Path(__file__).resolve().parents[1]
RAW = (ROOT / "cluster.yaml").read_text()
PLACEHOLDERS = yaml.safe_load(RAW)["metadata"]["placeholders"]
SSH_CIDR = "10.0.0.0/8"  # the README's example VPN / bastion range
TOKEN_ON_NODE = "/home/ubuntu/.ray/auth_token"


class RecordingRunner:
    """Stands in for `subprocess` in Ray's updaters: records each ssh / rsync argv and reports success."""

    DEVNULL = None

    def __init__(self):
        self.calls: list[list[str]] = []
        self.files: dict[str, str] = {}  # remote path -> text of each single file rsynced, read at that moment

    def check_call(self, cmd, **_):
        self.calls.append(list(cmd))
        if cmd[0] == "rsync" and Path(cmd[-2]).is_file():
            self.files[cmd[-1].split(":", 1)[1]] = Path(cmd[-2]).read_text()
        return 0

    def check_output(self, cmd, **_):
        self.calls.append(list(cmd))
        return b""

    def remote_commands(self) -> list[str]:
        """The shell text each ssh call runs on the node (Ray wraps it in `bash --login -c -i '...'`)."""
        return [shlex.split(c[-1])[0] for c in self.calls if c[0] == "ssh" and c[-4:-1] == ["--login", "-c", "-i"]]

    def rsyncs(self) -> dict[str, str]:
        """remote path -> local path of every rsync."""
        return {c[-1].split(":", 1)[1].rstrip("/"): c[-2].rstrip("/") for c in self.calls if c[0] == "rsync"}


def _ingress_to_world(group: dict) -> list[dict]:
    return [p for p in group["IpPermissions"] for r in p.get("IpRanges", []) if r["CidrIp"] == "0.0.0.0/0"]


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto account with what the README's checklist creates: a VPC, a private subnet, the cluster's
    security group; a laptop HOME holding the token made by Ray's generator; every EC2/IAM request recorded."""
    laptop = tmp_path_factory.mktemp("laptop")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": PLACEHOLDERS["region"], "HOME": str(laptop),
                           "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "RAY_USAGE_STATS_ENABLED": "0"}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "RAY_AUTH_MODE"):
            mp.delenv(key, raising=False)
        # moto answers an unfiltered describe_instance_types (Ray's resource detection) with all 1,395 types
        # it ships, which takes ~20 s here; keep moto's own AWS data for the two types the cluster uses.
        used = {t["node_config"]["InstanceType"] for t in yaml.safe_load(RAW)["available_node_types"].values()}
        mp.setattr(InstanceTypeBackend, "instance_types",
                   [t for t in InstanceTypeBackend.instance_types if t["InstanceType"] in used])
        # Ray waits 15 s twice for IAM propagation after creating its role; moto needs no wait.
        mp.setattr(aws_config, "time", types.SimpleNamespace(sleep=lambda _: None, time=time.time))
        # fresh boto3 clients (Ray caches them) on a fresh default session that records every request
        mp.setattr(boto3, "DEFAULT_SESSION", None)
        for cached in (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die):
            cached.cache_clear()
        requests: list[tuple[str, dict]] = []
        with mock_aws():
            boto3.setup_default_session()
            boto3.DEFAULT_SESSION.events.register(
                "provide-client-params.*.*",
                lambda params, model, **_: requests.append((model.name, copy.deepcopy(params))),
            )
            ec2 = boto3.client("ec2", region_name=PLACEHOLDERS["region"])
            vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
            subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.0.0/20",  # private: no public IP on launch
                                       AvailabilityZone=PLACEHOLDERS["region"] + "a")["Subnet"]["SubnetId"]
            group = ec2.create_security_group(GroupName="corea-cluster", Description="COREA Ray cluster",
                                              VpcId=vpc)["GroupId"]
            ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
                {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]},
                {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": SSH_CIDR}]},
            ])
            from ray._private.authentication.authentication_token_setup import generate_and_save_token

            generate_and_save_token()  # what `ray get-auth-token --generate` runs: writes $HOME/.ray/auth_token
            text = RAW.replace(PLACEHOLDERS["subnet"], subnet).replace(PLACEHOLDERS["security_group"], group)
            raw_config = yaml.safe_load(text)
            groups_before = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
            requests.clear()
            # what `ray up` runs before it launches anything: prepare_config, resource detection,
            # validate_config, bootstrap_aws
            config = commands._bootstrap_config(raw_config, no_config_cache=True)
            bootstrap_requests = list(requests)
            yield types.SimpleNamespace(ec2=ec2, subnet=subnet, group=group, requests=requests, laptop=laptop,
                                        raw_config=raw_config, config=config, groups_before=groups_before,
                                        bootstrap_requests=bootstrap_requests)
        for cached in (aws_utils.resource_cache, aws_utils.client_cache, aws_config._get_subnets_or_die):
            cached.cache_clear()  # their clients belong to the simulated account


def _sent(requests, operation: str) -> list[dict]:
    return [params for name, params in requests if name == operation]


def test_ray_up_bootstrap_accepts_the_config_and_opens_nothing_to_the_internet(aws):
    config = aws.config
    head, gpu = (config["available_node_types"][k]["node_config"] for k in ("head", "gpu_p5en"))
    assert head["SubnetIds"] == [aws.subnet] and head["SecurityGroupIds"] == [aws.group]
    assert set(gpu["SubnetIds"]) == {aws.subnet} and set(gpu["SecurityGroupIds"]) == {aws.group}
    assert config["head_node"]["IamInstanceProfile"]["Arn"].endswith("instance-profile/ray-autoscaler-v1")
    # the pre-created group is used as is: Ray creates no group and adds no rule (no duplicate permission,
    # no SSH from 0.0.0.0/0, no intra-cluster rule built from the wrong key)
    assert _sent(aws.bootstrap_requests, "DescribeInstanceTypes")  # resource detection did run
    assert not _sent(aws.bootstrap_requests, "CreateSecurityGroup")
    assert not _sent(aws.bootstrap_requests, "AuthorizeSecurityGroupIngress")
    groups = aws.ec2.describe_security_groups()["SecurityGroups"]
    assert {g["GroupId"] for g in groups} == aws.groups_before
    assert not [p for g in groups for p in _ingress_to_world(g)]
    # the head's role as Ray creates it: EC2 (to launch workers) and S3
    policies = boto3.client("iam").list_attached_role_policies(RoleName="ray-autoscaler-v1")["AttachedPolicies"]
    assert {p["PolicyName"] for p in policies} == {"AmazonEC2FullAccess", "AmazonS3FullAccess"}


def test_node_resources_are_what_ray_detects_for_the_instance_types(aws):
    blank = copy.deepcopy(aws.raw_config)
    for node_type in blank["available_node_types"].values():
        node_type["resources"] = {}
    detected = AWSNodeProvider.fillout_available_node_types_resources(blank)["available_node_types"]
    for name, node_type in aws.raw_config["available_node_types"].items():
        expected = {k: v for k, v in detected[name]["resources"].items() if k != "memory"}
        if name == aws.raw_config["head_node_type"]:
            assert expected == {"CPU": 32}
            expected["CPU"] = 0  # by design: the head offers no CPU for work (cluster.yaml)
        assert node_type["resources"] == expected
    assert aws.raw_config["available_node_types"]["gpu_p5en"]["resources"]["accelerator_type:H200"] == 1


def _create(aws, node_type: str, provider=None) -> tuple[str, dict]:
    """Launch one node of `node_type` with Ray's AWS node provider; return its id and the RunInstances request."""
    config = aws.config
    provider = provider or AWSNodeProvider(config["provider"], config["cluster_name"])
    node_config = copy.deepcopy(config["available_node_types"][node_type]["node_config"])
    if node_type == config["head_node_type"]:
        node_config.update(config["head_node"])  # as get_or_create_head_node merges it
    aws.requests.clear()
    created = provider.create_node(node_config, {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_LAUNCH_CONFIG: "x",
                                                 TAG_RAY_USER_NODE_TYPE: node_type,
                                                 TAG_RAY_NODE_NAME: f"ray-corea-{node_type}"}, 1)
    (request,) = _sent(aws.requests, "RunInstances")
    (node_id,) = created
    provider.non_terminated_nodes({})  # the autoscaler's next look at the cluster (fills the provider's tag cache)
    return node_id, request


def test_gpu_workers_get_all_16_efa_interfaces_in_the_given_subnet_and_group(aws):
    node_id, request = _create(aws, "gpu_p5en")
    interfaces = sorted(request["NetworkInterfaces"], key=lambda n: n["NetworkCardIndex"])
    p5en = aws.ec2.describe_instance_types(InstanceTypes=["p5en.48xlarge"])["InstanceTypes"][0]["NetworkInfo"]
    assert len(interfaces) == p5en["MaximumNetworkCards"] == p5en["EfaInfo"]["MaximumEfaInterfaces"] == 16
    assert [n["NetworkCardIndex"] for n in interfaces] == list(range(16))
    assert [(n["DeviceIndex"], n["InterfaceType"]) for n in interfaces] == [(0, "efa")] + [(1, "efa-only")] * 15
    assert all(n["SubnetId"] == aws.subnet and n["Groups"] == [aws.group] for n in interfaces)
    # subnet and groups live on the interfaces only (EC2 rejects them at both levels)
    assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(request)
    assert request["Placement"] == {"GroupName": PLACEHOLDERS["placement_group"]}
    assert request["ImageId"] == PLACEHOLDERS["ami"]  # pinned by ID in the metadata block
    assert not {"InstanceMarketOptions", "CapacityReservationSpecification"} & set(request)  # off by default
    # what moto keeps of the launch: the node sits in the private subnet, in the group, without public IP
    (instance,) = aws.ec2.describe_instances(InstanceIds=[node_id])["Reservations"][0]["Instances"]
    assert instance["SubnetId"] == aws.subnet and "PublicIpAddress" not in instance
    enis = aws.ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [node_id]}])["NetworkInterfaces"]
    assert enis and all(e["SubnetId"] == aws.subnet and [g["GroupId"] for g in e["Groups"]] == [aws.group]
                        for e in enis)
    # moto creates all 16 in the subnet and group, though it records each as card 0 of type "interface"
    assert len(enis) == 16


def test_capacity_block_reaches_the_launch_request(aws):
    """The optional block, switched on as its comment says, passes Ray's bootstrap and goes into RunInstances."""
    text = RAW.replace(PLACEHOLDERS["subnet"], aws.subnet).replace(PLACEHOLDERS["security_group"], aws.group)
    config = commands._bootstrap_config(yaml.safe_load(text.replace("# <<: *capacity_block", "<<: *capacity_block")),
                                        no_config_cache=True)
    _, request = _create(types.SimpleNamespace(config=config, requests=aws.requests), "gpu_p5en")
    block = yaml.safe_load(RAW)["metadata"]["optional"]["capacity_block"]
    assert request["InstanceMarketOptions"] == {"MarketType": "capacity-block"}
    assert request["CapacityReservationSpecification"] == block["CapacityReservationSpecification"]
    assert request["InstanceType"] == "p5en.48xlarge" and len(request["NetworkInterfaces"]) == 16


def test_head_is_launched_in_the_subnet_and_group_with_rays_role(aws):
    node_id, request = _create(aws, "head")
    assert request["SubnetId"] == aws.subnet and request["SecurityGroupIds"] == [aws.group]
    assert request["IamInstanceProfile"]["Arn"].endswith("instance-profile/ray-autoscaler-v1")
    (instance,) = aws.ec2.describe_instances(InstanceIds=[node_id])["Reservations"][0]["Instances"]
    assert instance["SubnetId"] == aws.subnet and "PublicIpAddress" not in instance


def _pip_pins(commands_: list[str], package: str) -> set[str]:
    """Versions pinned with `==` for `package` (extras allowed) in pip install commands."""
    pins = set()
    for command in commands_:
        for token in shlex.split(command.replace(";", " ; ").replace("&&", " && ")):
            name, _, version = token.partition("==")
            if version and name.split("[")[0] == package:
                pins.add(version)
    return pins


def _v1_worker_update(config: dict, provider, worker_id: str, runner) -> None:
    """What the head's v1 autoscaler (`ray up`'s default) does for a new worker: `update_nodes` takes the node
    type's worker_setup_commands and the worker start commands, and `spawn_updater` runs a NodeUpdaterThread.
    The autoscaler's state is filled in as its `reset` fills it from ~/ray_bootstrap_config.yaml."""
    scaler = StandardAutoscaler.__new__(StandardAutoscaler)
    scaler.config, scaler.provider, scaler.process_runner = config, provider, runner
    scaler.available_node_types = config["available_node_types"]
    scaler.runtime_hash, scaler.file_mounts_contents_hash = hash_runtime_conf(
        config["file_mounts"], config["cluster_synced_files"],
        [config["worker_setup_commands"], config["worker_start_ray_commands"]])
    scaler.node_tracker, scaler.updaters = NodeTracker(), {}
    scaler.non_terminated_nodes = types.SimpleNamespace(
        head_id=provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "head"})[0])
    scaler.spawn_updater(worker_id, scaler._get_node_type_specific_fields(worker_id, "worker_setup_commands"),
                         config["worker_start_ray_commands"], scaler._node_resources(worker_id),
                         scaler._node_labels(worker_id), {})
    updater = scaler.updaters[worker_id]
    updater.join(timeout=240)
    assert not updater.is_alive() and updater.exitcode == 0, getattr(updater, "output", "")


@pytest.mark.timeout(300)
def test_head_and_worker_updaters_mount_the_token_turn_auth_on_and_pin_ray(aws, tmp_path):
    """`ray up`'s head updater and the head autoscaler's worker installer, with SSH recorded."""
    head_runner = RecordingRunner()
    provider = AWSNodeProvider(aws.config["provider"], aws.config["cluster_name"])
    commands.get_or_create_head_node(copy.deepcopy(aws.config), "cluster.yaml", no_restart=False,
                                     restart_only=False, yes=True, override_cluster_name=None,
                                     _provider=provider, _runner=head_runner)
    head_ip = provider.internal_ip(provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "head"})[0])

    head_mounts = head_runner.rsyncs()
    assert head_mounts[TOKEN_ON_NODE] == str(aws.laptop / ".ray" / "auth_token")
    head_commands = head_runner.remote_commands()
    # the config the head's autoscaler will use: Ray writes it to ~/ray_bootstrap_config.yaml
    remote_config = json.loads(head_runner.files["~/ray_bootstrap_config.yaml"])

    # the head passes on its own copies: every mount maps a head path to the same worker path
    assert remote_config["file_mounts"] == {remote: remote for remote in aws.config["file_mounts"]}
    # the head's disk, under tmp_path: what `ray up` synced to it
    head_disk = {remote: tmp_path / "head" / remote.lstrip("/") for remote in remote_config["file_mounts"]}
    head_disk["/home/ubuntu/corea"].mkdir(parents=True)
    head_disk[TOKEN_ON_NODE].parent.mkdir(parents=True)
    head_disk[TOKEN_ON_NODE].write_text(head_runner.files[TOKEN_ON_NODE])
    remote_config["file_mounts"] = {remote: str(local) for remote, local in head_disk.items()}

    worker_id, _ = _create(aws, "gpu_p5en", provider)
    worker_runner = RecordingRunner()
    _v1_worker_update(remote_config, provider, worker_id, worker_runner)
    assert worker_runner.files[TOKEN_ON_NODE] == (aws.laptop / ".ray" / "auth_token").read_text()
    worker_commands = worker_runner.remote_commands()

    rsync = next(c for c in head_runner.calls if c[0] == "rsync" and c[-1].endswith(":/home/ubuntu/corea/"))
    assert ["--filter", "dir-merge,- .gitignore"] == rsync[rsync.index("--filter"):rsync.index("--filter") + 2]
    for node_commands, start in ((head_commands, "ray start --head"), (worker_commands, "ray start --address")):
        auth_on = next(i for i, c in enumerate(node_commands) if "export RAY_AUTH_MODE=token' >> ~/.bashrc" in c)
        started = next(i for i, c in enumerate(node_commands) if start in c)
        assert auth_on < started
        assert all(c.startswith("source ~/.bashrc;") for c in node_commands)  # so `ray start` reads it
        assert _pip_pins(node_commands, "ray") == {ray.__version__}
        assert _pip_pins(node_commands, "torch") == {"2.13.0"}
    assert any("pip install" in c and "boto3" in c for c in head_commands)
    for node_commands in (head_commands, worker_commands):  # python3-venv before the venv is made
        apt = next(i for i, c in enumerate(node_commands) if "install -y -qq python3-venv" in c)
        assert apt < next(i for i, c in enumerate(node_commands) if "python3 -m venv" in c)
    # NCCL over EFA: written on the GPU worker before `ray start`, not on the head
    efa = next(i for i, c in enumerate(worker_commands) if "export FI_PROVIDER=efa" in c)
    assert efa < next(i for i, c in enumerate(worker_commands) if "ray start --address" in c)
    assert not any("FI_PROVIDER" in c for c in head_commands)
    # the head advertises no CPU to `ray start`; the worker the resources of its node type
    head_start = next(c for c in head_commands if "ray start --head" in c)
    assert "RAY_OVERRIDE_RESOURCES='{\"CPU\":0}'" in head_start.replace(" ", "")
    assert f"export RAY_HEAD_IP={head_ip};" in next(c for c in worker_commands if "ray start --address" in c)


def test_rays_checks_behind_the_config(aws):
    """What Ray does with the alternatives the config avoids (the reasons in its comments)."""
    gpu = aws.raw_config["available_node_types"]["gpu_p5en"]
    for field, message in (("SubnetId", "missing a subnet"), ("Groups", "missing a security group")):
        broken = copy.deepcopy(gpu)
        broken["node_config"]["NetworkInterfaces"][3].pop(field)
        with pytest.raises(ValueError, match=message):
            aws_config._configure_node_type_from_network_interface(broken)
    # without use_internal_ips Ray refuses the private subnet the nodes need
    public_only = copy.deepcopy(aws.raw_config)
    public_only["provider"].pop("use_internal_ips")
    with pytest.raises(Exception):
        commands._bootstrap_config(public_only, no_config_cache=True)
    # a group Ray creates itself (provider.security_group, no SecurityGroupIds) gets SSH from 0.0.0.0/0
    own_group = copy.deepcopy(aws.raw_config)
    own_group["provider"]["security_group"] = {"GroupName": "ray-made"}
    own_group["available_node_types"]["head"]["node_config"].pop("SecurityGroupIds")
    made = commands._bootstrap_config(own_group, no_config_cache=True)
    (made_id,) = made["available_node_types"]["head"]["node_config"]["SecurityGroupIds"]
    (made_group,) = aws.ec2.describe_security_groups(GroupIds=[made_id])["SecurityGroups"]
    assert made_group["GroupName"] == "ray-made" and _ingress_to_world(made_group)
