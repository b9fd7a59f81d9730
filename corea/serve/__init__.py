"""Serving the SLM-then-LLM cascade on Ray Serve behind an OpenAI-compatible HTTP API.

``config`` (validated YAML), ``cascade`` (the routing rule, no Ray), ``ingress`` (the FastAPI app),
``deployments`` (Serve deployments), ``app`` (building and deploying), ``cli`` (``corea serve``).
"""

from corea.serve.config import ConfigError, ServeConfig, load_serve_config

__all__ = ["ConfigError", "ServeConfig", "load_serve_config"]
