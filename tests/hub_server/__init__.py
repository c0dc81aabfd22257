"""A Hub-compatible test server: the real ``huggingface_hub`` client and ``datasets`` talk to it over HTTP.

``app`` is the server (FastAPI, state on disk), ``fixture`` the ``hub_server`` pytest fixture that runs it.
"""

from .fixture import HubServer, hub_server, run_hub_server

__all__ = ["HubServer", "hub_server", "run_hub_server"]
