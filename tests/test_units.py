"""Pure logic: the byte-bounded LRU, settings, limits, names and the error registry."""

from __future__ import annotations

import math
import pickle
import secrets

import pytest

from scriptpool.config import Limits, Settings, check_shop_id
from scriptpool.config.errors import (
    ConfigurationError,
    GuestRuntimeError,
    InvalidArgument,
    InvalidInput,
    ScriptpoolError,
    error_class_for,
)
from scriptpool.runtime import ByteLRU, ScriptInput


def test_lru_evicts_least_recently_used_by_bytes() -> None:
    """The cache holds at most its byte budget and evicts the least recently used first."""
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now most recent
    cache.put("c", "C", 40)  # 120 > 100: evict b
    assert cache.get("b") is None
    assert cache.get("a") == "A" and cache.get("c") == "C"
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 80, 1)
    assert (stats.hits, stats.misses) == (3, 1)


def test_lru_refuses_an_item_larger_than_the_budget() -> None:
    """One oversized value does not flush the whole cache."""
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 10)
    cache.put("huge", "H", 1000)
    assert cache.get("huge") is None and cache.get("a") == "A"


def test_settings_from_env() -> None:
    """SCRIPTPOOL_* variables build typed settings; limits overrides apply."""
    key = secrets.token_hex(32).encode()
    settings = Settings.from_env(
        {
            "SCRIPTPOOL_REDIS_URL": "redis://:pw@127.0.0.1:7000/2",
            "SCRIPTPOOL_SHARDS": "4",
            "SCRIPTPOOL_ARTIFACT_KEY": key.decode(),
            "SCRIPTPOOL_LIMIT_FUEL": "5000",
            "SCRIPTPOOL_MODULE_CACHE_MB": "64",
        }
    )
    assert settings.shards == 4
    assert settings.limits.fuel == 5000
    assert settings.limits.memory_bytes == Limits().memory_bytes
    assert settings.module_cache_bytes == 64 * 2**20
    assert settings.require_artifact_key() == key


@pytest.mark.parametrize(
    "env", [{"SCRIPTPOOL_SHARDS": "0"}, {"SCRIPTPOOL_SHARDS": "two"}, {"SCRIPTPOOL_LIMIT_FUEL": "-1"}]
)
def test_bad_settings_fail_clearly(env: dict[str, str]) -> None:
    """Malformed settings raise ConfigurationError, not a stray ValueError."""
    with pytest.raises(ConfigurationError):
        Settings.from_env(env)


def test_missing_artifact_key_is_a_configuration_error() -> None:
    """Signing without a key fails with a message naming the variable."""
    with pytest.raises(ConfigurationError, match="SCRIPTPOOL_ARTIFACT_KEY"):
        Settings().require_artifact_key()


def test_limit_overrides_reject_unknown_names() -> None:
    """A typo in a per-EP limit is an error, not silently ignored."""
    assert Limits().with_overrides({"fuel": 7}).fuel == 7
    with pytest.raises(ConfigurationError):
        Limits().with_overrides({"fuell": 7})


def test_shop_ids() -> None:
    """Integer and string shop ids are accepted; empty and absurd ones are not."""
    assert check_shop_id(42) == "42"
    assert check_shop_id("shop-1.example") == "shop-1.example"
    for bad in ("", " ", "a/b", "x" * 200, -1, True, None, 1.5):
        with pytest.raises(InvalidArgument):
            check_shop_id(bad)


def test_errors_have_stable_codes_and_survive_pickling_free_transport() -> None:
    """Codes map back to classes, and errors keep their detail when rebuilt."""
    assert error_class_for("runtime_error") is GuestRuntimeError
    assert error_class_for("no_such_code") is ScriptpoolError
    err = GuestRuntimeError("boom", trap_code="unreachable")
    rebuilt = pickle.loads(pickle.dumps(err))  # multiprocessing pools pickle errors
    assert (rebuilt.code, rebuilt.detail) == ("runtime_error", {"trap_code": "unreachable"})


def test_a_script_input_decodes_only_when_a_step_needs_it() -> None:
    """JSON text is the JSON a script reads as it came (never decoded, not copied); decoding
    (for a MessagePack script or scaling) is strict and happens once; a host value is encoded on
    demand and, decoded, becomes what its JSON text says. The schema check sees the host value,
    or the text parsed leniently when nothing decoded it."""
    text = b'{"n": NaN}'
    data = ScriptInput.of(text)
    assert data.json() is text and data.value == ()
    assert math.isnan(data.for_schema()["n"])  # lenient: only the schema check reads it here
    with pytest.raises(InvalidInput):
        data.decoded()  # strict: NaN is not JSON
    assert ScriptInput.of(memoryview(b"[1]")).json() == b"[1]"
    host = ScriptInput.of({1: ("a/b",)})
    assert host.json() == b'{"1":["a\\/b"]}' and host.for_schema() == {1: ("a/b",)}
    decoded = host.decoded()
    assert decoded.json_value == {"1": ["a/b"]} and decoded.for_schema() == {"1": ["a/b"]}
    assert decoded.decoded() is decoded and ScriptInput.of(decoded) is decoded
    assert ScriptInput.of(None).json() == b"null"  # JSON's null is a value like any other
    assert ScriptInput.of({"x": math.inf}).captured() == b""  # what failed the run: nothing to keep
