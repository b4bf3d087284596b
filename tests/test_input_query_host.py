"""Input queries on the host and worker side, through real workers and a real Redis: the client
projects its input through the queries bound at (EP, shop), calling only the loaders they select,
once; the worker gives each app exactly its own query's result (in a join or chain too), checks
the client's word against the binding, and says so in the report; limits, capture and replay
work on the projected input; an EP without an input schema is as it was."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from scriptpool.config import Settings, get_logger
from scriptpool.config.errors import InputTooLarge, InvalidInput
from scriptpool.config.input_query import InputQuery, InputSchema
from scriptpool.config.wire import encode_input, query_digest
from scriptpool.engine import Sandbox
from scriptpool.producer import Client
from scriptpool.registry import Registry
from scriptpool.runtime import CaptureStore, Executor, replay
from tests import guests
from tests.conftest import deployer_fixture
from tests.pool import pool_fixtures

log = get_logger("test")

SDL = """
type Input { cart: Cart!  shop: Shop! }
type Cart { lines: [CartLine!]!  buyerIdentity: BuyerIdentity  cost: CartCost! }
type CartLine { id: ID!  quantity: Int!  merchandise: Merchandise!  cost: CartLineCost! }
union Merchandise = ProductVariant | CustomProduct
type ProductVariant { id: ID!  title: String  sku: String  product: Product! }
type CustomProduct { title: String! }
type Product {
  id: ID!
  title: String!
  vendor: String
  hasAnyTag(tags: [String!]! = []): Boolean!
}
type CartLineCost { totalAmount: MoneyV2! }
type MoneyV2 { amount: Decimal!  currencyCode: String! }
scalar Decimal
type BuyerIdentity { email: String  customer: Customer }
type Customer { id: ID!  numberOfOrders: Int! }
type CartCost { totalAmount: MoneyV2! }
type Shop { metafield(namespace: String!, key: String!): Metafield }
type Metafield { value: String!  type: String! }
"""

# A discount app's query: aliases, a fragment on a union member, an argument resolved by a host
# callable, a nullable leaf the host has no value for.
QUERY_A = """
query Input {
  cart {
    lines {
      id
      qty: quantity
      merchandise { __typename ...Variant }
    }
    buyerIdentity { email }
  }
  shop { config: metafield(namespace: "app", key: "config") { value } }
}
fragment Variant on ProductVariant { sku product { vip: hasAnyTag(tags: ["vip"]) } }
"""

# A cart-validation app's query: other fields of the same cart.
QUERY_B = """
query Input {
  cart {
    lines { cost { totalAmount { amount } } }
    cost { totalAmount { amount currencyCode } }
  }
}
"""


def host_input(calls: Counter[str]) -> dict[str, Any]:
    """The host's whole input, with loaders for what is costly to load; ``calls`` counts them."""

    def loader(name: str, value: Any) -> Callable[..., Any]:
        def load(**arguments: Any) -> Any:
            calls[name] += 1
            return value(**arguments) if callable(value) else value

        return load

    lines: list[dict[str, Any]] = []
    for n in range(3):
        merchandise: dict[str, Any] = (
            {
                "__typename": "ProductVariant",
                "id": f"gid://shopify/ProductVariant/{n}",
                "title": f"Variant {n}",
                "sku": None if n == 0 else f"SKU-{n}",
                "product": {
                    "id": f"gid://shopify/Product/{n}",
                    "title": f"Product {n}",
                    "vendor": "ACME",
                    "hasAnyTag": loader(f"tags{n}", lambda tags, n=n: n == 1 and "vip" in tags),
                },
            }
            if n < 2
            else {"__typename": "CustomProduct", "title": "Gift wrap"}
        )
        lines.append(
            {
                "id": f"gid://shopify/CartLine/{n}",
                "quantity": n + 1,
                "merchandise": merchandise,
                "cost": {"totalAmount": {"amount": f"{10 * (n + 1)}.0", "currencyCode": "EUR"}},
            }
        )
    return {
        "cart": {
            "lines": lines,
            "buyerIdentity": loader("buyer", {"email": None, "customer": {"id": "c1", "numberOfOrders": 4}}),
            "cost": loader("cart_cost", {"totalAmount": {"amount": "60.0", "currencyCode": "EUR"}}),
        },
        "shop": {
            "metafield": loader(
                "metafield", lambda namespace, key: {"value": f"{namespace}/{key}", "type": "json"}
            )
        },
        "reviews": loader("reviews", ["unselected by every query"]),
    }


