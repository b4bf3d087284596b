"""``uniqueItems`` in EP schemas: JSON Schema's equality, in one pass over the items (a script's
output of 2,000 small objects held a worker for 10 s in jsonschema's pairwise comparison)."""

from __future__ import annotations

from typing import Any

import jsonschema
import jsonschema._utils
import pytest

from scriptpool.registry import compile_validator

UNIQUE = {"type": "array", "uniqueItems": True}


@pytest.mark.parametrize(
    "items",
    [
        [1, 1.0],
        [1, True, 1],
        [{"a": 1, "b": 2}, {"b": 2, "a": 1}],
        [[1, [2, {"x": None}]], [1, [2, {"x": None}]]],
        ["a", "b", "a"],
        [None, None],
        [{"a": [1.0]}, {"a": [1]}],
    ],
)
def test_duplicates_by_json_schema_equality_are_refused(items: list[Any]) -> None:
    """What jsonschema's own check refuses, ours refuses."""
    reference = jsonschema.Draft202012Validator(UNIQUE)
    assert not reference.is_valid(items)
    assert not compile_validator(UNIQUE).is_valid(items)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "items",
    [
        [1, True],
        [0, False],
        [[1, 2], [2, 1]],
        [{"a": 1}, {"a": "1"}],
        ["1", 1],
        [None, 0, "", [], {}],
        [{"a": {"b": 1}}, {"a": {"b": True}}],
    ],
)
def test_items_that_differ_pass(items: list[Any]) -> None:
    """What jsonschema's own check accepts, ours accepts."""
    reference = jsonschema.Draft202012Validator(UNIQUE)
    assert reference.is_valid(items)
    assert compile_validator(UNIQUE).is_valid(items)  # type: ignore[union-attr]


def test_thousands_of_objects_are_checked_without_pairwise_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Objects do not sort, so jsonschema compared every pair (O(n^2)): ours hashes each item
    once and never calls its pairwise equality."""

    def pairwise(*args: object) -> bool:
        raise AssertionError("compared a pair")

    monkeypatch.setattr(jsonschema._utils, "equal", pairwise)
    validator = compile_validator(UNIQUE)
    assert validator is not None
    assert validator.is_valid([{"a": i} for i in range(5_000)])
    assert not validator.is_valid([{"a": i % 4_999} for i in range(5_000)])
