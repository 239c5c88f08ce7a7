"""The sidecar: configuration, entities and their cache, resolution of a request to its
scopes, the policy that turns scopes into limits, the proxy surfaces, the admin API and UI,
alerts, metrics and logs, composed by one app factory."""

from .app import create_app
from .config import Deployment, Settings, load_config

__all__ = ["Deployment", "Settings", "create_app", "load_config"]
