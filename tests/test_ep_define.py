"""``ep define`` of an extension point that exists (issue 21, item 9): it says what it changed,
as text and as data, and it refuses to change how the scripts bound there combine unless asked
(``--force``), in every shard group or in none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import Settings
from scriptpool.config.errors import ExtensionPointInUse
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from scriptpool.testing import EmbeddedRedis
from tests import guests
from tests.conftest import EXAMPLES, TEST_ARTIFACT_KEY
from tests.pool import shop_on
from tests.test_cli import FAILED, OK, cli_env, one_line

__all__ = ["cli_env"]  # a fixture this module uses, imported from the CLI tests

APPS = EXAMPLES / "apps"


def _join_with_three_apps() -> None:
    """The README's apps block: a join EP and three apps bound at shop 1234."""
    assert main(["ep", "define", "discount", "--combine", "join", "--reducer", "concat:discounts"]) == OK
    assert (
        main(["deploy", "discount", "1234", str(EXAMPLES / "discount" / "discount.wasm"), "--app", "bundle"])
        == OK
    )
    assert main(["deploy", "discount", "1234", str(APPS / "loyalty.wat"), "--app", "loyalty"]) == OK
    assert main(["deploy", "discount", "1234", str(APPS / "volume.wat"), "--app", "volume"]) == OK


def _shown(capsys: pytest.CaptureFixture[str], name: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["ep", "show", name, "--json"]) == OK
    shown: dict[str, Any] = json.loads(capsys.readouterr().out)
    return shown


