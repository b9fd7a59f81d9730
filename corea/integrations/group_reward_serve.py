"""The group-holding reward server as a Ray Serve application (for a cluster that already runs Ray).

    from ray import serve
    from corea.integrations.group_reward_serve import build_reward_app
    serve.run(build_reward_app({"n_samples_per_prompt": 8}), name="corea-reward", route_prefix="/")
    # OpenRLHF: --reward.remote_url http://HEAD:8000/get_reward

One replica, always: a group's n requests must meet in one process, and Serve's router would spread them over
several replicas. ``max_ongoing_requests`` is raised far above Serve's default (5) because every request is
held until its group is complete: a rollout batch of B prompts x n samples keeps B x n requests open at once
(their sockets are held by Serve's HTTP proxy, under the node's open-file limit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from corea.integrations.group_reward_server import GroupRewardService, create_app
from corea.integrations.reward_server_config import RewardServerConfig, load_reward_server_config

#: requests one replica holds at once (a 1024-prompt x 8-sample rollout batch is 8192)
MAX_ONGOING_REQUESTS = 16384


class _GroupRewardIngress:
    def __init__(self, config: dict[str, Any]) -> None:
        self.service = GroupRewardService(RewardServerConfig.model_validate(config))

    def __serve_build_asgi_app__(self):
        return create_app(self.service)


GroupRewardIngress = serve.deployment(name="GroupReward", num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS)(
    serve.ingress()(_GroupRewardIngress))


def build_reward_app(config: str | Path | dict | None = None, overrides: dict[str, Any] | None = None):
    """The bound Serve application; ``config`` is a YAML path or mapping of ``RewardServerConfig`` fields
    (``host``/``port`` are Serve's own HTTP options here, not the config's)."""
    cfg = load_reward_server_config(config, overrides)
    return GroupRewardIngress.bind(cfg.model_dump())