# What GraphQL execution of each query over host_input gives.
EXPECTED_A = {
    "cart": {
        "lines": [
            {
                "id": "gid://shopify/CartLine/0",
                "qty": 1,
                "merchandise": {"__typename": "ProductVariant", "sku": None, "product": {"vip": False}},
            },
            {
                "id": "gid://shopify/CartLine/1",
                "qty": 2,
                "merchandise": {"__typename": "ProductVariant", "sku": "SKU-1", "product": {"vip": True}},
            },
            {"id": "gid://shopify/CartLine/2", "qty": 3, "merchandise": {"__typename": "CustomProduct"}},
        ],
        "buyerIdentity": {"email": None},
    },
    "shop": {"config": {"value": "app/config"}},
}
EXPECTED_B = {
    "cart": {
        "lines": [{"cost": {"totalAmount": {"amount": f"{10 * n}.0"}}} for n in (1, 2, 3)],
        "cost": {"totalAmount": {"amount": "60.0", "currencyCode": "EUR"}},
    }
}
DIGEST_A, DIGEST_B = query_digest(QUERY_A), query_digest(QUERY_B)

pool_settings, workers = pool_fixtures(1, {"iq": [0]})
deployer = deployer_fixture((), scope="module")


@pytest.fixture(scope="module")
def client(pool_settings: Settings, workers: object) -> Iterator[Client]:
    """One client for the module, as a host keeps one."""
    with Client(pool_settings) as c:
        yield c


@pytest.fixture(scope="module")
def cart_ep(deployer: Registry) -> str:
    """A single-script EP with the input schema, capturing every run."""
    deployer.define_extension_point("iq_cart", input_graphql=SDL, capture_rate=1.0)
    return "iq_cart"


def test_the_script_gets_exactly_its_query_s_result_and_only_selected_loaders_run(
    deployer: Registry, client: Client, cart_ep: str
) -> None:
    """An echo script deployed with QUERY_A prints exactly what GraphQL gives for it (aliases,
    the fragment by ``__typename``, the argument resolved by the host's callable, nulls): the
    loaders it selects run once each, the others never; the report names the query and says
    the client was current; ``input_query`` shows the selection."""
    deployer.deploy(cart_ep, "s1", guests.ECHO, input_query=QUERY_A)
    plain = InputQuery.compile(InputSchema.from_sdl(SDL), QUERY_A).project(host_input(Counter()))
    assert plain == EXPECTED_A  # the reference: the config core's projection of the same input
    calls: Counter[str] = Counter()
    outcome = client.run(cart_ep, "s1", host_input(calls), strict=True, timeout=10)
    assert outcome.output == EXPECTED_A
    assert list(outcome.output["cart"]["lines"][0]) == ["id", "qty", "merchandise"]  # the query's order
    assert calls == Counter({"buyer": 1, "metafield": 1, "tags0": 1, "tags1": 1})
    assert outcome.report is not None
    assert (outcome.report.input_query, outcome.report.input_query_client) == (DIGEST_A, "current")
    assert outcome.report.input_bytes == len(encode_input(EXPECTED_A))
    selection = client.input_query(cart_ep, "s1")
    assert selection is not None and set(selection) == {"cart", "shop"}
    assert 'metafield({"key":"config","namespace":"app"})' in selection["shop"]


