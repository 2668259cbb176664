"""`mllmeraser serve`: an OpenAI-compatible chat server (FastAPI on uvicorn) that applies erasers per request.

    app = create_app(model, processor, Registry(erasers, model, tenants), ServeSettings(...))

One batcher thread owns the model (engine.py); the policy (which erasers a request gets) is policy.py; the HTTP
surface is api.py (the admin endpoints admin.py, error bodies and what endpoints share http.py, the messages read
into a prompt messages.py), the request bodies' types schema.py; limits and settings, settings.py; the state on
disk (manifest, erasers, audit log), store.py and audit.py; /metrics, metrics.py. Needs the `serve` extra (pip
install "mllmeraser[serve]"); policy and settings import without it.
"""

from .policy import PolicyError, Registry, load_erasers, read_tenants
from .settings import Limits, ServeSettings
from .store import Store

_LAZY = {"create_app": "api", "decode_image": "messages", "error_body": "http", "parse_messages": "messages",
         "Engine": "engine", "Job": "engine", "Steering": "engine", "RequestFitter": "fitter", "serving": "background"}

__all__ = ["Engine", "Job", "Limits", "PolicyError", "Registry", "RequestFitter", "ServeSettings", "Steering", "Store",
           "create_app", "decode_image", "error_body", "load_erasers", "parse_messages", "read_tenants", "serving"]


def __getattr__(name: str):
    if name in _LAZY:  # the web framework and transformers' generation utilities load on first use
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
