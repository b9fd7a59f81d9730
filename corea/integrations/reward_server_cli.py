"""``corea reward-server [--config FILE] [--host H] [--port P] [--n-samples-per-prompt N] [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse


def add_reward_server_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``reward-server`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("reward-server", help="group-level RLCC reward server for OpenRLHF's --reward.remote_url")
    p.add_argument("--config", default=None, help="optional YAML of RewardServerConfig fields")
    p.add_argument("--host", default=None, help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default 5000)")
    p.add_argument("--n-samples-per-prompt", type=int, default=None,
                   help="OpenRLHF's --rollout.n_samples_per_prompt (default 8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set confidence_reward=kl (repeatable)")
    p.set_defaults(func=run_reward_server)
    return p


def run_reward_server(args: argparse.Namespace) -> int:
    from corea.integrations.group_reward_server import run_forever
    from corea.integrations.reward_server_config import load_reward_server_config

    overrides: dict = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        overrides[key] = value
    for key, value in (("host", args.host), ("port", args.port), ("n_samples_per_prompt", args.n_samples_per_prompt)):
        if value is not None:
            overrides[key] = value
    run_forever(load_reward_server_config(args.config, overrides))
    return 0
