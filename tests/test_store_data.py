"""Script data, the partner's side and the core, against real Redis: set, get, list and delete
through the host API and the CLI; isolation across apps, shops and sessions; every limit with a
hostile write (a value over 64 KiB, nested 33 deep, a key too long or with control characters, a
flood of keys, a shop's bytes across two apps, writers racing each other); the session TTL and
the bytes an expired session gives back; an invalidation for every write; APP data in every
shard group; and a shard move that carries a shop's data with its TTL."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import ExtensionPoint, Keys, Settings
from scriptpool.config import store as st
from scriptpool.config.errors import ConfigurationError, StoreLimitExceeded
from scriptpool.config.redis import InvalidationListener
from scriptpool.producer import DataStore
from scriptpool.testing import EmbeddedRedis
from tests.conftest import TEST_ARTIFACT_KEY
from tests.pool import shop_on
from tests.test_cli import FAILED, OK, USAGE, cli_env, one_line

__all__ = ["cli_env"]  # a fixture these tests use, imported from test_cli

SHARDS = 2


@pytest.fixture
def store(settings: Settings, redis_client: redis.Redis) -> Iterator[DataStore]:
    """A DataStore on the flushed test Redis."""
    with DataStore(settings) as data:
        yield data


def stored_bytes(client: redis.Redis, keys: Keys, shop: str) -> int:
    """What a shop's SHOP and SESSION data really count, from the hashes themselves: each entry
    its key and value and ``ENTRY_OVERHEAD_BYTES``, each live session ``SESSION_OVERHEAD_BYTES``
    more: what the shop's counter must equal."""
    total = 0
    for pattern, cost in (
        (f"{keys.prefix}:data-shop:*:{shop}", 0),
        (f"{keys.prefix}:data-session:*:{shop}", st.SESSION_OVERHEAD_BYTES),
    ):
        for name in client.scan_iter(match=pattern, count=1000):
            entries = client.hgetall(name)
            if entries:
                total += cost + sum(len(k) + len(v) + st.ENTRY_OVERHEAD_BYTES for k, v in entries.items())
    return total


def counter(client: redis.Redis, keys: Keys, shop: str) -> int:
    """The shop's byte counter (0 when absent)."""
    return int(client.get(keys.data_bytes(shop)) or 0)


# -- the host API and the CLI --------------------------------------------------------------------


def test_set_get_list_and_delete_through_the_host_api(store: DataStore, redis_client: redis.Redis) -> None:
    """APP and SHOP data are separate maps: each reads back what was set (as JSON, minified), lists
    its keys with their values' bytes, and a delete says whether the key was there."""
    rates = {"zones": [{"name": "EU", "cents": 499}], "currency": "EUR"}
    assert store.set("carrier", "rates", rates) == len(st.encode_value(rates))
    assert store.set("carrier", "rates", {"override": True}, shop="1234") == len(b'{"override":true}')
    assert store.get("carrier", "rates") == rates
    assert store.get("carrier", "rates", shop=1234) == {"override": True}
    assert store.get_raw("carrier", "rates") == st.encode_value(rates)
    assert store.get("carrier", "missing", default="none") == "none"
    store.set("carrier", "note", "ünïcode", shop="1234")
    assert store.list("carrier", shop="1234") == {"note": len('"ünïcode"'.encode()), "rates": 17}
    assert store.list("carrier") == {"rates": len(st.encode_value(rates))}
    assert store.delete("carrier", "rates", shop="1234") is True
    assert store.delete("carrier", "rates", shop="1234") is False
    assert store.get("carrier", "rates", shop="1234") is None
    assert store.get("carrier", "rates") == rates  # the APP key is another key
    keys = Keys()
    assert (
        counter(redis_client, keys, "1234")
        == stored_bytes(redis_client, keys, "1234")
        == st.entry_bytes("note", '"ünïcode"'.encode())
        == len("note") + len('"ünïcode"'.encode()) + st.ENTRY_OVERHEAD_BYTES
    )


