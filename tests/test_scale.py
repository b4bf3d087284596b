"""Limits scaled with the input, as Shopify's ``@scaleLimits``: the factor (function-runner's
cases), the limits it raises, an EP's rules as defined, the executor that applies them, and the
client that must not refuse an input that scaling allows."""

from __future__ import annotations

import json

import pytest

from scriptpool.config import ExtensionPoint, Limits, Settings, scale_factor, scaled_limits
from scriptpool.config.errors import (
    ConfigurationError,
    DeadlineExceeded,
    InputTooLarge,
    InstructionLimitExceeded,
)
from scriptpool.config.scale import parse_scale_rule
from scriptpool.producer import Client
from scriptpool.registry import Registry
from scriptpool.runtime import Executor
from tests import guests

RATE = {"cart.lines": 0.005}  # Shopify's cart-line rate


@pytest.mark.parametrize(
    ("value", "rules", "expected"),
    [
        ({"field": "value"}, {"field": 0.005}, 1.0),  # a string's 5 bytes x 0.005: clamped up to 1
        ({"cartLines": ["x"] * 500}, {"cartLines": 0.005}, 2.5),
        ({"cartLines": ["x"] * 1_000_000}, {"cartLines": 0.005}, 10.0),  # clamped down to 10
        ({"cart": {"lines": [{}] * 200}}, RATE, 1.0),
        ({"cart": {"lines": [{}] * 400}}, RATE, 2.0),
        ({"cart": {"lines": [{}] * 10}}, RATE, 1.0),
        # Lists along the path are walked through and their counts summed: 2 x 200 items.
        ({"groups": [{"items": [0] * 200}, {"items": [0] * 200}]}, {"groups.items": 0.005}, 2.0),
        # The largest path wins.
        ({"a": [0] * 300, "b": [0] * 700}, {"a": 0.005, "b": 0.005}, 3.5),
        ({"cart": None}, RATE, 1.0),
        ([1, 2, 3], RATE, 1.0),
    ],
)
def test_scale_factor_follows_function_runner(
    value: object, rules: dict[str, float], expected: float
) -> None:
    assert scale_factor(value, rules) == pytest.approx(expected)


def test_the_factor_multiplies_instructions_input_and_output_only() -> None:
    base = Limits()
    scaled = scaled_limits(base, 2.5)
    assert (scaled.fuel, scaled.input_bytes, scaled.output_bytes) == (
        int(base.fuel * 2.5),
        int(base.input_bytes * 2.5),
        int(base.output_bytes * 2.5),
    )
    assert (scaled.memory_bytes, scaled.stack_bytes, scaled.log_bytes, scaled.wall_ms) == (
        base.memory_bytes,
        base.stack_bytes,
        base.log_bytes,
        base.wall_ms,
    )
    assert scaled_limits(base, 1.0) is base


@pytest.mark.parametrize(
    "rule", ["cart.lines", "cart.lines=", "cart.lines=x", "=0.1", "cart..lines=0.1", "a=-1", "a=0", "a=nan"]
)
def test_malformed_scale_rules_are_named(rule: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_scale_rule(rule)


def test_too_many_rules_are_refused() -> None:
    from scriptpool.config.scale import check_scale_rules

    with pytest.raises(ConfigurationError):
        check_scale_rules({f"list{n}": 0.01 for n in range(17)})
    assert len(check_scale_rules({f"list{n}": 0.01 for n in range(16)})) == 16


def test_rules_are_kept_in_the_ep_definition(registry: Registry) -> None:
    assert parse_scale_rule("cart.lines=0.005") == ("cart.lines", 0.005)
    defined = registry.define_extension_point("cart", scale=RATE, capture_rate=0.25)
    stored = registry.extension_point("cart")
    assert (stored.scale, stored.capture_rate) == (RATE, 0.25) == (defined.scale, defined.capture_rate)
    assert ExtensionPoint.from_json(json.dumps({"name": "old"})).scale == {}  # EPs from before
    with pytest.raises(ConfigurationError):
        registry.define_extension_point("cart", scale={"cart.lines": "fast"})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError):
        registry.define_extension_point("cart", capture_rate=1.5)