def test_run_async_awaits_loader_factories_once_and_only_when_selected(
    deployer: Registry, client: Client, cart_ep: str
) -> None:
    """On ``run_async`` a loader may return an awaitable: awaited once, and a loader no query
    selects is never called."""
    deployer.deploy(cart_ep, "s2", guests.ECHO, input_query=QUERY_A)
    calls: Counter[str] = Counter()

    async def buyer() -> dict[str, Any]:
        calls["buyer"] += 1
        await asyncio.sleep(0.001)
        return {"email": "a@example.com"}

    async def never() -> Any:
        calls["never"] += 1
        return {}

    value = host_input(calls)
    value["cart"]["buyerIdentity"] = buyer
    value["cart"]["cost"] = never
    outcome = asyncio.run(client.run_async(cart_ep, "s2", value, strict=True, timeout=10))
    expected = json.loads(json.dumps(EXPECTED_A))
    expected["cart"]["buyerIdentity"] = {"email": "a@example.com"}
    assert outcome.output == expected
    assert calls["buyer"] == 1 and calls["never"] == 0 and calls["reviews"] == 0


def test_a_join_gives_each_app_only_its_own_query_s_result(deployer: Registry, client: Client) -> None:
    """A join of two apps with different queries (the Wasm reducer echoes every part's output,
    and each part echoes its input): app a sees only QUERY_A's result, b only QUERY_B's; the
    union crossed the queue once, and each loader either selects ran once."""
    deployer.define_extension_point("iq_join", input_graphql=SDL, combine="join", reducer="wasm")
    deployer.deploy("iq_join", "s", guests.ECHO, app="a", input_query=QUERY_A)
    deployer.deploy("iq_join", "s", guests.ECHO, app="b", input_query=QUERY_B)
    deployer.deploy("iq_join", "s", guests.ECHO, app="reducer")
    calls: Counter[str] = Counter()
    outcome = client.run("iq_join", "s", host_input(calls), strict=True, timeout=10)
    assert outcome.output == {
        "outputs": [{"app": "a", "output": EXPECTED_A}, {"app": "b", "output": EXPECTED_B}]
    }
    assert calls == Counter({"buyer": 1, "metafield": 1, "tags0": 1, "tags1": 1, "cart_cost": 1})
    queried = [(p.app, p.report.input_query, p.report.input_query_client) for p in outcome.parts]
    assert queried == [("a", DIGEST_A, "current"), ("b", DIGEST_B, "current"), ("reducer", "", "")]


def test_a_chain_step_gets_its_own_query_s_result_as_its_input(deployer: Registry, client: Client) -> None:
    """In a chain each step's ``input`` is its own query's result; an app without a query there
    gets the whole input, every loader called once (those that take arguments are left out)."""
    deployer.define_extension_point("iq_chain", input_graphql=SDL, combine="chain")
    deployer.deploy("iq_chain", "s", guests.ECHO, app="a", input_query=QUERY_B)
    deployer.deploy("iq_chain", "s", guests.ECHO, app="b", input_query=QUERY_A)
    calls: Counter[str] = Counter()
    outcome = client.run("iq_chain", "s", host_input(calls), strict=True, timeout=10)
    assert outcome.output == {"input": EXPECTED_A, "previous": {"input": EXPECTED_B, "previous": None}}
    assert calls["reviews"] == 0

    deployer.deploy("iq_chain", "s", guests.ECHO, app="c")  # no query: the whole input
    time.sleep(0.2)  # the client hears of the deploy (invalidation), well within this
    calls.clear()
    outcome = client.run("iq_chain", "s", host_input(calls), strict=True, timeout=10)
    whole = outcome.output["input"]
    assert outcome.output["previous"]["input"] == EXPECTED_A
    assert (
        whole["reviews"] == ["unselected by every query"]
        and whole["cart"]["cost"]["totalAmount"]["amount"] == "60.0"
    )
    assert whole["cart"]["buyerIdentity"]["customer"]["numberOfOrders"] == 4
    assert "hasAnyTag" not in whole["cart"]["lines"][0]["merchandise"]["product"]
    assert calls == Counter(
        {"buyer": 1, "metafield": 1, "tags0": 1, "tags1": 1, "cart_cost": 1, "reviews": 1}
    )
    assert outcome.parts[2].report.input_query_client == ""


