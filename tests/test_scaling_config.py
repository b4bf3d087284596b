"""Pure logic of scaling out: sentinel:// URLs, shard groups, the deploy replica settings, the
Celery broker settings derived from a URL, and the Keys that say what belongs to a shop."""

from __future__ import annotations

import fnmatch
import ssl

import pytest

from scriptpool.config import Keys, Settings
from scriptpool.config.errors import ConfigurationError
from scriptpool.config.groups import parse_shard_groups, ranges_text, render_shard_groups
from scriptpool.config.redis import (
    celery_broker,
    describe_redis_url,
    parse_sentinel_url,
    redact,
    redis_tls_options,
)

A, B = "redis://a:6379/0", "redis://:secret@b:6380/1"
S = "sentinel://:datapw@s1:26379,s2,[::1]:26381/pool/3?sentinel_password=sentpw&min_other_sentinels=1"


def test_sentinel_url_forms() -> None:
    """Hosts with and without ports (26379 by default, IPv6 in brackets), the master name, the
    database, both passwords and the options are read from the one URL."""
    parsed = parse_sentinel_url(S)
    assert parsed.sentinels == (("s1", 26379), ("s2", 26379), ("::1", 26381))
    assert (parsed.master_name, parsed.db, parsed.password, parsed.username) == ("pool", 3, "datapw", None)
    assert (parsed.sentinel_password, parsed.min_other_sentinels, parsed.tls) == ("sentpw", 1, False)
    bare = parse_sentinel_url("sentinel://h1/mymaster")
    assert (bare.sentinels, bare.master_name, bare.db, bare.password) == (
        (("h1", 26379),),
        "mymaster",
        0,
        None,
    )
    acl = parse_sentinel_url("sentinel://app:p%40ss@h1:1,h2:2/m/0/?sentinel_username=mon")
    assert (acl.username, acl.password, acl.sentinel_username) == ("app", "p@ss", "mon")
    tls = parse_sentinel_url("sentinel://h/m/0?ssl=true&ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional")
    assert tls.tls_options() == {"ssl": True, "ssl_cert_reqs": "optional", "ssl_ca_certs": "/ca.pem"}
    assert redis_tls_options("sentinel://h/m/0?ssl=true") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert redis_tls_options(S) is None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sentinel://h1:26379,h2:26379", "names no master"),
        ("sentinel://h1:26379/", "names no master"),
        ("sentinel://h1/m/zero", "must end in a database number"),
        ("sentinel://h1/m/0/extra", "has a path beyond /MASTER_NAME/DB"),
        ("sentinel://h1,,h2/m", "empty sentinel address"),
        ("sentinel://h1:port/m", "sentinel port that is not a number"),
        ("sentinel://h1:70000/m", "sentinel port out of range"),
        ("sentinel://:pw@/m", "empty sentinel address"),
        ("sentinel://h1/m?sentinel_pasword=x", "unknown sentinel option(s) sentinel_pasword"),
        ("sentinel://h1/m?ssl=maybe", "option ssl must be true or false"),
        ("sentinel://h1/m?ssl=1&ssl_cert_reqs=some", "ssl_cert_reqs must be none, optional or required"),
        ("sentinel://h1/m?min_other_sentinels=-1", "min_other_sentinels must be a number"),
        ("sentinel://h1/m#top", "must not have a #fragment"),
        ("redis+sentinel://h1/m", "must use one of redis://, rediss://, unix://, sentinel://"),
    ],
)
def test_bad_sentinel_urls_are_one_configuration_error_naming_the_variable(url: str, problem: str) -> None:
    """Each malformed URL is refused by Settings.from_env with one ConfigurationError whose
    message names SCRIPTPOOL_REDIS_URL and the problem, and whose detail names the variable."""
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"SCRIPTPOOL_REDIS_URL": url})
    assert caught.value.message.startswith("SCRIPTPOOL_REDIS_URL ") and problem in caught.value.message
    assert caught.value.detail == {"variable": "SCRIPTPOOL_REDIS_URL"}
    assert "secret" not in caught.value.message


def test_messages_and_descriptions_never_show_a_password() -> None:
    assert describe_redis_url(S) == "sentinel://s1:26379,s2:26379,[::1]:26381/pool/3"
    assert describe_redis_url(B) == "b:6380/1"
    assert "sentpw" not in redact(S) and "datapw" not in redact(S) and "sentinel_password=**" in redact(S)


def test_shard_groups_syntax() -> None:
    """Ranges and single shards, entries naming the same URL merge into one group, and the text
    is rebuilt from the groups; empty means one group on SCRIPTPOOL_REDIS_URL."""
    groups = parse_shard_groups(f" 0-3,8={A} ; 4-7={B};9-11={A}", 12, "redis://default/0")
    assert [(g.name, g.url, g.shards) for g in groups] == [
        ("0-3,8-11", A, (0, 1, 2, 3, 8, 9, 10, 11)),
        ("4-7", B, (4, 5, 6, 7)),
    ]
    assert parse_shard_groups(render_shard_groups(groups), 12, "x") == groups
    single = parse_shard_groups("", 3, "redis://default/0")
    assert [(g.name, g.url, g.shards) for g in single] == [("0-2", "redis://default/0", (0, 1, 2))]
    assert ranges_text([5, 0, 1, 2, 7, 6]) == "0-2,5-7"
    settings = Settings(shards=4, shard_groups=f"0-1={A};2-3={S}")
    assert settings.group_of(3).url == S and settings.group_of_shards([0, 1]).name == "0-1"
    assert settings.for_group(settings.group_of(2)).redis_url == S


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"0-2={A}", "leaves shard(s) 3 without a group"),
        (f"0-3={A};3={B}", "puts shard 3 in two groups"),
        (f"0-4={A}", "names shard 4, but SCRIPTPOOL_SHARDS=4"),
        (f"3-0={A}", "runs backwards"),
        (f"a-b={A}", "is not a shard number or range"),
        ("0-3", "entries look like 0-7=redis://host:6379/0"),
        ("0-3=", "entries look like 0-7=redis://host:6379/0"),
        ("0-3=http://a/0", "must use one of redis://"),
        ("0-3=sentinel://h1", "names no master"),
    ],
)
def test_bad_shard_groups_are_one_configuration_error_naming_the_variable(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"SCRIPTPOOL_SHARDS": "4", "SCRIPTPOOL_SHARD_GROUPS": text})
    assert caught.value.message.startswith("SCRIPTPOOL_SHARD_GROUPS") and problem in caught.value.message
    assert caught.value.detail == {"variable": "SCRIPTPOOL_SHARD_GROUPS"}