def test_a_big_cart_gets_a_bigger_budget_and_a_small_one_the_base(
    registry: Registry, executor: Executor
) -> None:
    """400 lines at 0.005 scale the 11M budget to 22M: the script (about 18M instructions) passes,
    where the same cart fails under the fixed budget; a 10-line cart runs under the base limits."""
    script = guests.per_byte_work(40)
    registry.define_extension_point("fixed")
    registry.define_extension_point("cart", scale=RATE)
    registry.deploy("fixed", "1", script)
    registry.deploy("cart", "1", script)

    fixed = executor.execute("fixed", "1", json.dumps(guests.cart(400)).encode())
    assert fixed.error is not None and fixed.error.code == InstructionLimitExceeded.code
    assert fixed.report.scale_factor == 1.0

    big = executor.execute("cart", "1", json.dumps(guests.cart(400)).encode())
    assert big.ok, big.error
    assert big.report.scale_factor == 2.0
    assert Limits().fuel < big.report.instructions <= 2 * Limits().fuel

    small = executor.execute("cart", "1", guests.cart(10))  # a host value is counted as it is
    assert small.ok and small.report.scale_factor == 1.0


def test_scaled_input_limit_and_the_bound_past_any_factor(registry: Registry, executor: Executor) -> None:
    """Input over the base limit passes once scaled; past ten times the limit it is refused
    unread; the same process runs a good script right after."""
    registry.define_extension_point("cart", scale=RATE, limits={"input_bytes": 2000})
    registry.deploy("cart", "1", guests.ECHO)
    over_base = json.dumps({"cart": {"lines": [0] * 600}}).encode()  # 1,811 B x 3.0
    padded = json.dumps({"cart": {"lines": [0] * 600}, "pad": "x" * 3000}).encode()
    assert len(over_base) < 2000 < len(padded) < 3 * 2000
    result = executor.execute("cart", "1", padded)
    assert result.ok and result.report.scale_factor == 3.0, result.error
    unscaled = json.dumps({"pad": "x" * 3000}).encode()
    result = executor.execute("cart", "1", unscaled)
    assert result.error is not None and result.error.code == InputTooLarge.code
    huge = b'{"pad": "' + b"x" * 25_000 + b'"}'
    result = executor.execute("cart", "1", huge)
    assert result.error is not None and result.error.code == InputTooLarge.code
    assert "even scaled" in result.error.message
    assert executor.execute("cart", "1", {"cart": {"lines": [1]}}).output == {"cart": {"lines": [1]}}


def test_client_checks_input_against_the_scaled_limit(registry: Registry, settings: Settings) -> None:
    """The client's input-size check (before anything is enqueued) allows what scaling allows."""
    registry.define_extension_point("cart", scale=RATE, limits={"input_bytes": 2000})
    padded = {"cart": {"lines": [0] * 600}, "pad": "x" * 3000}
    with Client(settings) as client:
        outcome = client.run("cart", "1", padded, timeout=0.05)  # no worker: it times out, unrefused
        assert (outcome.status, outcome.error_code) == ("fallback", DeadlineExceeded.code)
        with pytest.raises(InputTooLarge):
            client.run("cart", "1", {"pad": "x" * 3000}, timeout=0.05)
        with pytest.raises(InputTooLarge):
            client.run("cart", "1", json.dumps(padded).encode() + b" " * 30_000, timeout=0.05)
        assert client.limits("cart").input_bytes == 2000


def test_a_null_input_is_a_value_when_validated_for_a_msgpack_script(
    registry: Registry, executor: Executor
) -> None:
    """The input's JSON value, decoded once for a MessagePack script, is reused by the sampled
    schema check; JSON's null is such a value (not "nothing decoded"), scaled EP or not."""
    from tests import abi

    registry.add_provider("shopify_functions_javy_v3", abi.wasm("memory_io_provider"))
    module = abi.wasm("memory_io_echo", "shopify_functions_javy_v3")
    for name, scale in (("nulls", None), ("scaled-nulls", RATE)):
        registry.define_extension_point(
            name, input_schema={"type": "null"}, input_validation_rate=1.0, scale=scale
        )
        registry.deploy(name, "1", module)
        result = executor.execute(name, "1", b"null")
        assert result.ok and result.output is None, result.error
