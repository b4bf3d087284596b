"""The host side: ``Client`` enqueues jobs onto the shop's shard and awaits an ``Outcome``."""

from producer._batching import BatchPolicy
from producer._breaker import BreakerPolicy
from producer._client import Client
from producer._outcome import Outcome, Timings

__all__ = ["BatchPolicy", "BreakerPolicy", "Client", "Outcome", "Timings"]