def test_a_deploy_that_changes_the_query_reaches_a_running_client_and_no_script_sees_a_wrong_shape(
    deployer: Registry, client: Client, cart_ep: str
) -> None:
    """While a thread calls without pause, a deploy replaces QUERY_A with QUERY_B: every output
    is exactly the result of the query its report names, and the client's selection follows
    the deploy within a generous bound (the time is logged)."""
    deployer.deploy(cart_ep, "live", guests.ECHO, input_query=QUERY_A)
    assert client.run(cart_ep, "live", host_input(Counter()), strict=True).output == EXPECTED_A
    seen: list[tuple[str, str, Any]] = []
    stop = threading.Event()

    def calling() -> None:
        while not stop.is_set():
            outcome = client.run(cart_ep, "live", host_input(Counter()), timeout=10)
            assert outcome.report is not None, outcome.error
            code = "" if outcome.error is None else outcome.error.code
            output = outcome.output if outcome.ok else code
            seen.append((outcome.report.input_query, outcome.report.input_query_client, output))

    caller = threading.Thread(target=calling)
    caller.start()
    try:
        time.sleep(0.2)
        deployer.deploy(cart_ep, "live", guests.ECHO, input_query=QUERY_B)
        deployed = time.monotonic()  # the deploy has published its invalidation
        while client.input_query(cart_ep, "live") != {
            "cart": {
                "lines": {"cost": {"totalAmount": {"amount": None}}},
                "cost": {"totalAmount": {"amount": None, "currencyCode": None}},
            }
        }:
            assert time.monotonic() - deployed < 5, "the client never heard of the deploy"
            time.sleep(0.001)
        heard_ms = (time.monotonic() - deployed) * 1000
        log.info("input_query_invalidation", heard_ms=round(heard_ms, 2))
        print(f"client's selection changed {heard_ms:.1f} ms after the deploy")
        time.sleep(0.2)
    finally:
        stop.set()
        caller.join()
    expected = {DIGEST_A: EXPECTED_A, DIGEST_B: EXPECTED_B}
    assert {digest for digest, _, _ in seen} == {DIGEST_A, DIGEST_B}
    stale = [output for _, client_was, output in seen if client_was == "stale"]
    print(f"{len(seen)} calls, {len(stale)} of them projected by the client for the replaced query")
    for digest, client_was, output in seen:
        # A stale job for QUERY_B over what was sent (A's union) lacks B's non-null cost fields:
        # it is not run (its script would see nulls up to the root), and says so.
        assert output == (expected[digest] if client_was == "current" else InvalidInput.code)
    assert seen[-1][:2] == (DIGEST_B, "current")


def stale_b_over_a() -> Any:
    """QUERY_B's result over the union the client sends for QUERY_A: what a stale job gives."""
    from scriptpool.config.input_query import merge

    schema = InputSchema.from_sdl(SDL)
    union_a = merge([InputQuery.compile(schema, QUERY_A).plan()]).project(host_input(Counter()))
    return InputQuery.compile(schema, QUERY_B).project(union_a)