def test_pasting_the_rollout_block_after_the_apps_block_does_not_unjoin_the_ep(
    cli_env: str, capsys: pytest.CaptureFixture[str], settings: Settings, sandbox: Any
) -> None:
    """The reported case: a bare ``ep define discount`` over a join EP with 3 apps bound is
    refused with one line naming the combine, the shop and its apps and both ways on; the EP is
    still a join, and a call still runs all three apps."""
    _join_with_three_apps()
    capsys.readouterr()
    line = one_line(capsys, ["ep", "define", "discount"], FAILED)
    assert line.startswith("scriptpool: extension_point_in_use: extension point discount combines")
    assert "1234: bundle, loyalty, volume" in line and "a single EP runs one app" in line
    assert "--combine join --reducer concat:discounts" in line and "--force" in line
    shown = _shown(capsys, "discount")
    assert (shown["combine"], shown["reducer"]) == ("join", "concat:discounts")
    payload = json.loads((EXAMPLES / "discount" / "input.json").read_text())
    with redis.Redis.from_url(cli_env) as client:
        execution = Executor(Registry(client, settings, sandbox), sandbox, settings).execute(
            "discount", "1234", payload
        )
    assert [part.app for part in execution.parts] == ["bundle", "loyalty", "volume"]
    main(["ep", "define", "discount", "--combine", "chain", "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "extension_point_in_use" and "making it chain" in error["message"]


def test_forcing_a_combine_change_says_what_changed(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--force`` changes it, and the report says so, with the shops bound there; ``--json``
    gives the same as data."""
    _join_with_three_apps()
    capsys.readouterr()
    assert main(["ep", "define", "discount", "--force"]) == OK
    out = capsys.readouterr().out
    assert "extension point discount is redefined (single); changed:" in out
    assert "combine: join -> single (forced: 1 shop(s) bind apps here)" in out
    assert "reducer: concat:discounts -> none" in out
    assert main(["ep", "define", "discount", "--combine", "chain", "--force", "--json"]) == OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["combine"] == "chain" and shown["created"] is False and shown["bound_shops"] == 1
    assert shown["changes"] == [{"field": "combine", "before": "single", "after": "chain", "note": ""}]


def test_every_changed_field_is_reported_and_a_lowered_limit_flagged(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """Created, unchanged, then each field: limits as effective values (an override dropped
    falls back to the default, shown), a lowered one flagged; schemas added and removed; scale,
    capture; nothing bound, so changing combine needs no --force."""
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    assert main(["ep", "define", "cart"]) == OK
    assert capsys.readouterr().out.strip() == "extension point cart is defined (single)"
    assert main(["ep", "define", "cart"]) == OK
    assert capsys.readouterr().out.strip() == "extension point cart is unchanged (single)"
    argv = ["ep", "define", "cart", "--limits", '{"fuel": 5000000, "wall_ms": 200}', "--output-schema"]
    assert main([*argv, str(schema), "--scale", "cart.lines=0.005", "--no-capture"]) == OK
    out = capsys.readouterr().out
    assert "limits.fuel: 11,000,000 -> 5,000,000 (lowered)" in out
    assert "limits.wall_ms: 100 -> 200" in out and "limits.wall_ms: 100 -> 200 (" not in out
    assert "output_schema: added" in out and "scale: none -> cart.lines=0.005" in out
    assert "capture: on -> off" in out and "limits.memory_bytes" not in out
    assert main(["ep", "define", "cart", "--combine", "chain", "--json"]) == OK
    changes = {c["field"]: c for c in json.loads(capsys.readouterr().out)["changes"]}
    assert changes["limits.fuel"] == {
        "field": "limits.fuel",
        "before": 5000000,
        "after": 11000000,
        "note": "",
    }
    assert (
        changes["output_schema"]["before"] == {"type": "object"} and changes["output_schema"]["after"] is None
    )
    assert changes["combine"]["after"] == "chain" and changes["capture"] == {
        "field": "capture",
        "before": False,
        "after": True,
        "note": "",
    }


def test_a_dry_run_reports_and_writes_nothing(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--dry-run`` says what would change (and would be refused) without writing."""
    _join_with_three_apps()
    capsys.readouterr()
    assert main(["ep", "define", "discount", "--combine", "join", "--reducer", "first", "--dry-run"]) == OK
    assert "would be redefined" in capsys.readouterr().out
    assert _shown(capsys, "discount")["reducer"] == "concat:discounts"
    assert "extension_point_in_use" in one_line(capsys, ["ep", "define", "discount", "--dry-run"], FAILED)


def test_the_registry_answers_what_it_replaced(registry: Registry, redis_client: redis.Redis) -> None:
    """``Registry.define`` returns the definition, the one replaced and the changes; an
    unreadable record is replaced and said so; a record changed by someone else between the
    comparison and the write is compared again, so the changes are what was replaced."""
    registry.define_extension_point("multi", combine="join", reducer="first")
    registry.deploy("multi", "s", guests.ECHO, app="a")
    with pytest.raises(ExtensionPointInUse) as caught:
        registry.define_extension_point("multi", combine="chain")
    assert caught.value.detail == {"ep": "multi", "combine": "join", "requested": "chain", "bound_shops": 1}
    assert registry.extension_point("multi").combine == "join"
    forced = registry.define("multi", combine="chain", force=True)
    assert forced.previous is not None and forced.previous.reducer == "first" and forced.bound_shops == 1
    assert [c.field for c in forced.changes] == ["combine", "reducer"]
    assert registry.bound_shops("multi") == (1, {"s": ["a"]})

    redis_client.set(registry._keys.extension_point("broken"), b"{not json")
    mended = registry.define("broken")
    assert mended.previous is None and not mended.created
    assert mended.changes[0].field == "definition" and "unreadable" in mended.changes[0].before

    compare = registry._compare
    raced: list[bool] = []

    def meanwhile(ep: Any, raw: bytes | None, *, force: bool) -> Any:
        if not raced:  # another operator's definition lands between our read and our write
            raced.append(True)
            Registry(redis_client, registry._settings, registry._sandbox).define("cart", limits={"fuel": 7})
        return compare(ep, raw, force=force)

    registry.define("cart")
    registry._compare = meanwhile  # type: ignore[method-assign]
    answered = registry.define("cart", limits={"fuel": 9})
    assert answered.previous is not None and answered.previous.limit_overrides == {"fuel": 7}


@pytest.fixture
def two_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, redis.Redis, redis.Redis]]:
    """Shard 0 on Redis A, shard 1 on Redis B, in the CLI's environment."""
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        settings = Settings(artifact_key=TEST_ARTIFACT_KEY, shards=2, shard_groups=f"0={a.url};1={b.url}")
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        with redis.Redis.from_url(a.url) as ra, redis.Redis.from_url(b.url) as rb:
            yield settings, ra, rb


def test_a_refusal_in_one_group_leaves_every_group_as_it_was(
    two_groups: tuple[Settings, redis.Redis, redis.Redis], capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """Apps bound only in group 1: the combine change is refused before group 0 is written, so
    both groups keep the join; forced, both change."""
    settings, a, b = two_groups
    module = tmp_path / "echo.wasm"
    module.write_bytes(guests.ECHO)
    assert main(["ep", "define", "multi", "--combine", "join", "--reducer", "first"]) == OK
    assert main(["deploy", "multi", shop_on(1, 2), str(module), "--app", "x"]) == OK
    capsys.readouterr()
    assert "extension_point_in_use" in one_line(capsys, ["ep", "define", "multi"], FAILED)
    key = settings.keys.extension_point("multi")
    for client in (a, b):
        raw = client.get(key)
        assert raw is not None and json.loads(raw)["combine"] == "join"
    assert main(["ep", "define", "multi", "--force"]) == OK
    for client in (a, b):
        raw = client.get(key)
        assert raw is not None and json.loads(raw)["combine"] == "single"
