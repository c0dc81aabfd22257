"""The replay server (`curate.replay`) as a pytest fixture for the tests."""

from tests.openai_server.fixture import DEFAULT_DATA_DIR, OpenAIServer, openai_server

__all__ = ["DEFAULT_DATA_DIR", "OpenAIServer", "openai_server"]