def test_a_stale_job_is_projected_with_the_binding_s_query_and_reported_stale(
    deployer: Registry, executor_iq: Executor, cart_ep: str
) -> None:
    """A job projected for QUERY_A reaches a worker after the deploy of QUERY_B, whose non-null
    cost fields A's union lacks: not run on that partial input (``invalid_input``, naming the
    field; GraphQL would null up to the root), the report says stale; a job without queries
    says none; an app deployed without a query that gets a projection (the client thought it
    had one) is not run: ``invalid_input``, stale."""
    deployer.deploy(cart_ep, "stale", guests.ECHO, input_query=QUERY_B)
    schema = InputSchema.from_sdl(SDL)
    union_a = InputQuery.compile(schema, QUERY_A).plan()
    from scriptpool.config.input_query import merge

    sent = merge([union_a]).project(host_input(Counter()))
    stale = executor_iq.execute(cart_ep, "stale", encode_input(sent), queries={"default": DIGEST_A})
    # QUERY_B's non-null cost fields are missing from A's union: GraphQL nulls up to the root.
    assert stale_b_over_a() is None
    assert not stale.ok and stale.error is not None and stale.error.code == InvalidInput.code
    assert "'cart.lines[0].cost'" in stale.error.message and stale.error.detail["client"] == "stale"
    assert (stale.report.input_query, stale.report.input_query_client) == (DIGEST_B, "stale")
    # The same union without queries named (a job from a client that names none): refused too.
    unnamed = executor_iq.execute(cart_ep, "stale", encode_input(sent))
    assert not unnamed.ok and unnamed.error is not None and unnamed.error.code == InvalidInput.code
    assert unnamed.report.input_query_client == "none"
    whole = executor_iq.execute(cart_ep, "stale", encode_input(EXPECTED_B))
    assert whole.ok and whole.output == EXPECTED_B
    assert (whole.report.input_query, whole.report.input_query_client) == (DIGEST_B, "none")

    deployer.deploy(cart_ep, "stale", guests.ECHO)  # no query now
    executor_iq.invalidate(cart_ep, "stale")
    refused = executor_iq.execute(cart_ep, "stale", encode_input(sent), queries={"default": DIGEST_B})
    assert not refused.ok and refused.error is not None and refused.error.code == InvalidInput.code
    assert refused.report.input_query_client == "stale"
    fine = executor_iq.execute(cart_ep, "stale", encode_input(EXPECTED_B), queries={"default": ""})
    assert fine.ok and fine.output == EXPECTED_B and fine.report.input_query_client == ""


@pytest.fixture
def executor_iq(deployer: Registry, sandbox: Sandbox, pool_settings: Settings) -> Executor:
    """An in-process executor over the module's registry: what a worker runs, given any job."""
    return Executor(deployer, sandbox, pool_settings)


def test_the_input_size_limit_applies_to_the_projection(deployer: Registry, client: Client) -> None:
    """An EP whose input limit is below the whole input but above the query's result: the call
    runs; a query that selects more than the limit is refused by the client (input_too_large)."""
    deployer.define_extension_point("iq_small", input_graphql=SDL, limits={"input_bytes": 2_000})
    deployer.deploy("iq_small", "s", guests.ECHO, input_query=QUERY_B)
    big = host_input(Counter())
    big["cart"]["lines"] = big["cart"]["lines"] * 10  # 30 lines: the whole input is far over 2,000 bytes
    assert (
        len(encode_input(InputQuery.compile(InputSchema.from_sdl(SDL), QUERY_B).project(big)))
        < 2_000
        < len(json.dumps(big, default=lambda _: None))
    )
    assert client.run("iq_small", "s", big, strict=True).ok
    deployer.deploy("iq_small", "s", guests.ECHO, input_query=QUERY_A)
    time.sleep(0.2)  # the client hears of the deploy
    big["cart"]["lines"] = big["cart"]["lines"] * 4
    with pytest.raises(InputTooLarge):
        client.run("iq_small", "s", big)


def test_a_captured_run_keeps_the_projected_input_and_replays_exactly(
    deployer: Registry,
    client: Client,
    cart_ep: str,
    redis_url: str,
    pool_settings: Settings,
    sandbox: Sandbox,
) -> None:
    """The EP captures every run: the record's input is what the script saw (QUERY_A's result,
    not the host's input), and replay runs it again to the same output and instructions."""
    deployer.deploy(cart_ep, "cap", guests.ECHO, input_query=QUERY_A)
    outcome = client.run(cart_ep, "cap", host_input(Counter()), strict=True)
    store = CaptureStore(redis.Redis.from_url(redis_url), pool_settings)
    deadline = time.monotonic() + 10
    while not (summaries := store.summaries(ep=cart_ep, shop_id="cap")):
        assert time.monotonic() < deadline, "never captured"
        time.sleep(0.02)
    run = store.get(summaries[0].id)
    assert run.input == encode_input(EXPECTED_A)
    again = replay(run, deployer, sandbox)
    assert again.identical and again.result.output == outcome.output == EXPECTED_A


