"""Input queries (scriptpool.config.input_query): the EP's GraphQL input schema, a script's query
refused or compiled at deploy, and the projection that gives the script exactly the query's
result. Pure logic: no Redis, no workers.

Long on purpose: one short test per rule (a refusal, a null, a loader, a merge), in sections
that follow ``scriptpool.config.input_query`` from schema to merged plans, sharing the example
schemas and the ``_refusal``/``_executed``/``Counted`` helpers at the top; the tests are
quick and independent, and split files would each need those helpers again."""

from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from graphql import execute_sync

from scriptpool.config.errors import (
    InputTooLarge,
    InvalidArgument,
    InvalidInputQuery,
    RegistryError,
    error_class_for,
)
from scriptpool.config.input_query import (
    MAX_QUERY_BYTES,
    MAX_QUERY_COST,
    MAX_SELECTIONS,
    InputQuery,
    InputSchema,
    merge,
    project,
    project_async,
    query_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HERE = EXAMPLES / "input_query"


def _schema(name: str) -> InputSchema:
    return InputSchema.from_sdl((HERE / name / "schema.graphql").read_text())


DISCOUNT = _schema("discount")
VALIDATION = _schema("cart_validation")


def _input(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((HERE / name / "input.json").read_text())
    return value


def _refusal(schema: InputSchema, text: str, **caps: int) -> InvalidInputQuery:
    with pytest.raises(InvalidInputQuery) as caught:
        InputQuery.compile(schema, text, **caps)
    return caught.value


def _executed(schema: InputSchema, text: str, value: Any, variables: dict[str, Any] | None = None) -> Any:
    query = InputQuery.compile(schema, text)
    result = execute_sync(schema.schema, query.document, root_value=value, variable_values=variables)
    return result.data


def never(*_args: Any, **_kwargs: Any) -> Any:
    """A loader for a field no query selects: calling it fails the test."""
    raise AssertionError("a loader for an unselected field was called")


class Counted:
    """A loader that counts its calls and the arguments it got."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.result(**kwargs) if callable(self.result) else self.result


# -- the examples -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["discount", "cart_validation"])
def test_example_query_gives_the_example_scripts_input(name: str) -> None:
    """Each example's run.graphql, over its full host input, gives exactly the input the
    example script (examples/<name>) is tested with, and what graphql-core executes."""
    schema = _schema(name)
    query = InputQuery.compile(schema, (HERE / name / "run.graphql").read_text())
    host = _input(name)
    projected = query.project(host)
    assert projected == json.loads((EXAMPLES / name / "input.json").read_text())
    assert projected == _executed(schema, query.text, host)
    # The script sees the query's order, not the host's: merchandise's id before its sku.
    assert json.dumps(projected) == json.dumps(_executed(schema, query.text, host))


def test_example_costs_are_counted_by_shopifys_table() -> None:
    """Leaves cost 1, objects nothing, so the discount example is 8 and cart validation 3."""
    assert InputQuery.compile(DISCOUNT, (HERE / "discount" / "run.graphql").read_text()).cost == 8
    assert InputQuery.compile(VALIDATION, (HERE / "cart_validation" / "run.graphql").read_text()).cost == 3


# -- the schema -------------------------------------------------------------------------------


def test_schema_without_input_root_is_refused() -> None:
    """A schema must have an object type ``Input``: its root."""
    with pytest.raises(InvalidArgument, match="no object type 'Input'"):
        InputSchema.from_sdl("type Query { a: Int }")


def test_schema_syntax_error_names_line_and_column() -> None:
    """SDL that does not parse is refused with the parser's line and column."""
    with pytest.raises(InvalidArgument) as caught:
        InputSchema.from_sdl("type Input {\n  a: Int\n  b:\n}")
    assert caught.value.code == "invalid_argument"
    assert (caught.value.detail["line"], caught.value.detail["column"]) == (4, 1)


def test_schema_with_another_query_root_is_refused() -> None:
    """A schema whose declared query root is not ``Input`` is refused, at that type."""
    with pytest.raises(InvalidArgument, match="its query root is 'Q', not 'Input'") as caught:
        InputSchema.from_sdl("schema { query: Q }\ntype Q { a: Int }\ntype Input { a: Int }")
    assert (caught.value.detail["line"], caught.value.detail["column"]) == (2, 1)


def test_schema_without_schema_block_uses_input_as_root() -> None:
    """``type Input`` alone is the root; no ``schema`` block or ``Query`` type is needed."""
    schema = InputSchema.from_sdl("type Input { a: Int b: String }")
    assert InputQuery.compile(schema, "{ b a }").project({"a": 1, "b": "x"}) == {"b": "x", "a": 1}


# -- refusals ---------------------------------------------------------------------------------


def test_unknown_field_is_refused_with_its_location() -> None:
    """A field the schema lacks: ``invalid_input_query`` naming it, at its line and column."""
    error = _refusal(DISCOUNT, "query {\n  cart {\n    lnes { quantity }\n  }\n}")
    assert error.code == "invalid_input_query"
    assert isinstance(error, RegistryError)
    assert error_class_for("invalid_input_query") is InvalidInputQuery
    assert "Cannot query field 'lnes' on type 'Cart'" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (3, 5)
    assert "(line 3, column 5)" in str(error)


def test_refusal_survives_pickling_with_its_detail() -> None:
    """The error crosses processes (a worker, a CLI) with its problem, line and column."""
    error = _refusal(DISCOUNT, "{ shop { nope } }")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InvalidInputQuery
    assert copy.detail == error.detail


def test_syntax_error_is_refused_with_its_location() -> None:
    """A query that does not parse: the parser's problem and where."""
    error = _refusal(DISCOUNT, "query {\n  cart {\n    lines { quantity \n}")
    assert error.detail["problem"].startswith("Syntax Error")
    assert (error.detail["line"], error.detail["column"]) == (4, 2)


def test_wrong_argument_is_refused() -> None:
    """Validation covers arguments too: an argument the field does not take."""
    error = _refusal(DISCOUNT, '{ discountNode { metafield(namspace: "a", key: "b") { value } } }')
    assert "Unknown argument 'namspace'" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (1, 28)


def test_query_over_size_is_refused_where_it_passes_the_cap() -> None:
    """More than 3,000 bytes (comments excluded) is refused, located where the cap is passed;
    the same query with long comments is not, and an EP may raise the cap."""
    aliases = "\n".join(f"  a{i}: presentmentCurrencyRate" for i in range(200))
    text = "{\n" + aliases + "\n}"
    assert query_bytes(text) > MAX_QUERY_BYTES
    error = _refusal(DISCOUNT, text, max_cost=1000)
    assert error.detail["measure"] == "bytes"
    assert error.detail["value"] == query_bytes(text)
    assert error.detail["cap"] == MAX_QUERY_BYTES
    lines = text.split("\n")
    # The location is the byte that passes the cap: count up to it.
    line, column = error.detail["line"], error.detail["column"]
    before = sum(len(x) + 1 for x in lines[: line - 1]) + column - 1
    assert before == MAX_QUERY_BYTES
    assert InputQuery.compile(DISCOUNT, text, max_bytes=10_000, max_cost=1000).size == query_bytes(text)

    commented = "# " + "x" * 5000 + "\n{ presentmentCurrencyRate } # " + "y" * 5000
    assert query_bytes(commented) == len("\n{ presentmentCurrencyRate } ")
    assert InputQuery.compile(DISCOUNT, commented).cost == 1


def test_hash_inside_a_string_is_not_a_comment() -> None:
    """A ``#`` in a string argument counts as text, and the rest of the line is still query."""
    text = '{ discountNode { metafield(namespace: "a#b", key: "k") { value } } }'
    assert query_bytes(text) == len(text)
    assert InputQuery.compile(DISCOUNT, text).cost == 3


def test_query_over_cost_is_refused_at_the_field_that_passes_the_cap() -> None:
    """31 leaves are over the cost cap of 30, refused at the 31st; an EP may raise the cap."""
    fields = "\n".join(f"  r{i}: presentmentCurrencyRate" for i in range(MAX_QUERY_COST + 1))
    text = "{\n" + fields + "\n}"
    error = _refusal(DISCOUNT, text)
    assert error.detail["measure"] == "cost"
    assert (error.detail["line"], error.detail["column"]) == (MAX_QUERY_COST + 2, 3)
    assert "cap of 30" in error.detail["problem"]
    assert InputQuery.compile(DISCOUNT, text, max_cost=31).cost == 31


def test_cost_counts_metafields_tags_and_fragments() -> None:
    """A metafield is 3 and the fields on it nothing; hasAnyTag 3; ``__typename`` nothing; a
    named fragment is counted at every spread."""
    text = """
    query {
      discountNode { metafield(namespace: "a", key: "b") { value type jsonValue } }
      cart { lines { merchandise { __typename ...V } } }
      again: cart { lines { merchandise { ...V } } }
    }
    fragment V on ProductVariant { id product { hasAnyTag(tags: ["x"]) } }
    """
    # metafield 3 + (id 1 + hasAnyTag 3) twice.
    assert InputQuery.compile(DISCOUNT, text).cost == 3 + 2 * (1 + 3)


def test_ep_may_set_its_own_field_costs() -> None:
    """``costs`` replaces the table's weight for one field."""
    sdl = (HERE / "discount" / "schema.graphql").read_text()
    schema = InputSchema.from_sdl(sdl, costs={"CartLine.quantity": 10})
    assert InputQuery.compile(schema, "{ cart { lines { quantity id } } }").cost == 11
    for wrong in ("quantity", "CartLine.quantities", "Nope.quantity"):
        with pytest.raises(InvalidArgument, match=r"'Type\.field'"):
            InputSchema.from_sdl(sdl, costs={wrong: 1})
    with pytest.raises(InvalidArgument, match="integer >= 0"):
        InputSchema.from_sdl(sdl, costs={"CartLine.quantity": -1})


def test_two_operations_are_refused_at_the_second() -> None:
    """An input query is exactly one operation."""
    error = _refusal(
        DISCOUNT, 'query A { shop { metafield(key: "k") { value } } }\nquery B { presentmentCurrencyRate }'
    )
    assert "exactly one operation" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (2, 1)


@pytest.mark.parametrize("kind", ["mutation", "subscription"])
def test_mutation_and_subscription_are_refused(kind: str) -> None:
    """Only a query reads input: a mutation (even on a schema with a mutation root) or a
    subscription is refused at the operation."""
    schema = InputSchema.from_sdl(
        "schema { query: Input mutation: MutationRoot }\n"
        "type Input { a: Int }\ntype MutationRoot { run(x: Int): Boolean }"
    )
    error = _refusal(schema, f"\n  {kind} M {{ run(x: 1) }}")
    assert error.detail["problem"] == f"an input query is a query, not a {kind}"
    assert (error.detail["line"], error.detail["column"]) == (2, 3)


def test_introspection_is_refused() -> None:
    """``__schema`` and ``__type`` are not input."""
    error = _refusal(DISCOUNT, "{\n  __schema { queryType { name } }\n}")
    assert "introspection" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (2, 3)


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    """A small query nesting far (which would take graphql-core's recursive parser past
    Python's recursion limit) is one clear refusal."""
    text = "{cart" + "{lines" * 400 + "}" * 401
    assert query_bytes(text) < MAX_QUERY_BYTES
    error = _refusal(DISCOUNT, text)
    assert "nests more than 64 levels" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (1, 6 + 63 * 6)


def test_fragments_nesting_deep_once_spread_are_refused() -> None:
    """Nesting is also bounded once fragments are spread (each one shallow in the text)."""
    schema = InputSchema.from_sdl("type Input { node: Node }\ntype Node { next: Node value: Int }")
    fragments = "\n".join(f"fragment F{i} on Node {{ next {{ ...F{i + 1} }} }}" for i in range(70))
    text = "{ node { ...F0 } }\n" + fragments + "\nfragment F70 on Node { value }"
    error = _refusal(schema, text, max_bytes=10_000)
    assert "once fragments are spread" in error.detail["problem"]


def test_list_argument_over_100_elements_is_refused() -> None:
    """Shopify's cap on a list argument's elements: 100."""
    tags = ", ".join(f'"t{i}"' for i in range(101))
    error = _refusal(
        DISCOUNT,
        f"{{ cart {{ lines {{ merchandise {{ ... on ProductVariant {{ product {{\n"
        f"  hasAnyTag(tags: [{tags}]) }} }} }} }} }} }}",
    )
    assert "101 elements" in error.detail["problem"]


def _alias_bomb(k: int) -> str:
    """Five levels of ``k`` aliases joined by fragments: ``k ** 5`` selections, costing 0."""

    def aliases(prefix: str, body: str) -> str:
        return " ".join(f"{prefix}{i}:{body}" for i in range(k))

    return (
        "query{" + aliases("r", "cart{...C}") + "}\n"
        "fragment C on Cart{" + aliases("a", "lines{...L}") + "}\n"
        "fragment L on CartLine{" + aliases("b", "merchandise{...M}") + "}\n"
        "fragment M on ProductVariant{" + aliases("c", "product{...P}") + "}\n"
        "fragment P on Product{" + aliases("d", "__typename") + "}\n"
    )


def test_aliases_multiplied_by_fragments_are_refused_where_they_pass_the_selection_cap() -> None:
    """Fields that cost nothing (``__typename``, objects) still count against the selections
    cap once fragments are spread: 16 aliases on five levels (16 ** 5 fields in 1.4 kB, cost 0,
    which the cost cap lets through) are refused at the field that passes the cap."""
    text = _alias_bomb(16)
    assert query_bytes(text) < MAX_QUERY_BYTES
    error = _refusal(DISCOUNT, text)
    assert error.detail["measure"] == "selections"
    assert error.detail["cap"] == MAX_SELECTIONS
    assert "more than 2,000 fields once fragments are spread" in error.detail["problem"]
    # r0 a0 b0 c0, then d0..d15 under each of c0..c15 (272 each under b0, ...): the 2,001st
    # field is d0 of fragment P, on line 5.
    assert "field 'd0'" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (5, 23)
    # A larger one is refused the same way, at once (the counts are not expanded).
    assert _refusal(DISCOUNT, _alias_bomb(28), max_bytes=10_000).detail["measure"] == "selections"


def test_selection_cap_counts_every_field_and_alias() -> None:
    """``cart`` and 1,999 aliases of ``__typename`` are 2,000 selections, the cap, accepted;
    one more alias is refused at that alias."""
    fields = " ".join(f"t{i}: __typename" for i in range(MAX_SELECTIONS - 1))
    accepted = InputQuery.compile(DISCOUNT, "{ cart { " + fields + " } }", max_bytes=65_536)
    assert accepted.cost == 0
    error = _refusal(DISCOUNT, "{ cart { " + fields + " last: __typename } }", max_bytes=65_536)
    assert error.detail["measure"] == "selections"
    assert "field 'last'" in error.detail["problem"]


def test_a_chain_of_repeated_spreads_is_refused() -> None:
    """Each fragment spreading the next twice: 2 ** 60 fields from 2.4 kB, refused by the
    selections count (each fragment counted once, not walked per spread) where it passes the
    cap, in the last fragment."""
    n = 60
    text = (
        "query { cart { ...F0 } }\n"
        + "".join(f"fragment F{i} on Cart {{ ...F{i + 1} ...F{i + 1} }}\n" for i in range(n))
        + f"fragment F{n} on Cart {{ __typename }}\n"
    )
    assert query_bytes(text) < MAX_QUERY_BYTES
    error = _refusal(DISCOUNT, text)
    assert error.detail["measure"] == "selections"
    assert (error.detail["line"], error.detail["column"]) == (n + 2, 24)


def test_cost_of_a_fragment_spread_twice_is_refused_inside_it() -> None:
    """A fragment's cost is counted once and added at each spread; a spread that passes the cap
    is entered to name the field: here ``id`` in the fragment, at its second spread."""
    text = "{ cart { ...F ...F } }\nfragment F on Cart { lines { quantity id } }"
    assert InputQuery.compile(DISCOUNT, text).cost == 4
    error = _refusal(DISCOUNT, text, max_cost=3)
    assert error.detail["measure"] == "cost"
    assert "at field 'id'" in error.detail["problem"]
    assert (error.detail["line"], error.detail["column"]) == (2, 39)


def test_a_fragment_cycle_is_refused_by_validation() -> None:
    """The selections count cuts a cycle of spreads (it does not go round it) and leaves the
    refusal to graphql-core's validation."""
    text = "{ cart { ...A } }\nfragment A on Cart { ...B }\nfragment B on Cart { ...A }"
    assert "within itself" in _refusal(DISCOUNT, text).detail["problem"]


def test_unused_fragment_and_unknown_type_condition_are_refused() -> None:
    """The rest of graphql-core's validation applies as written."""
    assert (
        "never used"
        in _refusal(DISCOUNT, "{ presentmentCurrencyRate }\nfragment F on Cart { lines { id } }").detail[
            "problem"
        ]
    )
    error = _refusal(DISCOUNT, "{ cart { lines { merchandise { ... on Nope { id } } } } }")
    assert "Unknown type 'Nope'" in error.detail["problem"]


# -- the projection ---------------------------------------------------------------------------

SCHEMA = InputSchema.from_sdl(
    """
    scalar JSON
    enum Step { CART CHECKOUT }
    interface Named { name: String }
    type Input {
      shop: Shop
      items: [Item!]!
      grid: [[Int]]
      step: Step
      required: Shop!
      config(key: String!, scope: String = "app"): JSON
      count: Int
      ratio: Float
      code: ID
    }
    type Shop implements Named { name: String domain: String! owner: Person }
    type Person implements Named { name: String email: String }
    union Item = Book | Gift
    type Book implements Named { name: String isbn: String! pages: Int }
    type Gift { wrapped: Boolean note: String }
    """
)

HOST: dict[str, Any] = {
    "shop": {"name": "Acme", "domain": "acme.example", "owner": {"name": "Ada", "email": "ada@example.com"}},
    "items": [
        {"__typename": "Book", "name": "SICP", "isbn": "0262510871", "pages": 657},
        {"__typename": "Gift", "wrapped": True, "note": None},
        {"__typename": "Book", "name": "TAOCP", "isbn": "0201896834"},
    ],
    "grid": [[1, 2], [], None, [3, None]],
    "step": "CHECKOUT",
    "required": {"name": "Req", "domain": "req.example"},
    "config": {"percentage": 10},
    "count": 3,
    "ratio": 0.5,
    "code": "gid://1",
}

EQUIVALENT_QUERIES = [
    "{ shop { name } }",
    "{ shop { domain name } step count }",
    "{ s: shop { n: name d: domain } other: shop { name } }",
    "{ items { __typename ... on Book { name isbn } ... on Gift { wrapped note } } }",
    "{ items { ... on Named { name } ... on Book { pages } } }",
    "{ items { ...B ...G } } fragment B on Book { isbn name } fragment G on Gift { note }",
    "{ shop { ... on Named { name } ... { domain } } __typename }",
    "{ shop { owner { email name } } required { domain } }",
    "{ grid ratio code }",
    '{ config(key: "k") a: config(key: "a", scope: "b") }',
    "{ missing: shop { name } items { ... on Book { name } } }",
    "{ shop { name ... on Shop { name domain } name } }",
    "{ items { ... on Gift { __typename } } }",
    "query Q { shop { name @skip(if: true) domain @include(if: true) } }",
]


@pytest.mark.parametrize("text", EQUIVALENT_QUERIES)
def test_projection_equals_graphql_execution(text: str) -> None:
    """For any query, the projection is what graphql-core's execution gives over the same
    value with the default resolver, in the same order (the property the projection keeps)."""
    query = InputQuery.compile(SCHEMA, text)
    projected = query.project(HOST)
    executed = _executed(SCHEMA, text, HOST)
    assert projected == executed
    assert json.dumps(projected) == json.dumps(executed)


NULLS_HOST: dict[str, Any] = {
    "shop": {"name": None, "owner": None},  # domain (non-null) missing
    "items": [{"__typename": "Book", "name": "x"}],  # isbn (non-null) missing
    "required": None,
    "grid": "not a list",
    "step": "NOT_A_STEP",
    "count": 2**40,
    "ratio": "0.25",
    "code": 7,
}


@pytest.mark.parametrize(
    "text",
    [
        "{ shop { name owner { name } } }",
        "{ shop { name domain } count }",
        "{ items { ... on Book { name isbn } } }",
        "{ required { name } count }",
        "{ grid step count ratio code }",
        "{ items { ... on Book { name } } }",
    ],
)
def test_nulls_follow_graphql(text: str) -> None:
    """Missing values are null; a null in a non-null field nulls its nearest nullable parent
    (the whole result at the root); values a scalar cannot represent are null; scalars are
    serialised as graphql-core serialises them. All as graphql-core executes it."""
    assert InputQuery.compile(SCHEMA, text).project(NULLS_HOST) == _executed(SCHEMA, text, NULLS_HOST)


def test_nulls_concretely() -> None:
    """The rules above, spelled out for a few cases so that a shared mistake cannot pass."""
    assert project(InputQuery.compile(SCHEMA, "{ shop { name domain } count }"), NULLS_HOST) == {
        "shop": None,
        "count": None,
    }
    assert project(InputQuery.compile(SCHEMA, "{ required { name } count }"), NULLS_HOST) is None
    assert project(InputQuery.compile(SCHEMA, "{ items { ... on Book { isbn } } }"), NULLS_HOST) is None
    assert project(InputQuery.compile(SCHEMA, "{ code ratio }"), NULLS_HOST) == {"code": "7", "ratio": 0.25}
    assert project(InputQuery.compile(SCHEMA, "{ shop { owner { name } } }"), {}) == {"shop": None}


def test_abstract_value_without_typename_is_null() -> None:
    """A union's member is decided by ``__typename``: without one, GraphQL cannot resolve it."""
    query = InputQuery.compile(SCHEMA, "{ items { ... on Book { name } } }")
    assert query.project({"items": [{"name": "x"}]}) is None  # [Item!]! up to the root
    assert query.project({"items": [{"__typename": "Book", "name": "x"}]}) == {"items": [{"name": "x"}]}


def test_the_script_never_sees_an_unselected_field() -> None:
    """Fields the host has but the query does not select are absent, however they are nested."""
    query = InputQuery.compile(SCHEMA, "{ shop { name } items { ... on Book { isbn } } }")
    assert query.project(HOST) == {
        "shop": {"name": "Acme"},
        "items": [{"isbn": "0262510871"}, {}, {"isbn": "0201896834"}],
    }


def test_aliases_fragments_and_order() -> None:
    """Aliases are the keys; fragments' fields merge into place, at their first occurrence."""
    text = """
    { items { kind: __typename ...Title ... on Gift { isWrapped: wrapped } } first: shop { n: name } }
    fragment Title on Named { name }
    """
    assert InputQuery.compile(SCHEMA, text).project(HOST) == {
        "items": [
            {"kind": "Book", "name": "SICP"},
            {"kind": "Gift", "isWrapped": True},
            {"kind": "Book", "name": "TAOCP"},
        ],
        "first": {"n": "Acme"},
    }


def test_arguments_are_given_to_the_hosts_callable_once_per_set() -> None:
    """A field with arguments: the host's callable gets them as keywords (defaults included),
    once per distinct set, however many aliases ask for it."""
    config = Counted(lambda key, scope: {"key": key, "scope": scope})
    text = '{ a: config(key: "x") b: config(key: "x") c: config(key: "x", scope: "shop") }'
    result = InputQuery.compile(SCHEMA, text).project({"config": config})
    assert result == {
        "a": {"key": "x", "scope": "app"},
        "b": {"key": "x", "scope": "app"},
        "c": {"key": "x", "scope": "shop"},
    }
    assert config.calls == [{"key": "x", "scope": "app"}, {"key": "x", "scope": "shop"}]


def test_metafield_arguments_in_the_shopify_style() -> None:
    """``metafield(namespace:, key:)`` resolved by the host, per object, with aliases."""
    text = """
    query {
      discountNode {
        config: metafield(namespace: "$app:volume", key: "config") { jsonValue }
        other: metafield(key: "other") { value }
      }
    }
    """
    stored: dict[tuple[str | None, str], Any] = {
        ("$app:volume", "config"): {"type": "json", "value": "{}", "jsonValue": {"min": 2}}
    }

    def metafield(key: str, namespace: str | None = None) -> Any:
        return stored.get((namespace, key))

    result = InputQuery.compile(DISCOUNT, text).project({"discountNode": {"metafield": metafield}})
    assert result == {"discountNode": {"config": {"jsonValue": {"min": 2}}, "other": None}}


def test_variables_are_refused_at_their_definition() -> None:
    """Nothing supplies variable values when a script runs, so a query declaring variables
    (which would fail on every call) is refused at deploy, at the first variable's definition;
    literal arguments and directives are what a query uses instead."""
    error = _refusal(
        DISCOUNT,
        "query Q(\n  $tags: [String!]!) { cart { buyerIdentity { customer { hasAnyTag(tags: $tags) } } } }",
    )
    assert error.detail["problem"].startswith("variables are not supported: $tags")
    assert (error.detail["line"], error.detail["column"]) == (2, 3)
    with_default = "query Q($withName: Boolean = true) { shop { name @include(if: $withName) } }"
    assert "$withName" in _refusal(SCHEMA, with_default).detail["problem"]
    literal = InputQuery.compile(
        SCHEMA, '{ shop { name @include(if: false) domain } cart: config(key: "cart") }'
    )
    assert literal.variable_names == ()
    host = {"shop": {"name": "Acme", "domain": "d"}, "config": lambda key, scope: [key, scope]}
    assert literal.project(host) == {"shop": {"domain": "d"}, "cart": ["cart", "app"]}


def test_lists_are_projected_element_wise() -> None:
    """Lists of objects, of leaves and of lists; a tuple is a list too."""
    query = InputQuery.compile(SCHEMA, "{ grid items { ... on Gift { wrapped } } }")
    assert query.project(
        {"grid": ((1,), [2, None]), "items": ({"__typename": "Gift", "wrapped": False},)}
    ) == {
        "grid": [[1], [2, None]],
        "items": [{"wrapped": False}],
    }


def test_objects_are_read_by_attribute_as_graphql_reads_them() -> None:
    """A host value that is not a mapping is read by attribute (graphql-core's default)."""

    class Shop:
        name = "Acme"
        domain = "acme.example"

    assert InputQuery.compile(SCHEMA, "{ shop { name domain } }").project({"shop": Shop()}) == {
        "shop": {"name": "Acme", "domain": "acme.example"}
    }


def test_a_projection_over_its_budget_is_input_too_large() -> None:
    """Each list's elements are charged (length times what the query selects in one) before
    they are built: past ``max_values`` (MAX_PROJECTED_VALUES by default) the call fails with
    ``input_too_large``, however small the input; an endless iterable is refused too."""
    query = InputQuery.compile(SCHEMA, "{ items { ... on Gift { a: wrapped b: wrapped c: wrapped } } }")
    gift = {"__typename": "Gift", "wrapped": True}
    # The root and its list, then 4 values per item (the item and its three aliases).
    assert query.project({"items": [gift] * 10}, max_values=42)["items"][9] == {
        "a": True,
        "b": True,
        "c": True,
    }
    with pytest.raises(InputTooLarge) as caught:
        query.project({"items": [gift] * 10}, max_values=41)
    assert caught.value.detail["limit"] == 41
    with pytest.raises(InputTooLarge):
        query.project({"items": [gift] * 30_000})  # 120,002 values from one shared dict
    with pytest.raises(InputTooLarge):
        query.project({"items": itertools.repeat(gift)})
    with pytest.raises(InputTooLarge):
        asyncio.run(query.plan().project_async({"items": [gift] * 30_000}))
    assert len(query.project({"items": [gift] * 20_000})["items"]) == 20_000


def test_a_merged_plan_is_held_to_the_budget_too() -> None:
    """The union the client projects is charged as each app's plan is."""
    one = InputQuery.compile(SCHEMA, "{ grid }").plan()
    with pytest.raises(InputTooLarge):
        merge([one]).project({"grid": [[1] * 10] * 10}, max_values=100)
    assert merge([one]).project({"grid": [[1] * 10] * 10}, max_values=200)["grid"][0] == [1] * 10


def test_selection_lists_what_the_plan_reads() -> None:
    """``selection()`` describes the plan (what ``client.input_query`` reports)."""
    plan = InputQuery.compile(SCHEMA, "{ s: shop { name } items { ... on Book { isbn } } }").plan()
    assert plan.selection() == {
        "s": {"name": None},
        "items": {"... on Book": {"isbn": None}, "... on Gift": {}},
    }


# -- loaders ----------------------------------------------------------------------------------


def test_loaders_are_called_once_and_only_when_selected() -> None:
    """Any value may be a zero-argument loader: called only if selected (an unselected one
    never), once per call however often it is selected, again on the next call."""
    shop = Counted({"name": "Acme", "domain": "acme.example", "owner": never})
    items = Counted([{"__typename": "Book", "name": "SICP", "isbn": "1", "pages": never}])
    host = {"shop": shop, "items": items, "required": never, "grid": never, "config": never}
    query = InputQuery.compile(
        SCHEMA, "{ shop { name } again: shop { domain } items { ... on Book { isbn } } }"
    )
    assert query.project(host) == {
        "shop": {"name": "Acme"},
        "again": {"domain": "acme.example"},
        "items": [{"isbn": "1"}],
    }
    assert len(shop.calls) == 1
    assert len(items.calls) == 1
    query.project(host)
    assert len(shop.calls) == 2


def test_a_loader_may_return_null() -> None:
    """What a loader returns is the field's value: null is null (an object field's too), and a
    null for a non-null field nulls the parent, as a plain null would."""
    query = InputQuery.compile(SCHEMA, "{ shop { name owner { name } } }")
    host = {"shop": lambda: {"name": lambda: None, "owner": lambda: None}}
    assert query.project(host) == {"shop": {"name": None, "owner": None}}
    assert query.project(host) == _executed(SCHEMA, query.text, {"shop": {"name": None, "owner": None}})
    schema = InputSchema.from_sdl("type Input { shop: Shop }\ntype Shop { name: String domain: String! }")
    assert InputQuery.compile(schema, "{ shop { name } }").project({"shop": lambda: None}) == {"shop": None}
    assert InputQuery.compile(schema, "{ shop { domain } }").project({"shop": {"domain": lambda: None}}) == {
        "shop": None
    }


def test_a_loader_shared_by_two_places_runs_once() -> None:
    """One loader object reached from two fields (or list elements) is called once per call."""
    owner = Counted({"name": "Ada"})
    host = {"shop": {"owner": owner}, "required": {"domain": "d", "owner": owner}}
    text = "{ shop { owner { name } } required { owner { name } } }"
    schema = InputSchema.from_sdl(
        "type Input { shop: Shop required: Shop! }\ntype Shop { domain: String owner: Person }\n"
        "type Person { name: String }"
    )
    assert InputQuery.compile(schema, text).project(host) == {
        "shop": {"owner": {"name": "Ada"}},
        "required": {"owner": {"name": "Ada"}},
    }
    assert len(owner.calls) == 1


def test_an_awaitable_from_a_sync_projection_is_refused() -> None:
    """On ``project`` a loader must return its value; an awaitable is a clear error (not a
    coroutine object handed to the script)."""

    async def shop() -> dict[str, Any]:
        return {"name": "Acme"}

    with pytest.raises(InvalidArgument, match="use run_async"):
        InputQuery.compile(SCHEMA, "{ shop { name } }").project({"shop": shop})


def test_async_loaders_are_awaited_once_and_only_when_selected() -> None:
    """On ``project_async`` a loader may be an awaitable factory: called and awaited once,
    only if selected; plain loaders work there too."""
    calls: list[str] = []

    async def shop() -> dict[str, Any]:
        calls.append("shop")
        await asyncio.sleep(0)
        return {"name": "Acme", "owner": owner}

    async def owner() -> dict[str, Any]:
        calls.append("owner")
        return {"name": "Ada"}

    async def unselected() -> Any:
        raise AssertionError("an unselected async loader was called")

    host = {"shop": shop, "also": shop, "required": unselected, "count": lambda: 5}
    query = InputQuery.compile(SCHEMA, "{ shop { name owner { name } } again: shop { name } count }")
    result = asyncio.run(project_async(query, host))
    assert result == {
        "shop": {"name": "Acme", "owner": {"name": "Ada"}},
        "again": {"name": "Acme"},
        "count": 5,
    }
    assert calls == ["shop", "owner"]
    assert asyncio.run(query.plan().project_async(HOST)) == query.project(HOST)


def test_loaders_in_lists_and_at_the_root_are_called_once() -> None:
    """A loader may stand for a list's element (of objects, of abstract types, of leaves or of
    lists) or for the whole input: called, once per call however often it appears, not read
    by attribute (which would give nulls)."""
    book = Counted({"__typename": "Book", "name": "SICP", "isbn": "1"})
    person = Counted({"name": "Ada"})
    cell = Counted(7)
    row = Counted([8, None])
    host = Counted(
        {"items": [book, book], "grid": [[1, cell], row, row], "shop": {"name": "Acme", "owner": person}}
    )
    query = InputQuery.compile(SCHEMA, "{ items { ... on Book { isbn } } grid shop { owner { name } } }")
    assert query.project(host) == {
        "items": [{"isbn": "1"}, {"isbn": "1"}],
        "grid": [[1, 7], [8, None], [8, None]],
        "shop": {"owner": {"name": "Ada"}},
    }
    assert [len(c.calls) for c in (host, book, cell, row, person)] == [1, 1, 1, 1, 1]
    shops = InputQuery.compile(
        InputSchema.from_sdl("type Input { shops: [Shop] }\ntype Shop { name: String }"), "{ shops { name } }"
    )
    acme = Counted({"name": "Acme"})
    assert shops.project({"shops": [acme, Counted(None), acme]}) == {
        "shops": [{"name": "Acme"}, None, {"name": "Acme"}]
    }
    assert len(acme.calls) == 1


def test_async_loaders_in_lists_are_awaited_once() -> None:
    """On ``project_async`` a list's elements may be loaders returning awaitables: each called
    and awaited once; on ``project`` one is refused as a field's is."""
    calls: list[str] = []

    async def book() -> dict[str, Any]:
        calls.append("book")
        await asyncio.sleep(0)
        return {"__typename": "Book", "isbn": "1"}

    query = InputQuery.compile(SCHEMA, "{ items { ... on Book { isbn } } }")
    result = asyncio.run(query.plan().project_async({"items": [book, book]}))
    assert result == {"items": [{"isbn": "1"}, {"isbn": "1"}]}
    assert calls == ["book"]
    with pytest.raises(InvalidArgument, match="use run_async"):
        query.project({"items": [book]})


# -- joins and chains: merged plans -----------------------------------------------------------

APP_A = """
query A {
  cart {
    lines { quantity merchandise { ... on ProductVariant { id product { vip: hasAnyTag(tags: ["vip"]) } } } }
  }
  discountNode { metafield(namespace: "a", key: "config") { jsonValue } }
}
"""
APP_B = """
query B {
  cart {
    lines {
      id
      qty: quantity
      merchandise { __typename ... on CustomProduct { title } ... on ProductVariant { sku } }
    }
  }
  discountNode { metafield(namespace: "b", key: "config") { value } }
  presentmentCurrencyRate
}
"""


def _join_host() -> tuple[dict[str, Any], dict[str, Counted]]:
    loaders = {
        "lines": Counted(
            [
                {
                    "id": "L1",
                    "quantity": 2,
                    "merchandise": {
                        "__typename": "ProductVariant",
                        "id": "V1",
                        "sku": "S1",
                        "title": "T",
                        "product": {"hasAnyTag": Counted(lambda tags: "vip" in tags), "title": "P"},
                    },
                },
                {
                    "id": "L2",
                    "quantity": 1,
                    "merchandise": {"__typename": "CustomProduct", "title": "Custom"},
                },
            ]
        ),
        "metafield": Counted(
            lambda key, namespace=None: {
                "value": f"{namespace}/{key}",
                "jsonValue": {"ns": namespace},
                "type": "json",
            }
        ),
        "shop": Counted({"metafield": None}),
    }
    host = {
        "cart": {"lines": loaders["lines"], "buyerIdentity": never},
        "discountNode": {"metafield": loaders["metafield"]},
        "presentmentCurrencyRate": "1.0",
        "shop": loaders["shop"],
    }
    return host, loaders


def test_merged_plan_loads_the_union_once_and_each_app_gets_its_own_result() -> None:
    """A join's apps: the host loads the union once (each loader called once, one per
    metafield key), sends it (JSON), and each app's projection of it equals its projection of
    the host's input."""
    a = InputQuery.compile(DISCOUNT, APP_A).plan()
    b = InputQuery.compile(DISCOUNT, APP_B).plan()
    union = merge([a, b])
    assert union.merged

    host, loaders = _join_host()
    loaded = union.project(host)
    assert len(loaders["lines"].calls) == 1
    assert loaders["metafield"].calls == [
        {"namespace": "a", "key": "config"},
        {"namespace": "b", "key": "config"},
    ]
    assert loaders["shop"].calls == []  # neither app selects shop
    wire = json.loads(json.dumps(loaded))  # what crosses the queue

    direct_host, _ = _join_host()
    assert a.project(wire) == a.project(direct_host)
    assert b.project(wire) == b.project(_join_host()[0])
    assert a.project(wire) == {
        "cart": {
            "lines": [
                {"quantity": 2, "merchandise": {"id": "V1", "product": {"vip": True}}},
                {"quantity": 1, "merchandise": {}},
            ]
        },
        "discountNode": {"metafield": {"jsonValue": {"ns": "a"}}},
    }
    assert b.project(wire) == {
        "cart": {
            "lines": [
                {"id": "L1", "qty": 2, "merchandise": {"__typename": "ProductVariant", "sku": "S1"}},
                {"id": "L2", "qty": 1, "merchandise": {"__typename": "CustomProduct", "title": "Custom"}},
            ]
        },
        "discountNode": {"metafield": {"value": "b/config"}},
        "presentmentCurrencyRate": "1.0",
    }
    # The union holds only what some app selects: no product title, no buyer identity.
    line = wire["cart"]["lines"][0]
    assert set(line) == {"quantity", "merchandise", "id"}
    assert set(line["merchandise"]) == {"__typename", "id", "product", "sku"}
    assert "buyerIdentity" not in wire["cart"]


def test_merged_plan_keeps_each_apps_nulls() -> None:
    """The union applies no non-null rule; each app's projection applies its own, as it would
    over the host's input."""
    a = InputQuery.compile(SCHEMA, "{ shop { domain } count }").plan()
    b = InputQuery.compile(SCHEMA, "{ shop { name } }").plan()
    host = {"shop": {"name": "Acme"}, "count": 1}
    wire = json.loads(json.dumps(merge([a, b]).project(host)))
    assert a.project(wire) == a.project(host) == {"shop": None, "count": 1}
    assert b.project(wire) == b.project(host) == {"shop": {"name": "Acme"}}


def test_shared_memo_runs_loaders_once_across_apps() -> None:
    """Without a merged plan, projections that share a memo share their loaders' results."""
    a = InputQuery.compile(SCHEMA, "{ shop { name } }").plan()
    b = InputQuery.compile(SCHEMA, "{ shop { domain } }").plan()
    shop = Counted({"name": "Acme", "domain": "d"})
    memo: dict[Any, Any] = {}
    assert a.project({"shop": shop}, memo=memo) == {"shop": {"name": "Acme"}}
    assert b.project({"shop": shop}, memo=memo) == {"shop": {"domain": "d"}}
    assert len(shop.calls) == 1


def test_merge_needs_a_projection() -> None:
    """An empty merge is a caller's mistake."""
    with pytest.raises(InvalidArgument):
        merge([])


# -- import cost ------------------------------------------------------------------------------


def test_importing_the_module_does_not_import_graphql() -> None:
    """graphql-core is imported to build a schema or compile a query, not by importing the
    module (which the host side does on every start)."""
    code = (
        "import sys, scriptpool.config.input_query as q, scriptpool.config\n"
        "assert 'graphql' not in sys.modules, 'graphql imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
