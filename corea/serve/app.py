"""Building and deploying the Serve applications from a serving config.

``build_app`` is the ``import_path`` target of a Serve YAML (``serve run`` / ``serve deploy``):

    applications:
      - name: corea
        import_path: corea.serve.app:build_app
        args: {config: configs/serve-tiny-cpu.yaml}          # optional: overrides: {...}, app: direct_slm

``deploy`` is what ``corea serve`` and ``ray_jobs/serve_cascade.py`` run on a connected Ray cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corea.serve.config import ConfigError, ServeConfig, load_serve_config


def prepare(cfg: ServeConfig) -> ServeConfig:
    """The config as replicas receive it: ``work_dir`` absolute, API keys from ``auth.api_keys_env`` turned into
    SHA-256 digests (so keys never travel in deployment arguments) and the variable removed from this process's
    environment, so that a Ray cluster started from here does not hand it to every worker. A named but unset
    variable is an error; a config already prepared passes through unchanged."""
    from corea.serve.ingress import key_digest

    data = cfg.model_dump(mode="json")
    data["work_dir"] = str(Path(cfg.work_dir).expanduser().resolve())
    env = cfg.auth.api_keys_env
    if env:
        keys = [k.strip() for k in os.environ.pop(env, "").split(",") if k.strip()]
        if not keys:
            raise ConfigError(f"auth.api_keys_env: the environment variable {env} is unset or empty")
        data["auth"]["api_key_sha256"] = sorted(set(cfg.auth.api_key_sha256) | {key_digest(k) for k in keys})
        data["auth"]["api_keys_env"] = None
    return ServeConfig.model_validate(data)


def proxy_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment for the Serve HTTP proxies (set before Ray starts): ``corea.serve.proxy_guard`` as the
    proxy middleware, with the body deadline, minimum rate and size limit and the request-head bounds of
    ``cfg.limits``, and the API keys' SHA-256 digests (``/-/routes`` then needs a key) of a prepared config."""
    from corea.serve.proxy_guard import CALLBACK

    limits = cfg.limits
    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK,
           "COREA_BODY_TIMEOUT_S": f"{limits.body_timeout_s:g}",
           "COREA_BODY_MIN_RATE_BPS": f"{limits.body_min_rate_bps:g}",
           "COREA_MAX_BODY_BYTES": str(limits.max_body_bytes),
           "COREA_MAX_HEADERS": str(limits.max_headers),
           "COREA_MAX_HEADER_BYTES": str(limits.max_header_bytes),
           "COREA_HEADER_TIMEOUT_S": f"{limits.header_timeout_s:g}"}
    if cfg.auth.api_key_sha256:
        env["COREA_API_KEY_SHA256"] = ",".join(sorted(cfg.auth.api_key_sha256))
    return env


def build_cascade(cfg: ServeConfig):
    """The cascade application: ``CascadeIngress.bind(SLM.bind(...), LLM.bind(...), cfg)``."""
    from corea.serve.deployments import LLM, SLM, CascadeIngress

    cfg = prepare(cfg)
    data = cfg.model_dump(mode="json")
    cap = cfg.limits.max_prompt_tokens
    slm = SLM.options(**cfg.slm.serve_options("SLM")).bind(data["slm"], "slm", cfg.work_dir, cap)
    llm = LLM.options(**cfg.llm.serve_options("LLM")).bind(data["llm"], "llm", cfg.work_dir, cap)
    return CascadeIngress.options(**cfg.ingress.serve_options("CascadeIngress")).bind(slm, llm, data)


def build_direct_slm(cfg: ServeConfig):
    """The SLM alone behind the same HTTP API (one deployment, sized like the cascade's SLM tier)."""
    from corea.serve.deployments import SLMDirect

    cfg = prepare(cfg)
    data = cfg.model_dump(mode="json")
    options = cfg.slm.serve_options("SLMDirect")
    options["max_ongoing_requests"] = max(options["max_ongoing_requests"], cfg.ingress.max_ongoing_requests)
    return SLMDirect.options(**options).bind(data["slm"], data)


def build_app(args: dict[str, Any]):
    """Serve application builder: ``args = {"config": path or mapping, "overrides": {...}, "app": "cascade" |
    "direct_slm"}``."""
    if not isinstance(args, dict) or "config" not in args:
        raise ConfigError("application args need 'config': a serving config path or mapping")
    cfg = load_serve_config(args["config"], args.get("overrides"))
    kind = args.get("app", "cascade")
    if kind not in ("cascade", "direct_slm"):
        raise ConfigError(f"args.app must be 'cascade' or 'direct_slm', got {kind!r}")
    return build_direct_slm(cfg) if kind == "direct_slm" else build_cascade(cfg)


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"host": cfg.http.host, "port": cfg.http.port}
    if cfg.http.request_timeout_s is not None:
        options["request_timeout_s"] = cfg.http.request_timeout_s
    if cfg.http.keep_alive_timeout_s is not None:
        options["keep_alive_timeout_s"] = cfg.http.keep_alive_timeout_s
    return options


def deploy(cfg: ServeConfig) -> dict[str, str]:
    """Start Serve (HTTP options from the config) and run the application(s); returns name -> base URL."""
    from ray import serve

    cfg = prepare(cfg)  # once: the key variable is gone from the environment afterwards
    serve.start(http_options=http_options(cfg))
    base = f"http://{cfg.http.host}:{cfg.http.port}"
    serve.run(build_cascade(cfg), name=cfg.name, route_prefix=cfg.http.route_prefix)
    urls = {cfg.name: base + cfg.http.route_prefix.rstrip("/")}
    if cfg.direct_slm is not None:
        serve.run(build_direct_slm(cfg), name=cfg.direct_slm.app_name, route_prefix=cfg.direct_slm.route_prefix)
        urls[cfg.direct_slm.app_name] = base + cfg.direct_slm.route_prefix.rstrip("/")
    return urls