def test_an_ep_without_an_input_schema_is_as_it_was(deployer: Registry, client: Client) -> None:
    """No schema: the input goes as given (the report says nothing of queries), the client asks
    nothing about queries (``input_query`` is None) and a loader is not JSON (``invalid_input``)."""
    deployer.define_extension_point("iq_plain")
    deployer.deploy("iq_plain", "s", guests.ECHO)
    outcome = client.run("iq_plain", "s", {"cart": {"lines": [1, 2]}}, strict=True)
    assert outcome.output == {"cart": {"lines": [1, 2]}}
    assert outcome.report is not None and (outcome.report.input_query, outcome.report.input_query_client) == (
        "",
        "",
    )
    assert client.input_query("iq_plain", "s") is None
    with pytest.raises(InvalidInput):
        client.run("iq_plain", "s", {"cart": lambda: {}})


# -- review fixes ---------------------------------------------------------------------------------


def test_a_stale_job_missing_only_nullable_fields_runs_with_nulls(
    deployer: Registry, executor_iq: Executor, cart_ep: str
) -> None:
    """Stale, but what the new query reads and the old union lacks is nullable (the buyer's
    customer): the script runs with null there, as GraphQL gives it, and the report says stale."""
    query = "query Input { cart { buyerIdentity { email customer { id } } } }"
    deployer.deploy(cart_ep, "nullable", guests.ECHO, input_query=query)
    from scriptpool.config.input_query import merge

    sent = merge([InputQuery.compile(InputSchema.from_sdl(SDL), QUERY_A).plan()]).project(
        host_input(Counter())
    )
    stale = executor_iq.execute(cart_ep, "nullable", encode_input(sent), queries={"default": DIGEST_A})
    assert stale.ok, stale.error
    assert stale.output == {"cart": {"buyerIdentity": {"email": None, "customer": None}}}
    assert stale.report.input_query_client == "stale"


