"""The host side: ``Client`` enqueues jobs onto the shop's shard and awaits an ``Outcome``;
``DataStore`` manages the data scripts read (README, "Script data and sessions")."""

from scriptpool.producer._batching import BatchPolicy
from scriptpool.producer._breaker import BreakerPolicy
from scriptpool.producer._client import Client
from scriptpool.producer._data import DataStore
from scriptpool.producer._outcome import Outcome, Timings

__all__ = ["BatchPolicy", "BreakerPolicy", "Client", "DataStore", "Outcome", "Timings"]
