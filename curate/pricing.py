"""Dollar estimates for chat-completion usage: a price table and the arithmetic, kept apart from the client.

Dollars per 1M tokens (input, output), standard online tier. Check the provider's current price list
before trusting the estimate; unknown models report cost None rather than a guess.
"""

from __future__ import annotations

PRICES_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-4": (30.00, 60.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_PRICE_FACTOR = 0.5  # the Batch API bills half the online price


def price_for(model: str) -> tuple[float, float] | None:
    """Per-1M-token prices for ``model`` (dated ids such as ``gpt-4o-2024-08-06`` map to their family)."""
    if model in PRICES_PER_1M:
        return PRICES_PER_1M[model]
    family = [name for name in PRICES_PER_1M if model.startswith(name + "-")]
    return PRICES_PER_1M[max(family, key=len)] if family else None


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int, batch_prompt_tokens: int = 0,
                  batch_completion_tokens: int = 0) -> float | None:
    """Estimated dollars for online plus Batch API tokens (batch at `BATCH_PRICE_FACTOR`); None if unknown."""
    price = price_for(model)
    if price is None:
        return None
    p_in, p_out = price
    online = prompt_tokens * p_in + completion_tokens * p_out
    batch = (batch_prompt_tokens * p_in + batch_completion_tokens * p_out) * BATCH_PRICE_FACTOR
    return (online + batch) / 1e6
