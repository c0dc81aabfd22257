"""The offline replay server: an OpenAI-compatible endpoint that answers SaGE prompts with recorded
gpt-3.5-turbo replies (`python -m curate.replay --port 8765`), and how a client recognises one.

Importing this package needs no web framework; `curate.replay.server` / `curate.replay.app` need the
`replay` extra (fastapi, uvicorn).
"""

from curate.replay.probe import replay_sources
from curate.replay.recording import data_available, default_data_dir, recording_sources

__all__ = ["data_available", "default_data_dir", "recording_sources", "replay_sources"]