def test_ep_runtimes_share_compiled_schemas_and_plans_across_reloads(
    deployer: Registry, executor_iq: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker makes its EP's runtime again whenever the cached definition expires or is
    invalidated: the schema is built and the query compiled once per process all the same."""
    from scriptpool.config.input_query import InputQuery as Query
    from scriptpool.config.input_query import InputSchema as Schema

    sdl = SDL + f"\ntype Unique{time.time_ns()} {{ x: Int }}\n"  # a schema no test compiled yet
    deployer.define_extension_point("iq_reload", input_graphql=sdl)
    deployer.deploy("iq_reload", "s", guests.ECHO, input_query=QUERY_B)
    built: Counter[str] = Counter()
    from_sdl, compile_query = Schema.from_sdl, Query.compile

    def counted_schema(text: str) -> Schema:
        built["schema"] += 1
        return from_sdl(text)

    def counted_query(schema: Schema, text: str, **caps: int) -> Query:
        built["query"] += 1
        return compile_query(schema, text, **caps)

    monkeypatch.setattr(Schema, "from_sdl", staticmethod(counted_schema))
    monkeypatch.setattr(Query, "compile", staticmethod(counted_query))
    for _ in range(3):
        executor_iq.invalidate("iq_reload")  # what an expiry or an invalidation does
        done = executor_iq.execute("iq_reload", "s", encode_input(EXPECTED_B), queries={"default": DIGEST_B})
        assert done.ok and done.output == EXPECTED_B, done.error
    assert built == Counter({"schema": 1, "query": 1})


def test_a_query_that_does_not_compile_is_refused_without_compiling_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bound query that does not compile against the EP's schema (the EP was redefined since):
    ``invalid_input_query`` on every job, from a runtime made again too, compiled once."""
    from types import SimpleNamespace

    from scriptpool.config.errors import InvalidInputQuery
    from scriptpool.config.input_query import InputQuery as Query
    from scriptpool.runtime._input import ScriptInput
    from scriptpool.runtime._queries import EpQueries

    sdl = SDL + f"\ntype Unique{time.time_ns()} {{ x: Int }}\n"
    text = "query Input { cart { gone } }"
    deployment: Any = SimpleNamespace(input_query=text, app="a")
    calls: Counter[str] = Counter()
    compile_query = Query.compile

    def counted(schema: InputSchema, query: str, **caps: int) -> Query:
        calls["compile"] += 1
        return compile_query(schema, query, **caps)

    monkeypatch.setattr(Query, "compile", staticmethod(counted))
    for _ in range(2):
        queries = EpQueries(sdl)  # as after each expiry of the EP's definition
        for _ in range(2):
            with pytest.raises(InvalidInputQuery, match="gone"):
                queries.input_for(deployment, ScriptInput(b"{}"), (query_digest(text), "current"))
    assert calls["compile"] == 1


def test_a_projected_job_at_an_ep_without_a_schema_now_is_not_run(
    deployer: Registry, executor_iq: Executor
) -> None:
    """The client projected for queries, but the EP was redefined without an input schema: no
    script reads that projection as the whole input (``invalid_input``, stale); a job naming an
    app without a query (the whole input was sent) runs."""
    deployer.define_extension_point("iq_dropped")
    deployer.deploy("iq_dropped", "s", guests.ECHO)
    refused = executor_iq.execute("iq_dropped", "s", encode_input(EXPECTED_A), queries={"default": DIGEST_A})
    assert not refused.ok and refused.error is not None and refused.error.code == InvalidInput.code
    assert refused.report.input_query_client == "stale"
    whole = executor_iq.execute("iq_dropped", "s", encode_input({"x": 1}), queries={"default": ""})
    assert whole.ok and whole.output == {"x": 1}


def test_a_shadow_run_judges_the_candidate_on_its_own_query_s_result(
    deployer: Registry, executor_iq: Executor, cart_ep: str
) -> None:
    """During a rollout the client sends the union of the live query (A) and the candidate's
    (B, named under ``#candidate``); the shadow run, given the job's queries, gives the candidate
    exactly B's result and reports the client current."""
    from scriptpool.config.input_query import merge
    from scriptpool.registry import RolloutRules

    deployer.deploy(cart_ep, "shadow", guests.ECHO, input_query=QUERY_A)
    candidate = deployer.start_rollout(
        cart_ep, "shadow", guests.ECHO, RolloutRules(promote_after=1_000), input_query=QUERY_B
    )
    schema = InputSchema.from_sdl(SDL)
    plans = [InputQuery.compile(schema, q).plan() for q in (QUERY_A, QUERY_B)]
    sent = encode_input(merge(plans).project(host_input(Counter())))
    ran = executor_iq.run_candidate(
        cart_ep, "shadow", sent, candidate.id, queries={"default": DIGEST_A, "#candidate": DIGEST_B}
    )
    assert ran is not None
    shadow = ran[1]
    assert shadow.ok and shadow.output == EXPECTED_B, shadow.error
    assert (shadow.report.input_query, shadow.report.input_query_client) == (DIGEST_B, "current")


def test_the_client_s_queries_expire_without_an_invalidation(
    deployer: Registry,
    client: Client,
    cart_ep: str,
    pool_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A binding changed without an invalidation reaching the client (one missed while its
    subscription stayed up) reaches it all the same once its cached queries expire."""
    from scriptpool.producer import _queries as client_queries

    monkeypatch.setattr(client_queries, "QUERY_CACHE_TTL_S", 1.0)
    deployer.deploy(cart_ep, "ttl", guests.ECHO, input_query=QUERY_A)
    client.input_query(cart_ep, "ttl")  # starts the client's listener if no test did
    time.sleep(0.2)  # the deploy's invalidation heard, the listener subscribed: the next is kept
    selection_a = client.input_query(cart_ep, "ttl")
    assert selection_a is not None and set(selection_a) == {"cart", "shop"}
    key = pool_settings.keys.binding(cart_ep, "ttl")
    redis_client = redis.Redis.from_url(pool_settings.redis_url)  # the pool's, not flushed
    stored = json.loads(redis_client.hget(key, "default") or b"{}")
    stored["input_query"] = QUERY_B
    redis_client.hset(key, "default", json.dumps(stored))  # no invalidation published
    assert client.input_query(cart_ep, "ttl") == selection_a  # cached: nothing told the client
    deadline = time.monotonic() + 5
    while (selection := client.input_query(cart_ep, "ttl")) == selection_a:
        assert time.monotonic() < deadline, "the client's queries never expired"
        time.sleep(0.02)
    assert selection is not None and set(selection) == {"cart"}


def test_an_asynchronous_loader_on_run_is_refused_in_the_whole_input_too() -> None:
    """Some app has no query, so the whole input is sent with every loader called: on ``run`` a
    loader that returns an awaitable is refused by name (``invalid_input``: use run_async), and
    the coroutine is closed, never left to warn."""
    from scriptpool.config.input_query import merge
    from scriptpool.producer._queries import BoundQueries, prepare

    schema = InputSchema.from_sdl(SDL)
    bound = BoundQueries(merge([InputQuery.compile(schema, QUERY_A).plan()]), True, {"a": DIGEST_A, "b": ""})
    made: list[Any] = []

    async def reviews() -> list[str]:
        return ["never awaited"]

    def loader() -> Any:
        made.append(reviews())
        return made[-1]

    value = host_input(Counter())
    value["reviews"] = loader
    with pytest.raises(InvalidInput, match="run_async"):
        prepare(bound, value)
    assert len(made) == 1 and made[0].cr_frame is None  # closed


def test_the_whole_input_reads_which_loaders_took_arguments_once_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A join where one app's query calls a loader with arguments and another app has no query:
    the whole input leaves that loader out (its value for the query's arguments is added under
    its canonical key) and calls each other zero-argument loader once; which loaders took
    arguments is read from the projection's memo once per call, not once per loader."""
    from scriptpool.config.input_query import merge
    from scriptpool.producer import _queries as client_queries

    schema = InputSchema.from_sdl(SDL)
    query = (
        "query Input { cart { lines { merchandise { ... on ProductVariant "
        '{ product { hasAnyTag(tags: ["vip"]) } } } } } }'
    )
    plan = merge([InputQuery.compile(schema, query).plan()])
    bound = client_queries.BoundQueries(plan, True, {"a": "x", "b": ""})
    found: list[set[int]] = []
    loads = client_queries._Loads

    class Counted(loads):  # type: ignore[misc, valid-type]
        """One call's loads, kept as they are made."""

        def __init__(self, memo: dict[Any, Any], *, sync: bool) -> None:
            super().__init__(memo, sync=sync)
            found.append(self.with_arguments)

    monkeypatch.setattr(client_queries, "_Loads", Counted)
    calls: Counter[str] = Counter()
    value = host_input(calls)
    del value["shop"]  # its loader takes arguments that no query here gives
    full, _ = client_queries.prepare(bound, value)
    assert len(found) == 1 and len(found[0]) == 2  # both lines' hasAnyTag loaders, found once
    product = full["cart"]["lines"][1]["merchandise"]["product"]
    assert "hasAnyTag" not in product and product['hasAnyTag({"tags":["vip"]})'] is True
    assert calls == Counter({"tags0": 1, "tags1": 1, "buyer": 1, "cart_cost": 1, "reviews": 1})
