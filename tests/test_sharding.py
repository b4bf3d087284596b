"""The shop-to-shard map: stable, balanced, and moving ~1/(N+1) of shops when a shard is added."""

from __future__ import annotations

import pytest
from celery.exceptions import QueueNotFound

from scriptpool.config import Settings, shard_for
from scriptpool.config.sharding import jump_hash
from scriptpool.workers import create_app

SHOPS = [str(n) for n in range(20_000)]


@pytest.mark.parametrize("n", [1, 2, 4, 9])
def test_growing_by_one_shard_moves_about_one_in_n_plus_one(n: int) -> None:
    """From N to N+1 shards, ~1/(N+1) of shops move, and every one of them to the new shard."""
    before = {shop: shard_for(shop, n) for shop in SHOPS}
    after = {shop: shard_for(shop, n + 1) for shop in SHOPS}
    moved = [shop for shop in SHOPS if before[shop] != after[shop]]
    assert all(after[shop] == n for shop in moved)
    assert abs(len(moved) / len(SHOPS) - 1 / (n + 1)) < 0.02


def test_shards_are_balanced_and_stable() -> None:
    """Each of 8 shards gets ~1/8 of shops, and the map is a pure function of the id."""
    counts = [0] * 8
    for shop in SHOPS:
        counts[shard_for(shop, 8)] += 1
    assert max(counts) / min(counts) < 1.15
    assert shard_for(12345, 8) == shard_for("12345", 8)
    assert [jump_hash(k, 1000) for k in (0, 1, 2**63)] == [jump_hash(k, 1000) for k in (0, 1, 2**63)]


def test_a_wrong_queue_name_is_an_error_not_a_dead_letter() -> None:
    """task_create_missing_queues is off: publishing to an unknown queue fails at once."""
    app = create_app(Settings(shards=2))
    assert app.conf.task_create_missing_queues is False
    with pytest.raises(QueueNotFound):
        app.send_task("scriptpool.execute", args=[{}], queue="sp.shard.7")