def test_a_workers_shards_must_share_a_group() -> None:
    settings = Settings(shards=4, shard_groups=f"0-1={A};2-3={B}")
    with pytest.raises(
        ConfigurationError, match=r"shards must all be in one group.*1 in group 0-1.*2 in group 2-3"
    ):
        settings.group_of_shards([1, 2])


def test_deploy_replica_settings() -> None:
    """auto waits for one replica behind Sentinel and none on a direct URL; a number applies to
    every group; bad values name their variable."""
    settings = Settings()
    assert settings.deploy_replicas is None and settings.deploy_wait_ms == 2000
    assert (settings.deploy_replicas_for(S), settings.deploy_replicas_for(A)) == (1, 0)
    two = Settings.from_env({"SCRIPTPOOL_DEPLOY_REPLICAS": "2", "SCRIPTPOOL_DEPLOY_WAIT_MS": "150"})
    assert (two.deploy_replicas_for(A), two.deploy_wait_ms) == (2, 150)
    assert Settings.from_env({"SCRIPTPOOL_DEPLOY_REPLICAS": "auto"}).deploy_replicas is None
    assert Settings.from_env(two.to_env()) == two and Settings.from_env(settings.to_env()) == settings
    for name, value, problem in (
        ("SCRIPTPOOL_DEPLOY_REPLICAS", "one", "must be an integer or auto"),
        ("SCRIPTPOOL_DEPLOY_REPLICAS", "-1", "must be 0 or more"),
        ("SCRIPTPOOL_DEPLOY_WAIT_MS", "0", "must lie in 1..600000 ms"),
    ):
        with pytest.raises(ConfigurationError, match=problem) as caught:
            Settings.from_env({name: value})
        assert caught.value.detail == {"variable": name}


def test_celery_broker_settings_for_a_sentinel_url() -> None:
    """Every sentinel as a sentinel:// alternate carrying the data password and database; the
    master name, the sentinels' password and timeouts in sentinel_kwargs; TLS on both links."""
    broker = celery_broker(S, timeout=1.0, connect_timeout=0.25)
    assert broker["broker_url"] == (
        "sentinel://:datapw@s1:26379/3;sentinel://:datapw@s2:26379/3;sentinel://:datapw@[::1]:26381/3"
    )
    options = broker["broker_transport_options"]
    assert options["master_name"] == "pool" and options["min_other_sentinels"] == 1
    kwargs = options["sentinel_kwargs"]
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["password"]) == (
        0.5,
        0.25,
        "sentpw",
    )
    assert kwargs["retry"].get_retries() == 0  # the next sentinel is the retry
    assert options["health_check_interval"] == 2 and options["socket_timeout"] == 1.0
    assert broker["broker_channel_error_retry"] is True and broker["broker_use_ssl"] is None
    tls = celery_broker("sentinel://h/m/0?ssl=true&ssl_ca_certs=/ca.pem", timeout=1.0, connect_timeout=0.25)
    assert tls["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    assert tls["broker_transport_options"]["sentinel_kwargs"]["ssl"] is True
    direct = celery_broker(B, timeout=1.0, connect_timeout=0.25)
    assert direct["broker_url"] == B and "master_name" not in direct["broker_transport_options"]


def test_keys_say_what_belongs_to_a_shop() -> None:
    """The SCAN patterns of one shop match its bindings and history and nothing of another shop;
    the shop is read back from such a key."""
    keys = Keys("p:{x}")
    mine = [keys.binding("discount", "7"), keys.history("discount", "7"), keys.binding("tax", "7")]
    mine += [keys.history("discount", "7", "loyalty"), keys.rollout("discount", "7")]
    mine += [keys.rollout_samples("discount", "7")]
    others = [
        keys.binding("discount", "17"),
        keys.binding("discount", "7.1"),
        keys.deploy_lock("discount", "7"),
        keys.history("discount", "17", "loyalty"),
        keys.rollouts_under_way(),
    ]
    others += [keys.extension_point("discount"), keys.module("ab"), keys.queue(7)]
    patterns = keys.shop_key_patterns("7")

    def matched(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)

    assert all(matched(key) for key in mine) and not any(matched(key) for key in others)
    assert all(keys.shop_of_key(key) == "7" for key in mine)
    assert keys.shop_of_key(keys.module("ab")) is None and keys.shop_of_key(keys.extension_point("x")) is None
    binding = keys.binding("discount", "7")
    assert all(keys.binding_of_key(key) == binding for key in mine if "tax" not in key)
    assert fnmatch.fnmatchcase(keys.artifact("fp", "ab"), keys.artifacts_pattern("ab"))