def test_the_cli_sets_gets_lists_and_deletes_with_json(
    cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data set/get/list/delete`` with ``--json`` give one JSON object each; text output is one
    line (a listing, one per key); a missing key is ``data_not_found`` (exit 1), a value over
    a limit ``store_limit_exceeded`` (exit 1), a file that is not JSON a usage mistake (exit 2)."""
    value = tmp_path / "rates.json"
    value.write_text('{ "cents": [499, 999] }\n')
    assert main(["data", "set", "--app", "carrier", "--shop", "7", "rates", str(value), "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"app": "carrier", "scope": "SHOP", "shop": "7", "key": "rates", "bytes": 19, "groups": 1}
    assert main(["data", "get", "--app", "carrier", "--shop", "7", "rates"]) == OK
    assert capsys.readouterr().out == '{"cents":[499,999]}\n'
    assert main(["data", "get", "--app", "carrier", "--shop", "7", "rates", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["value"] == {"cents": [499, 999]}
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(value.read_bytes())))
    assert main(["data", "set", "--app", "carrier", "banner", "-"]) == OK
    assert capsys.readouterr().out.startswith("stored banner (19 bytes) in app carrier's data for every shop")
    assert main(["data", "list", "--app", "carrier", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["keys"] == {"banner": 19}
    assert main(["data", "list", "--app", "carrier", "--shop", "7"]) == OK
    assert capsys.readouterr().out.splitlines()[1].split() == ["rates", "19", "B"]
    assert main(["data", "list", "--app", "other", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["keys"] == {}
    line = one_line(capsys, ["data", "get", "--app", "carrier", "--shop", "8", "rates"], FAILED)
    assert line.startswith("scriptpool: data_not_found: no key 'rates' in app carrier's data for shop 8")
    big = tmp_path / "big.json"
    big.write_text(json.dumps("x" * st.MAX_VALUE_BYTES))
    line = one_line(capsys, ["data", "set", "--app", "carrier", "big", str(big)], FAILED)
    assert "store_limit_exceeded" in line and str(st.MAX_VALUE_BYTES) in line
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert "is not JSON" in one_line(capsys, ["data", "set", "--app", "carrier", "k", str(bad)], USAGE)
    assert main(["data", "delete", "--app", "carrier", "--shop", "7", "rates", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["deleted"] is True
    assert main(["data", "delete", "--app", "carrier", "--shop", "7", "rates"]) == OK
    assert "nothing to delete" in capsys.readouterr().out


def test_data_get_shows_a_value_that_is_not_json_as_stored_with_a_warning(
    cli_env: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value put into Redis by hand (not JSON, not even UTF-8) is printed as stored, with one
    warning on stderr; with ``--json`` its ``value`` is null and ``stored`` holds the text."""
    keys = Keys()
    redis_client.hset(keys.data_shop("carrier", "7"), "raw", b"not json \xff")
    assert main(["data", "get", "--app", "carrier", "--shop", "7", "raw"]) == OK
    captured = capsys.readouterr()
    assert captured.out == "not json \ufffd\n"
    assert captured.err.splitlines() == [
        "scriptpool: warning: the value of 'raw' in app carrier's data for shop 7 is not JSON "
        "(not written by scriptpool); shown as stored"
    ]
    assert main(["data", "get", "--app", "carrier", "--shop", "7", "raw", "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert (shown["value"], shown["stored"], shown["bytes"]) == (None, "not json \ufffd", 10)
    redis_client.hset(keys.data_app("carrier"), "deep", b"[" * 100_000)
    assert main(["data", "get", "--app", "carrier", "deep"]) == OK
    assert "is not JSON" in capsys.readouterr().err
    redis_client.hset(keys.data_app("carrier"), "text", b'"a string"')
    assert main(["data", "get", "--app", "carrier", "text", "--json"]) == OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["value"] == "a string" and "stored" not in captured.out
    assert captured.err == ""


def test_data_is_isolated_across_apps_shops_and_sessions(
    store: DataStore, settings: Settings, redis_client: redis.Redis
) -> None:
    """One app's data is not another's; one shop's is not another's; a session belongs to one
    shop and one app: the same token at another shop, or for another app, sees nothing."""
    store.set("a", "k", 1, shop="1")
    assert store.get("b", "k", shop="1") is None and store.get("a", "k", shop="2") is None
    assert store.get("a", "k") is None  # not the APP scope either
    keys = settings.keys
    write = st.Write(st.SESSION, "seen", st.encode_value(["sku-1"]))
    token = "token:with spaces:*?"  # colons, spaces and glob characters: hashed, never in a key
    assert st.apply_writes(redis_client, keys, "a", "1", token, [write]) is None
    assert store.get_session("a", "1", token) == {"seen": ["sku-1"]}
    assert store.get_session("a", "2", token) == {}
    assert store.get_session("b", "1", token) == {}
    assert store.get_session("a", "1", token[:-1]) == {}
    # Tokens never appear in keys: they are hashed, so any string is safe.
    assert not list(redis_client.scan_iter(match="*token*"))


# -- limits, hostile --------------------------------------------------------------------------------


def _refused(limit: str, action: Any) -> StoreLimitExceeded:
    with pytest.raises(StoreLimitExceeded) as caught:
        action()
    assert caught.value.code == "store_limit_exceeded" and caught.value.detail["limit"] == limit
    return caught.value


def nested(depth: int) -> Any:
    """A value nested ``depth`` arrays deep."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_hostile_values_and_keys_are_refused_by_name_and_write_nothing(
    store: DataStore, redis_client: redis.Redis
) -> None:
    """A value of exactly 64 KiB is taken and one byte more refused; 32 levels are taken and 33
    refused (100,000 too, without a RecursionError); a key of 256 characters is taken, 257 or one
    with a control character refused; NaN, a set and a non-string object key are not JSON."""
    at_cap = "x" * (st.MAX_VALUE_BYTES - 2)  # the quotes make it exactly the cap
    assert store.set("a", "at-cap", at_cap, shop="1") == st.MAX_VALUE_BYTES
    error = _refused("value_bytes", lambda: store.set("a", "over", at_cap + "x", shop="1"))
    assert error.detail["scope"] == "SHOP" and error.detail["key"] == "over"
    assert store.set("a", "deep", nested(st.MAX_VALUE_DEPTH)) > 0
    _refused("value_depth", lambda: store.set("a", "deeper", nested(st.MAX_VALUE_DEPTH + 1)))
    _refused("value_depth", lambda: store.set("a", "deepest", nested(100_000)))
    _refused("value_depth", lambda: store.set("a", "objects", json.loads('{"a":' * 33 + "1" + "}" * 33)))
    assert store.set("a", "k" * st.MAX_KEY_CHARS, 1) > 0
    _refused("key_chars", lambda: store.set("a", "k" * (st.MAX_KEY_CHARS + 1), 1))
    for key in ("line\nbreak", "esc\x1b[2J", "nul\x00", "bidi\u202e", "del\x7f"):
        _refused("key_printable", lambda key=key: store.set("a", key, 1))
    _refused("key", lambda: store.set("a", "", 1))
    for value in (float("nan"), float("inf"), {1, 2}, {1: "int key"}, b"bytes", "\ud800"):
        _refused("value_json", lambda value=value: store.set("a", "bad", value))
    assert store.list("a") == {"deep": len(st.encode_value(nested(32))), "k" * 256: 1}
    assert store.list("a", shop="1") == {"at-cap": st.MAX_VALUE_BYTES}


def test_a_flood_of_keys_stops_at_the_cap_all_or_nothing(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A scope takes 1,000 keys; a call that would pass that writes none of its writes (not even
    those before the one over); overwriting and deleting still work at the cap; more than 64
    writes at once are refused before Redis sees them."""
    keys = settings.keys
    for start in range(0, 990, 64):
        batch = [st.Write(st.SHOP, f"k{i}", b"1") for i in range(start, min(start + 64, 990))]
        assert st.apply_writes(redis_client, keys, "a", "1", None, batch) is None
    over = [st.Write(st.SHOP, f"k{i}", b"1") for i in range(990, 1001)]
    refusal = st.apply_writes(redis_client, keys, "a", "1", None, over)
    assert refusal is not None and (refusal.limit, refusal.index, refusal.key) == (
        "keys_per_scope",
        10,
        "k1000",
    )
    assert redis_client.hlen(keys.data_shop("a", "1")) == 990  # none of the eleven
    assert st.apply_writes(redis_client, keys, "a", "1", None, over[:10]) is None
    assert redis_client.hlen(keys.data_shop("a", "1")) == st.MAX_KEYS_PER_SCOPE
    assert st.apply_writes(redis_client, keys, "a", "1", None, [st.Write(st.SHOP, "k0", b"2")]) is None
    swap = [st.Write(st.SHOP, "k1", None), st.Write(st.SHOP, "fresh", b"3")]
    assert st.apply_writes(redis_client, keys, "a", "1", None, swap) is None
    with DataStore(settings) as store:
        error = _refused("keys_per_scope", lambda: store.set("a", "one-more", 1, shop="1"))
        assert error.detail["maximum"] == st.MAX_KEYS_PER_SCOPE
        # Another scope, app or shop has its own 1,000.
        assert store.set("a", "one-more", 1, shop="2") and store.set("b", "one-more", 1, shop="1")
    flood = [st.Write(st.SHOP, f"f{i}", b"1") for i in range(st.MAX_WRITES_PER_RUN + 1)]
    refusal = st.apply_writes(redis_client, keys, "c", "1", None, flood)
    assert refusal is not None and refusal.limit == "writes_per_run"
    assert not redis_client.exists(keys.data_shop("c", "1"))
    assert counter(redis_client, keys, "1") == stored_bytes(redis_client, keys, "1")


def test_a_shops_bytes_are_capped_across_its_apps(settings: Settings, redis_client: redis.Redis) -> None:
    """SHOP data of two apps together stop at 4 MiB for the shop; another shop is not affected;
    a delete gives the bytes back; the counter always equals what the hashes hold."""
    keys = settings.keys
    value = b'"' + b"v" * (60 * 1024) + b'"'
    written = 0
    for app in ("a", "b"):
        for i in range(40):
            refusal = st.apply_writes(redis_client, keys, app, "1", None, [st.Write(st.SHOP, f"v{i}", value)])
            if refusal is not None:
                assert refusal.limit == "bytes_per_shop" and refusal.maximum == st.MAX_BYTES_PER_SHOP
                break
            written += 1
    assert 40 < written < 80  # both apps wrote, and the second stopped at the cap
    total = counter(redis_client, keys, "1")
    assert total == stored_bytes(redis_client, keys, "1") <= st.MAX_BYTES_PER_SHOP
    assert total + st.entry_bytes("v99", value) > st.MAX_BYTES_PER_SHOP  # the refused one would pass it
    assert st.apply_writes(redis_client, keys, "b", "2", None, [st.Write(st.SHOP, "v0", value)]) is None
    assert st.apply_writes(redis_client, keys, "a", "1", None, [st.Write(st.SHOP, "v0", None)]) is None
    assert st.apply_writes(redis_client, keys, "b", "1", None, [st.Write(st.SHOP, "new", value)]) is None
    assert counter(redis_client, keys, "1") == stored_bytes(redis_client, keys, "1")


def test_writers_racing_each_other_never_pass_the_caps(settings: Settings, redis_url: str) -> None:
    """Two threads add keys as fast as they can: one scope ends with exactly 1,000 keys, and two
    apps writing one shop end at or under 4 MiB, with the counter equal to what is stored."""
    keys = settings.keys
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    refusals: list[str] = []

    def add(prefix: str, value: bytes, app: str) -> None:
        mine = redis.Redis.from_url(redis_url)
        for i in range(2_000):  # more than either cap allows: each writer ends refused
            refusal = st.apply_writes(mine, keys, app, "9", None, [st.Write(st.SHOP, f"{prefix}{i}", value)])
            if refusal is not None:
                refusals.append(refusal.limit)
                break
        mine.close()

    threads = [threading.Thread(target=add, args=(p, b"1", "keys")) for p in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.hlen(keys.data_shop("keys", "9")) == st.MAX_KEYS_PER_SCOPE
    assert refusals == ["keys_per_scope", "keys_per_scope"]
    client.delete(keys.data_shop("keys", "9"))
    client.delete(keys.data_bytes("9"))
    refusals.clear()
    big = b'"' + b"v" * (50 * 1024) + b'"'
    threads = [threading.Thread(target=add, args=("v", big, a)) for a in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refusals == ["bytes_per_shop", "bytes_per_shop"]
    assert counter(client, keys, "9") == stored_bytes(client, keys, "9") <= st.MAX_BYTES_PER_SHOP
    client.close()


def test_every_session_and_entry_counts_its_overhead_up_to_the_cap(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A new session of one tiny key costs its key, its value, ``ENTRY_OVERHEAD_BYTES`` and
    ``SESSION_OVERHEAD_BYTES`` (its names Redis keeps in three places): sessions of one byte stop
    at exactly the cap divided by that, not at 2 million; a second key in a session costs no second
    session; deleting a session's keys gives back exactly what they cost; the refusal names the
    shop plainly."""
    keys = settings.keys
    tiny = [st.Write(st.SESSION, "k", b"0")]
    each = st.SESSION_OVERHEAD_BYTES + st.entry_bytes("k", b"0")
    assert each == 256 + 1 + 1 + 64
    expected = st.MAX_BYTES_PER_SHOP // each
    for i in range(expected):
        assert st.apply_writes(redis_client, keys, "a", "1", f"tok-{i}", tiny, channel="") is None
    assert counter(redis_client, keys, "1") == expected * each
    refusal = st.apply_writes(redis_client, keys, "a", "1", "one-more", tiny, channel="")
    assert refusal is not None and (refusal.limit, refusal.current) == ("bytes_per_shop", expected * each)
    assert refusal.message == (
        f"the SHOP and SESSION data of shop '1' count {expected * each} bytes (64 per key and 256 per "
        f"session included); writing 'k' would pass {st.MAX_BYTES_PER_SHOP}"
    )
    assert not redis_client.exists(keys.data_session("a", "1", "one-more"))
    assert redis_client.hlen(keys.data_session_sizes("1")) == redis_client.zcard(keys.data_sessions("1"))
    assert redis_client.hlen(keys.data_session_sizes("1")) == expected
    # Room for one entry but not a session: a key in an existing session fits.
    gone = [st.Write(st.SESSION, "k", None)]
    assert st.apply_writes(redis_client, keys, "a", "1", "tok-0", gone, channel="") is None
    assert counter(redis_client, keys, "1") == (expected - 1) * each
    assert not redis_client.hexists(keys.data_session_sizes("1"), keys.data_session("a", "1", "tok-0"))
    two = [st.Write(st.SESSION, "k", b"0"), st.Write(st.SESSION, "k2", b"0")]
    assert st.apply_writes(redis_client, keys, "a", "1", "tok-0", two, channel="") is None
    assert counter(redis_client, keys, "1") == expected * each + st.entry_bytes("k2", b"0")
    assert counter(redis_client, keys, "1") == stored_bytes(redis_client, keys, "1")
    size = redis_client.hget(keys.data_session_sizes("1"), keys.data_session("a", "1", "tok-0"))
    assert int(size or 0) == each + st.entry_bytes("k2", b"0")
    # A set and a delete of a new session in one call leave nothing counted.
    both = [st.Write(st.SESSION, "k", b"0"), st.Write(st.SESSION, "k", None)]
    assert st.apply_writes(redis_client, keys, "b", "2", "t", both, channel="") is None
    assert counter(redis_client, keys, "2") == 0 and not redis_client.hlen(keys.data_session_sizes("2"))


def test_a_session_expires_after_its_ttl_and_gives_its_bytes_back(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Every write to a session sets its TTL; once Redis drops it, the shop's next write gives
    its bytes back to the counter, and the same token starts from nothing."""
    keys = settings.keys
    write = st.Write(st.SESSION, "seen", st.encode_value({"sku": "1"}))
    assert st.apply_writes(redis_client, keys, "a", "1", "t", [write], session_ttl_s=120) is None
    name = keys.data_session("a", "1", "t")
    assert 119_000 < redis_client.pttl(name) <= 120_000
    assert st.apply_writes(redis_client, keys, "a", "1", "t", [write]) is None  # the default TTL
    assert st.DEFAULT_SESSION_TTL_S * 1000 - 1000 < redis_client.pttl(name) <= st.DEFAULT_SESSION_TTL_S * 1000
    # A real expiry: one second.
    assert st.apply_writes(redis_client, keys, "a", "1", "short", [write], session_ttl_s=1) is None
    both = counter(redis_client, keys, "1")
    one = st.SESSION_OVERHEAD_BYTES + st.entry_bytes("seen", write.value or b"")
    assert both == stored_bytes(redis_client, keys, "1") == 2 * one
    time.sleep(1.2)
    assert not redis_client.exists(keys.data_session("a", "1", "short"))
    assert st.apply_writes(redis_client, keys, "b", "1", None, [st.Write(st.SHOP, "x", b"1")]) is None
    assert (
        counter(redis_client, keys, "1")
        == stored_bytes(redis_client, keys, "1")
        == one + st.entry_bytes("x", b"1")
    )
    # The same token again: a new session, counted once.
    assert st.apply_writes(redis_client, keys, "a", "1", "short", [write], session_ttl_s=1) is None
    time.sleep(1.2)
    assert st.apply_writes(redis_client, keys, "a", "1", "short", [write], session_ttl_s=60) is None
    assert counter(redis_client, keys, "1") == stored_bytes(redis_client, keys, "1")
    # Deleting a session's last key ends it and its bookkeeping.
    gone = st.Write(st.SESSION, "seen", None)
    assert st.apply_writes(redis_client, keys, "a", "1", "short", [gone]) is None
    assert not redis_client.exists(keys.data_session("a", "1", "short"))
    assert not redis_client.hexists(keys.data_session_sizes("1"), keys.data_session("a", "1", "short"))
    refusal = st.apply_writes(redis_client, keys, "a", "1", None, [write])
    assert refusal is not None and refusal.limit == "session"


def test_the_session_ttl_is_an_extension_point_setting(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ep define --session-ttl`` stores it and ``ep show`` shows it (the default without it);
    one out of 60 s..30 days is refused, on the command line and in a stored record."""
    assert main(["ep", "define", "journey", "--session-ttl", "600"]) == OK
    capsys.readouterr()
    assert main(["ep", "show", "journey", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["session_ttl_s"] == 600
    assert main(["ep", "show", "journey"]) == OK
    assert "sessions      live 600 s after their last write" in capsys.readouterr().out
    assert main(["ep", "define", "plain"]) == OK
    capsys.readouterr()
    assert main(["ep", "show", "plain", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["session_ttl_s"] == st.DEFAULT_SESSION_TTL_S
    for bad in ("59", str(30 * 24 * 3600 + 1), "soon"):
        assert "--session-ttl" in one_line(capsys, ["ep", "define", "x", "--session-ttl", bad], USAGE)
    with pytest.raises(ConfigurationError, match="session_ttl_s"):
        ExtensionPoint.from_json(json.dumps({"name": "x", "session_ttl_s": 10}))
    assert ExtensionPoint.from_json(json.dumps({"name": "x"})).session_ttl_s is None


# -- invalidation ------------------------------------------------------------------------------------


def test_every_call_publishes_one_invalidation_listing_its_keys_and_a_refusal_none(
    store: DataStore, settings: Settings, redis_client: redis.Redis
) -> None:
    """A set, a delete and a script's writes each announce, in ONE message per call in the
    documented form, every key they change (once, however often written); a refused call
    announces nothing."""
    keys = settings.keys
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.invalidations())
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    store.set("a", "rates", {"x": 1})
    store.set("a", "rates", {"x": 1}, shop="5")
    store.delete("a", "rates", shop="5")
    writes = [
        st.Write(st.SESSION, "seen", b"1"),
        st.Write(st.SHOP, "count", b"1"),
        st.Write(st.APP, "config", b"3"),
        st.Write(st.SHOP, "count", b"2"),
    ]
    assert st.apply_writes(redis_client, keys, "a", "5", "tok", writes) is None
    _refused("value_depth", lambda: store.set("a", "deep", nested(40)))
    refusal = st.apply_writes(redis_client, keys, "a", "5", None, [st.Write(st.SHOP, "\x00", b"1")])
    assert refusal is not None and refusal.limit == "key_printable"
    same = [st.Write(st.SHOP, "k", b"1")] * st.MAX_WRITES_PER_RUN
    assert st.apply_writes(redis_client, keys, "a", "5", None, same) is None
    raw: list[bytes] = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        raw.append(message["data"])
    digest = Keys.session_digest("tok")
    assert [st.parse_invalidation(m) for m in raw] == [
        st.DataInvalidation("a", None, None, (("APP", "rates"),)),
        st.DataInvalidation("a", "5", None, (("SHOP", "rates"),)),
        st.DataInvalidation("a", "5", None, (("SHOP", "rates"),)),
        st.DataInvalidation("a", "5", digest, (("SESSION", "seen"), ("SHOP", "count"), ("APP", "config"))),
        st.DataInvalidation("a", "5", None, (("SHOP", "k"),)),
    ]
    assert json.loads(raw[3]) == {
        "data": 1,
        "app": "a",
        "shop_id": "5",
        "session": digest,
        "keys": [["SESSION", "seen"], ["SHOP", "count"], ["APP", "config"]],
    }
    pubsub.close()


def test_invalidation_messages_parse_and_hostile_ones_are_none(settings: Settings) -> None:
    """The parser takes exactly the builder's messages (as text or decoded); anything else
    anyone could publish is None; and the binding listener hands data messages, decoded once,
    to ``on_data``, never forgetting its bindings for them."""
    message = st.invalidation_message("a", "7", None, [("SHOP", "k"), ("APP", "c"), ("SHOP", "k")])
    decoded = {"data": 1, "app": "a", "shop_id": "7", "session": None, "keys": [["SHOP", "k"], ["APP", "c"]]}
    assert json.loads(message) == decoded
    expected = st.DataInvalidation("a", "7", None, (("SHOP", "k"), ("APP", "c")))
    assert st.parse_invalidation(message) == st.parse_invalidation(decoded) == expected
    # The longest a call's message can be: every write a distinct key of 4-byte characters.
    longest = [
        ("SHOP", "\U0001f600" * (st.MAX_KEY_CHARS - 1) + chr(65 + i)) for i in range(st.MAX_WRITES_PER_RUN)
    ]
    assert st.parse_invalidation(st.invalidation_message("a", "7", "d" * 64, longest)) is not None
    too_many = [["APP", str(i)] for i in range(st.MAX_WRITES_PER_RUN + 1)]
    for hostile in (
        b"\xff\xfe",
        b"",
        b"[]",
        b"null",
        b'"data"',
        b'{"data": "SHOP", "app": "a", "shop_id": "7", "session": null, "key": "k"}',
        b'{"data": 1, "app": "a", "shop_id": null, "session": null, "keys": [["GLOBAL", "k"]]}',
        b'{"data": 1, "app": "a", "shop_id": null, "session": null, "keys": [["SHOP", "k"]]}',
        b'{"data": 1, "app": "a", "shop_id": "7", "session": null, "keys": [["SESSION", "k"]]}',
        b'{"data": 1, "app": 5, "shop_id": "7", "session": null, "keys": [["SHOP", "k"]]}',
        b'{"data": 1, "app": "a", "shop_id": "7", "session": null, "keys": [["SHOP", ["k"]]]}',
        b'{"data": 1, "app": "a", "shop_id": "7", "session": null, "keys": [["SHOP"]]}',
        b'{"data": 1, "app": "a", "shop_id": "7", "session": null, "keys": ["SHOP"]}',
        b'{"data": 1, "app": "a", "shop_id": "", "session": null, "keys": []}',
        b'{"data": 1, "app": "a", "shop_id": "7", "session": null, "keys": {}}',
        json.dumps({"data": 1, "app": "a", "shop_id": None, "session": None, "keys": too_many}).encode(),
        b"[" * 100_000,
    ):
        assert st.parse_invalidation(hostile) is None
    forgotten: list[tuple[str | None, str | None]] = []
    data: list[object] = []
    listener = InvalidationListener(
        settings.redis_url,
        settings.keys.invalidations(),
        lambda ep, shop: forgotten.append((ep, shop)),
        on_data=data.append,
    )
    listener.apply(message.encode())
    listener.apply(b'{"ep": "discount", "shop_id": "7"}')
    listener.apply(b"[" * 100_000)  # logged and ignored, not a RecursionError on its thread
    assert data == [decoded] and forgotten == [("discount", "7")]


# -- shard groups --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_redis() -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """Two private Redis servers for two shard groups."""
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        yield a, b


@pytest.fixture
def groups(
    group_redis: tuple[EmbeddedRedis, EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, redis.Redis, redis.Redis]:
    """Settings with shard 0 on Redis A and shard 1 on Redis B (both flushed), in the CLI's
    environment too."""
    a, b = group_redis
    clients = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
    for client in clients:
        client.flushall()
    settings = Settings(artifact_key=TEST_ARTIFACT_KEY, shards=SHARDS, shard_groups=f"0={a.url};1={b.url}")
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return settings, *clients


def test_app_data_is_in_every_group_and_shop_data_in_its_shops(
    groups: tuple[Settings, redis.Redis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    """APP data is written to both groups' Redis (a worker reads its own group's), SHOP data to
    the shop's group only; ``status`` counts each group's data."""
    settings, a, b = groups
    keys = settings.keys
    shop_a, shop_b = shop_on(0, SHARDS), shop_on(1, SHARDS)
    with DataStore(settings) as store:
        store.set("carrier", "rates", [1, 2])
        store.set("carrier", "local", "a", shop=shop_a)
        store.set("carrier", "local", "b", shop=shop_b)
        assert store.get("carrier", "local", shop=shop_b) == "b"
        assert (
            a.hget(keys.data_app("carrier"), "rates") == b.hget(keys.data_app("carrier"), "rates") == b"[1,2]"
        )
        assert a.exists(keys.data_shop("carrier", shop_a)) and not b.exists(keys.data_shop("carrier", shop_a))
        assert b.exists(keys.data_shop("carrier", shop_b)) and not a.exists(keys.data_shop("carrier", shop_b))
        assert store.delete("carrier", "rates") is True
        assert not a.exists(keys.data_app("carrier")) and not b.exists(keys.data_app("carrier"))
        store.set("carrier", "rates", [3])
    main(["status", "--json"])
    shown = json.loads(capsys.readouterr().out)
    sizes = {group["group"]: group["data"] for group in shown["groups"]}
    assert [s["shops"] for s in sizes.values()] == [1, 1]
    assert [s["app_keys"] for s in sizes.values()] == [1, 1]
    one = st.entry_bytes("local", b'"a"')
    assert [s["shop_bytes"] for s in sizes.values()] == [one, one]
    main(["status"])
    assert f"script data: 1 shop(s) hold {one} bytes of SHOP and SESSION data" in capsys.readouterr().out


def test_a_shard_move_carries_a_shops_data_with_its_ttl(
    groups: tuple[Settings, redis.Redis, redis.Redis],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``shard move`` copies the shard's shops' SHOP and SESSION data, their byte counts and the
    sessions' TTLs, and APP data the target lacks, and no other shard's data; the late copy of
    ``shard drain`` adds what the target lacks and keeps what it was written after the switch."""
    settings, a, b = groups
    keys = settings.keys
    shop, stray = shop_on(0, SHARDS, skip=3), shop_on(1, SHARDS)
    writes = [st.Write(st.SHOP, "rates", b"[1]"), st.Write(st.SESSION, "seen", b'"sku"')]
    assert st.apply_writes(a, keys, "carrier", shop, "tok", writes, session_ttl_s=600) is None
    assert st.apply_writes(a, keys, "carrier", None, None, [st.Write(st.APP, "all", b"1")]) is None
    assert st.apply_writes(a, keys, "carrier", stray, None, [st.Write(st.SHOP, "x", b"1")]) is None
    source, target = settings.group_of(0).url, settings.group_of(1).url
    assert main(["shard", "move", "0", "--to", target, "--json"]) == OK
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == 5 and report["app_data"] == 1  # shop, session, counter, zset, sizes
    session = keys.data_session("carrier", shop, "tok")
    assert b.hgetall(session) == a.hgetall(session) == {b"seen": b'"sku"'}
    assert 590_000 < b.pttl(session) <= 600_000
    assert b.hgetall(keys.data_shop("carrier", shop)) == {b"rates": b"[1]"}
    assert counter(b, keys, shop) == counter(a, keys, shop) == stored_bytes(b, keys, shop)
    assert b.hget(keys.data_app("carrier"), "all") == b"1"
    assert not b.exists(keys.data_shop("carrier", stray))  # shard 1's shop: not moved
    # After the switch scripts write to the new group, and an old worker's late write to the old.
    assert st.apply_writes(b, keys, "carrier", shop, None, [st.Write(st.SHOP, "rates", b"[2]")]) is None
    late_session = [st.Write(st.SESSION, "late", b"1")]
    assert st.apply_writes(a, keys, "carrier", shop, "late", late_session, session_ttl_s=300) is None
    monkeypatch.setenv("SCRIPTPOOL_SHARD_GROUPS", report["shard_groups"])
    assert main(["shard", "drain", "0", "--from", source, "--quiet-s", "0.2", "--json"]) == OK
    drained = json.loads(capsys.readouterr().out)
    assert drained["late_copy"]["data"] == 1  # the late session: the target lacked it
    assert b.hget(keys.data_shop("carrier", shop), "rates") == b"[2]"
    assert 0 < b.pttl(keys.data_session("carrier", shop, "late")) <= 300_000


def test_recounting_a_shop_sets_its_counter_from_what_its_hashes_hold(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """``recount_shop`` replaces a wrong counter and lost bookkeeping with what the hashes hold:
    sessions it is given and sessions only the bookkeeping names are counted, an expired one the
    bookkeeping still names is dropped, and the sessions' expiry times are set again."""
    keys = settings.keys
    writes = [st.Write(st.SHOP, "rates", b"[1]"), st.Write(st.SESSION, "seen", b'"sku"')]
    assert st.apply_writes(redis_client, keys, "a", "3", "kept", writes, session_ttl_s=600) is None
    assert st.apply_writes(redis_client, keys, "a", "3", "named", writes[1:], session_ttl_s=600) is None
    assert st.apply_writes(redis_client, keys, "a", "3", "gone", writes[1:], session_ttl_s=600) is None
    right = counter(redis_client, keys, "3")
    redis_client.delete(keys.data_session("a", "3", "gone"))  # as if it expired, unswept
    redis_client.set(keys.data_bytes("3"), 9_999_999)
    redis_client.hdel(keys.data_session_sizes("3"), keys.data_session("a", "3", "kept"))
    redis_client.zrem(keys.data_sessions("3"), keys.data_session("a", "3", "kept"))
    shop_hashes = [keys.data_shop("a", "3")]
    total = st.recount_shop(redis_client, keys, "3", shop_hashes, [keys.data_session("a", "3", "kept")])
    one_session = st.SESSION_OVERHEAD_BYTES + st.entry_bytes("seen", b'"sku"')
    assert (
        total
        == counter(redis_client, keys, "3")
        == stored_bytes(redis_client, keys, "3")
        == right - one_session
    )
    sizes = redis_client.hgetall(keys.data_session_sizes("3"))
    assert sizes == {
        keys.data_session("a", "3", t).encode(): str(one_session).encode() for t in ("kept", "named")
    }
    expiries = dict(redis_client.zrange(keys.data_sessions("3"), 0, -1, withscores=True))
    assert set(expiries) == set(sizes)
    assert all(
        time.time() * 1000 + 590_000 < when <= time.time() * 1000 + 600_000 for when in expiries.values()
    )
    # Nothing left: no counter at all.
    redis_client.delete(*shop_hashes, *(n.decode() for n in sizes))
    assert st.recount_shop(redis_client, keys, "3", [], []) == 0
    assert not redis_client.exists(
        keys.data_bytes("3"), keys.data_session_sizes("3"), keys.data_sessions("3")
    )


def test_a_shard_move_recounts_the_counters_it_copied(
    groups: tuple[Settings, redis.Redis, redis.Redis],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A counter copied at another instant than its hashes (here: a source counter off by a
    phantom 3 MB, as a delete landing between the two DUMPs leaves it) is recounted on the target
    from what it holds, by ``shard move`` and by the late copy of ``shard drain`` (which adds a
    session the target's counter never saw); the shop can then use its whole 4 MiB."""
    settings, a, b = groups
    keys = settings.keys
    shop = shop_on(0, SHARDS, skip=5)
    writes = [st.Write(st.SHOP, "rates", b"[1]"), st.Write(st.SESSION, "seen", b'"sku"')]
    assert st.apply_writes(a, keys, "carrier", shop, "tok", writes, session_ttl_s=600) is None
    a.incrby(keys.data_bytes(shop), 3_000_000)
    a.hdel(keys.data_session_sizes(shop), keys.data_session("carrier", shop, "tok"))
    source, target = settings.group_of(0).url, settings.group_of(1).url
    assert main(["shard", "move", "0", "--to", target, "--json"]) == OK
    report = json.loads(capsys.readouterr().out)
    assert counter(b, keys, shop) == stored_bytes(b, keys, shop) == stored_bytes(a, keys, shop) > 0
    assert counter(a, keys, shop) > 3_000_000  # the source is left as it was
    assert b.hlen(keys.data_session_sizes(shop)) == 1
    # The late copy: a session written in the old group after the switch is added, and counted.
    assert st.apply_writes(a, keys, "carrier", shop, "late", writes[1:], session_ttl_s=300) is None
    b.incrby(keys.data_bytes(shop), 3_000_000)  # drift on the target too
    monkeypatch.setenv("SCRIPTPOOL_SHARD_GROUPS", report["shard_groups"])
    assert main(["shard", "drain", "0", "--from", source, "--quiet-s", "0.2", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["late_copy"]["data"] == 1
    assert counter(b, keys, shop) == stored_bytes(b, keys, shop)
    assert b.hlen(keys.data_session_sizes(shop)) == 2
    big = st.encode_value("x" * 60_000)
    fill = [st.Write(st.SHOP, f"n{i}", big) for i in range(60)]  # 3.6 MB: refused with phantom bytes
    assert st.apply_writes(b, keys, "carrier", shop, None, fill, channel="") is None
    assert counter(b, keys, shop) == stored_bytes(b, keys, shop)


def test_data_keys_are_a_shops_keys() -> None:
    """Every per-shop data key is matched by the shop's patterns and names its shop (whatever
    the token holds); none goes with a binding; APP data is no shop's."""
    import fnmatch

    keys = Keys("p")
    mine = [
        keys.data_shop("app", "7"),
        keys.data_session("app", "7", "a:b:c 7"),
        keys.data_bytes("7"),
        keys.data_sessions("7"),
        keys.data_session_sizes("7"),
    ]
    patterns = keys.shop_key_patterns("7")
    others = [keys.data_shop("app", "17"), keys.data_session("app", "7.1", "t"), keys.data_app("app")]
    assert all(any(fnmatch.fnmatchcase(k, p) for p in patterns) for k in mine)
    assert not any(fnmatch.fnmatchcase(k, p) for k in others for p in patterns)
    assert all(
        keys.shop_of_key(k) == "7" and keys.is_data(k) and keys.binding_of_key(k) is None for k in mine
    )
    assert keys.shop_of_key(keys.data_app("app")) is None
    assert keys.binding_of_key(keys.binding("ep", "7")) == keys.binding("ep", "7")
    assert len(Keys.session_digest("x" * 10_000)) == 32
