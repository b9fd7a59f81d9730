"""``corea serve --config FILE [--blocking | --detach] [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import os
import time


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("serve", help="serve the cascade on Ray Serve (OpenAI-compatible HTTP API)")
    p.add_argument("--config", required=True, help="serving YAML (see configs/serve-*.yaml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--blocking", dest="blocking", action="store_true", default=True,
                      help="stay in the foreground; Ctrl-C deletes the applications (default)")
    mode.add_argument("--detach", dest="blocking", action="store_false",
                      help="deploy and exit, leaving the applications on a running cluster")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set http.port=8001 (repeatable)")
    p.set_defaults(func=run_serve)
    return p


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def loopback_node() -> None:
    """Make the Ray node this process starts listen on 127.0.0.1 only (GCS, raylet, workers, agents). ``ray.init``
    has no public option for it: it turns a loopback ``_node_ip_address`` into the routable address
    (``services.resolve_ip_for_localhost``), and Ray's servers bind every interface unless the node IP is
    127.0.0.1 (``listen_to_localhost_only``). The node IP is 127.0.0.1 where Ray takes the machine for a single
    node (``ray_constants.ENABLE_RAY_CLUSTER`` false, from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init picks the node IP


def _connect(cfg) -> None:
    """Connect to ``ray.address`` (or ``RAY_ADDRESS``), else start a local cluster whose Serve proxies run
    ``corea.serve.proxy_guard`` (a cluster started elsewhere needs ``proxy_env`` in its own environment). A
    local cluster serving on a loopback host keeps Ray's own ports (and its dashboard) on 127.0.0.1 too."""
    import ray

    from corea.serve.app import proxy_env

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        os.environ.update(proxy_env(cfg))
        if cfg.http.host in LOOPBACK:
            loopback_node()
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
                 include_dashboard=cfg.ray.include_dashboard, dashboard_host="127.0.0.1")


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from corea.serve.app import deploy
    from corea.serve.config import load_serve_config

    from corea.serve.app import prepare

    cfg = prepare(load_serve_config(args.config, _overrides(args.set)))  # API keys hashed before Ray starts
    if not args.blocking and not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--detach needs a running Ray cluster (ray.address in the config or RAY_ADDRESS); "
                         "a local cluster started here would stop when this command exits")
    _connect(cfg)
    urls = deploy(cfg)
    for name, url in urls.items():
        print(f"{name}: {url}/v1/chat/completions  (models: {url}/v1/models, metrics: {url}/metrics)", flush=True)
    if not args.blocking:
        return 0
    print("serving; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for name in urls:
            serve.delete(name)
        print("applications deleted", flush=True)
    return 0
