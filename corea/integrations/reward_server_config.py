"""Config of the group-holding reward server for OpenRLHF (``corea reward-server --config FILE``; optional).

Every field has a default, so ``corea reward-server --port 5000 --n-samples-per-prompt 8`` needs no file:
L1 confidence reward, maths grading, labels as gold answers, groups of 8, a 60 s wait.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from corea.configfile import StrictModel, load_config_file
from corea.rewards import CONFIDENCE_REWARDS, RewardWeights

#: OpenRLHF 0.11.2's client gives up on one try after this many seconds (``aiohttp.ClientTimeout(total=180)``).
OPENRLHF_TIMEOUT_S = 180.0


class RewardServerConfig(StrictModel):
    host: str = "0.0.0.0"
    port: int = Field(5000, ge=0, le=65535)
    route: str = "/get_reward"  #: the POST path; OpenRLHF's ``--reward.remote_url`` is http://HOST:PORT + route
    n_samples_per_prompt: int = Field(8, ge=1)  #: OpenRLHF's ``--rollout.n_samples_per_prompt``
    confidence_reward: str = "l1"  #: a name of ``corea.rewards.CONFIDENCE_REWARDS``
    weights: RewardWeights = Field(default_factory=RewardWeights)
    #: how labels are graded: maths (math-verify), choice letters, or "auto" (a label A-J is a choice letter)
    grading: Literal["math", "choice", "auto"] = "math"
    #: seconds a group waits for its missing members after its first one arrived; stragglers are taken for as long
    group_wait_s: float = Field(60.0, gt=0, lt=OPENRLHF_TIMEOUT_S)
    max_open_groups: int = Field(4096, ge=1)  #: one more open group is refused with 503 (OpenRLHF retries)
    cache_size: int = Field(32768, ge=0)  #: answers kept for retried requests
    cache_ttl_s: float = Field(600.0, ge=0)
    max_request_bytes: int = Field(4 << 20, ge=1024)  #: larger bodies get 413
    max_groups_per_grading: int = Field(64, ge=1)  #: groups graded in one call of the worker pool
    grader_processes: int | None = Field(None, ge=1)  #: math-verify worker processes (default: CPU count)

    @field_validator("confidence_reward")
    @classmethod
    def _known_reward(cls, value: str) -> str:
        if value not in CONFIDENCE_REWARDS:
            raise ValueError(f"unknown confidence reward {value!r}; choose from {sorted(CONFIDENCE_REWARDS)}")
        return value

    @field_validator("route")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("route must start with '/'")
        return value


def load_reward_server_config(source: str | Path | dict | None = None,
                              overrides: dict[str, Any] | None = None) -> RewardServerConfig:
    """Defaults, then the YAML file (or mapping) ``source`` if given, then ``overrides`` (dotted keys)."""
    return load_config_file({} if source is None else source, RewardServerConfig, overrides)
