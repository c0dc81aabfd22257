"""OpenAI-compatible replay server (real gpt-3.5-turbo SaGE data) for tests and benchmarks."""

from tests.openai_server.fixture import DEFAULT_DATA_DIR, OpenAIServer, openai_server

__all__ = ["DEFAULT_DATA_DIR", "OpenAIServer", "openai_server"]
