"""Input queries, the deploy side (issue 23): an EP's GraphQL input schema (``ep define
--input-graphql``), a deployment's query (``deploy`` and ``rollout start --input-query``),
checked at deploy against the schema and its caps, refused with one ``invalid_input_query``
naming the problem and its line and column, kept in the binding and shown by ``history`` and
``status``. What a call does with the query is tested beside the client and worker.

Long on purpose: one test per refusal and per command, sharing the schema and registry fixtures
at the top."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from scriptpool.cli import main
from scriptpool.config import ExtensionPoint, Settings
from scriptpool.config.errors import (
    ConfigurationError,
    ExtensionPointInUse,
    InvalidArgument,
    InvalidInputQuery,
)
from scriptpool.config.input_query import MAX_QUERY_BYTES, MAX_QUERY_COST
from scriptpool.registry import Candidate, Deployment, Registry, RolloutRules
from tests.conftest import EXAMPLES, deployer_fixture
from tests.test_cli import FAILED, OK, USAGE, cli_env, one_line

__all__ = ["cli_env"]  # a fixture this module uses, imported from the CLI tests

HERE = EXAMPLES / "input_query"
DISCOUNT_SDL = (HERE / "discount" / "schema.graphql").read_text()
DISCOUNT_QUERY = (HERE / "discount" / "run.graphql").read_text()
VALIDATION_SDL = (HERE / "cart_validation" / "schema.graphql").read_text()
VALIDATION_QUERY = (HERE / "cart_validation" / "run.graphql").read_text()
DISCOUNT_WASM = (EXAMPLES / "discount" / "discount.wasm").read_bytes()
V2_WASM = (EXAMPLES / "rollout" / "discount_v2.wasm").read_bytes()

deployer = deployer_fixture(("plain",), settings="settings")


# -- the records ----------------------------------------------------------------------------------


def test_an_extension_point_record_keeps_its_input_schema_and_caps() -> None:
    """``input_graphql`` and the two caps survive ``to_json``/``from_json``; a record from before
    input queries reads as no schema and Shopify's caps."""
    ep = ExtensionPoint("discount", input_graphql=DISCOUNT_SDL, max_query_bytes=6000, max_query_cost=60)
    back = ExtensionPoint.from_json(ep.to_json())
    assert (back.input_graphql, back.max_query_bytes, back.max_query_cost) == (DISCOUNT_SDL, 6000, 60)
    assert back == ep
    old = json.loads(ExtensionPoint("discount").to_json())
    for name in ("input_graphql", "max_query_bytes", "max_query_cost"):
        del old[name]
    legacy = ExtensionPoint.from_json(json.dumps(old))
    assert (legacy.input_graphql, legacy.max_query_bytes, legacy.max_query_cost) == (
        None,
        MAX_QUERY_BYTES,
        MAX_QUERY_COST,
    )


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("input_graphql", 42, "input_graphql"),
        ("input_graphql", ["type Input { a: Int }"], "input_graphql"),
        ("input_graphql", "   ", "input_graphql"),
        ("input_graphql", "x" * 1_048_577, "input_graphql"),
        ("max_query_bytes", "3000", "max_query_bytes"),
        ("max_query_bytes", True, "max_query_bytes"),
        ("max_query_bytes", 0, "max_query_bytes"),
        ("max_query_bytes", 65_537, "max_query_bytes"),
        ("max_query_bytes", 3000.0, "max_query_bytes"),
        ("max_query_cost", None, "max_query_cost"),
        ("max_query_cost", -1, "max_query_cost"),
        ("max_query_cost", 10**30, "max_query_cost"),
        ("max_query_cost", {"a": 1}, "max_query_cost"),
    ],
)
def test_a_hostile_extension_point_record_is_a_configuration_error(
    field: str, value: Any, named: str
) -> None:
    """What Redis hands back is not trusted: a schema that is not text (or is empty, or huge),
    a cap that is not a whole number in its range, each fails by name when read."""
    record = json.loads(ExtensionPoint("discount").to_json())
    record[field] = value
    with pytest.raises(ConfigurationError, match=named):
        ExtensionPoint.from_json(json.dumps(record))


def _deployment(**extra: Any) -> dict[str, Any]:
    return {
        "ep": "discount",
        "shop_id": "1234",
        "sha256": "ab" * 32,
        "export": "_start",
        "version": 3,
        "providers": [],
        "stack_bytes": 1 << 20,
        "deployed_at": 1.5,
        "app": "default",
        **extra,
    }


def test_a_deployment_record_keeps_its_input_query() -> None:
    """The query text round-trips byte for byte (comments, unicode); a record without one, as
    every binding before input queries, reads as None: the whole input."""
    text = DISCOUNT_QUERY + "# café\n"
    assert Deployment.from_json(json.dumps(_deployment(input_query=text))).input_query == text
    assert Deployment.from_json(json.dumps(_deployment())).input_query is None
    raw = _deployment(input_query=text)
    candidate = Candidate.from_json(
        json.dumps(
            {
                "id": "r1",
                "app": "default",
                "deployment": raw,
                "rules": {},
                "state": "shadowing",
                "started_at": 1.0,
            }
        )
    )
    assert candidate.input_query == text
    assert Candidate.from_json(candidate.to_json()).deployment["input_query"] == text


@pytest.mark.parametrize("value", [7, ["query { a }"], {"q": 1}, "q" * (4 * 65_536 + 1)])
def test_a_hostile_deployment_query_is_a_configuration_error(value: Any) -> None:
    """A stored query that is not text (or longer than any deploy accepts) fails by name when
    the binding is read, for a live app and for a rollout's candidate."""
    with pytest.raises(ConfigurationError, match="input query"):
        Deployment.from_json(json.dumps(_deployment(input_query=value)))
    if not isinstance(value, str):
        candidate = {
            "id": "r1",
            "app": "default",
            "deployment": _deployment(input_query=value),
            "rules": {},
            "state": "shadowing",
            "started_at": 1.0,
        }
        with pytest.raises(ConfigurationError, match="input query"):
            Candidate.from_json(json.dumps(candidate))


# -- defining an EP's input schema ----------------------------------------------------------------


def _keys_and_values(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key in the test Redis with its serialised value: what "nothing stored" compares."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


def test_define_keeps_the_input_schema_and_says_what_changed(deployer: Registry) -> None:
    """``define(input_graphql=...)`` stores the SDL and the caps; a redefinition reports
    ``input_graphql`` and each cap as changed fields; a schema that does not build is refused with
    its line and column, and the stored one stays."""
    created = deployer.define("discount", input_graphql=DISCOUNT_SDL)
    assert created.created
    ep = deployer.extension_point("discount")
    assert (ep.input_graphql, ep.max_query_bytes, ep.max_query_cost) == (DISCOUNT_SDL, 3000, 30)
    changed = deployer.define(
        "discount", input_graphql=VALIDATION_SDL, max_query_bytes=6000, max_query_cost=45
    )
    assert {(c.field, c.before, c.after) for c in changed.changes} == {
        ("input_graphql", DISCOUNT_SDL, VALIDATION_SDL),
        ("max_query_bytes", 3000, 6000),
        ("max_query_cost", 30, 45),
    }
    with pytest.raises(InvalidArgument) as info:
        deployer.define("discount", input_graphql="type Input {\n  cart: Cart\n}\n")
    assert (info.value.detail["line"], info.value.detail["column"]) == (2, 9)
    assert "Cart" in info.value.message
    with pytest.raises(InvalidArgument, match="no object type 'Input'"):
        deployer.define("discount", input_graphql="type Query { a: Int }")
    with pytest.raises(ConfigurationError, match="max_query_cost"):
        deployer.define("discount", input_graphql=DISCOUNT_SDL, max_query_cost=0)
    assert deployer.extension_point("discount").input_graphql == VALIDATION_SDL


# -- deploying with a query -----------------------------------------------------------------------


def test_a_deploy_binds_its_query_and_publishes_the_change(
    deployer: Registry, redis_client: redis.Redis, settings: Settings
) -> None:
    """A discount-style query passes and is stored with the binding; the deploy publishes the
    invalidation a deploy always publishes (so clients see the new query); a redeploy without a
    query binds None (the whole input), and the history keeps the version with the query."""
    deployer.define("discount", input_graphql=DISCOUNT_SDL)
    channel = redis_client.pubsub(ignore_subscribe_messages=True)
    channel.subscribe(settings.keys.invalidations())
    first = deployer.deploy("discount", "1234", DISCOUNT_WASM, input_query=DISCOUNT_QUERY)
    assert first.input_query == DISCOUNT_QUERY
    assert deployer.binding("discount", "1234").input_query == DISCOUNT_QUERY
    messages = [channel.get_message(timeout=1.0) for _ in range(3)]  # the subscription's first
    published = [json.loads(m["data"]) for m in messages if m is not None]
    assert published == [{"ep": "discount", "shop_id": "1234"}]
    channel.close()
    second = deployer.deploy("discount", "1234", DISCOUNT_WASM)
    assert (second.version, second.input_query) == (2, None)
    assert [(d.version, d.input_query) for d in deployer.history("discount", "1234")] == [(1, DISCOUNT_QUERY)]


def _over_size() -> str:
    # One field of cost 1 whose argument makes the text 3,030 bytes: over the size cap only.
    return '{ cart { attribute(key: "' + "k" * 3000 + '") { value } } }'


def _over_cost(leaves: int = 31) -> str:
    # 31 leaves (cost 31) in 600 bytes: over the cost cap only. The 31st is on line 34.
    fields = "\n".join(f"      q{n}: quantity" for n in range(leaves))
    return "{\n  cart {\n    lines {\n" + fields + "\n    }\n  }\n}\n"


REFUSED = [
    pytest.param(
        "{\n  cart {\n    lines {\n      quantity\n      price\n    }\n  }\n}\n",
        (5, 7),
        "Cannot query field 'price' on type 'CartLine'",
        id="unknown-field",
    ),
    pytest.param(_over_size(), (1, 3001), "over the cap of 3,000", id="over-size"),
    pytest.param(_over_cost(), (34, 7), "cost passes the cap of 30", id="over-cost"),
    pytest.param("{\n  cart {\n    lines { id \n}\n", (5, 1), "Syntax Error", id="syntax"),
]


@pytest.mark.parametrize(("query", "where", "problem"), REFUSED)
def test_a_refused_query_names_its_problem_and_place_and_stores_nothing(
    deployer: Registry, redis_client: redis.Redis, query: str, where: tuple[int, int], problem: str
) -> None:
    """Each refusal is one ``invalid_input_query`` whose detail names the problem, line and
    column; no Redis key changes (the module is not stored, nothing is bound), for a deploy and
    for a rollout's start."""
    deployer.define("discount", input_graphql=DISCOUNT_SDL)
    deployer.deploy("discount", "1234", DISCOUNT_WASM, input_query=DISCOUNT_QUERY)
    before = _keys_and_values(redis_client)
    for attempt in (
        lambda: deployer.deploy("discount", "1234", V2_WASM, input_query=query),
        lambda: deployer.deploy("discount", "99", V2_WASM, input_query=query, app="other"),
        lambda: deployer.start_rollout("discount", "1234", V2_WASM, RolloutRules(), input_query=query),
    ):
        with pytest.raises(InvalidInputQuery) as info:
            attempt()
        detail = info.value.detail
        assert problem in detail["problem"], detail
        assert (detail["line"], detail["column"]) == where, detail
        assert f"(line {detail['line']}, column {detail['column']})" in info.value.message
        assert _keys_and_values(redis_client) == before


def test_an_ep_can_raise_the_caps(deployer: Registry) -> None:
    """The 31-leaf query refused under Shopify's cost cap passes where the EP allows 40, and a
    3,030-byte one where it allows 4,000 bytes."""
    deployer.define("discount", input_graphql=DISCOUNT_SDL, max_query_cost=40, max_query_bytes=4000)
    assert deployer.deploy("discount", "1", DISCOUNT_WASM, input_query=_over_cost()).input_query
    assert deployer.deploy("discount", "2", DISCOUNT_WASM, input_query=_over_size()).input_query


def test_a_query_for_an_ep_without_an_input_schema_is_refused(
    deployer: Registry, redis_client: redis.Redis
) -> None:
    """``plain`` has no GraphQL schema: a query there is ``invalid_input_query`` saying so, and
    nothing is stored."""
    before = _keys_and_values(redis_client)
    with pytest.raises(InvalidInputQuery) as info:
        deployer.deploy("plain", "1", DISCOUNT_WASM, input_query="{ cart { lines { id } } }")
    assert info.value.detail["problem"] == "extension point plain has no input schema"
    assert (info.value.detail["line"], info.value.detail["column"]) == (1, 1)
    assert _keys_and_values(redis_client) == before


# -- changing the schema under bound queries ------------------------------------------------------

# The discount schema without CartLine.quantity: the bound discount query selects it (line 7).
NO_QUANTITY = DISCOUNT_SDL.replace("  quantity: Int!\n  merchandise", "  merchandise")


def test_a_schema_change_that_breaks_a_bound_query_is_refused_unless_forced(
    deployer: Registry, redis_client: redis.Redis
) -> None:
    """Dropping a field a bound query selects, lowering the cost cap under it, or dropping the
    schema, is ``extension_point_in_use`` listing every binding it breaks (a rollout's candidate
    too), and writes nothing; a change every bound query still passes is written; ``force``
    writes it and reports what broke."""
    assert NO_QUANTITY != DISCOUNT_SDL
    deployer.define("discount", input_graphql=DISCOUNT_SDL)
    deployer.deploy("discount", "1234", DISCOUNT_WASM, input_query=DISCOUNT_QUERY)
    deployer.deploy("discount", "77", DISCOUNT_WASM)  # no query: nothing to break
    deployer.start_rollout("discount", "77", V2_WASM, RolloutRules(), input_query=DISCOUNT_QUERY)
    before = _keys_and_values(redis_client)
    for change in (
        {"input_graphql": NO_QUANTITY},
        {"input_graphql": DISCOUNT_SDL, "max_query_cost": 5},
        {"input_graphql": None},
    ):
        with pytest.raises(ExtensionPointInUse) as info:
            deployer.define("discount", **change)
        broken = info.value.detail["broken"]
        assert len(broken) == 2, broken
        assert broken[0].startswith("discount/1234 app default: ")
        assert broken[1].startswith("discount/77 app default (rollout candidate): ")
        assert "--force" in info.value.message
        assert _keys_and_values(redis_client) == before
    raised = deployer.define("discount", input_graphql=DISCOUNT_SDL, max_query_cost=50)
    assert raised.broken_queries == () and deployer.extension_point("discount").max_query_cost == 50
    forced = deployer.define("discount", input_graphql=NO_QUANTITY, force=True)
    assert len(forced.broken_queries) == 2
    assert "Cannot query field 'quantity' on type 'CartLine'. (line 7, column 7)" in forced.broken_queries[0]
    assert deployer.extension_point("discount").input_graphql == NO_QUANTITY


# -- rollouts -------------------------------------------------------------------------------------


def test_a_rollout_carries_its_query_into_the_binding(deployer: Registry) -> None:
    """The candidate keeps its own query beside the live one's; promotion binds it, and the
    replaced version (with its query) goes to the history."""
    deployer.define("discount", input_graphql=DISCOUNT_SDL)
    deployer.deploy("discount", "1234", DISCOUNT_WASM, input_query=DISCOUNT_QUERY)
    narrower = "{ cart { lines { id quantity } } }"
    candidate = deployer.start_rollout("discount", "1234", V2_WASM, RolloutRules(), input_query=narrower)
    assert candidate.input_query == narrower
    bindings = deployer.bindings("discount", "1234")
    assert bindings.apps["default"].input_query == DISCOUNT_QUERY
    assert bindings.candidate_apps is not None
    assert bindings.candidate_apps["default"].input_query == narrower
    deployer.rollouts.decide("discount", "1234", "promoted", "promoted by hand")
    live = deployer.binding("discount", "1234")
    assert (live.version, live.input_query) == (2, narrower)
    assert [d.input_query for d in deployer.history("discount", "1234")] == [DISCOUNT_QUERY]


# -- the command line -----------------------------------------------------------------------------


def _query_file(tmp_path: Path, text: str, name: str = "run.graphql") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _define_and_deploy(capsys: pytest.CaptureFixture[str]) -> None:
    """``ep define discount --input-graphql`` and a deploy with the discount query, via the CLI."""
    schema = str(HERE / "discount" / "schema.graphql")
    assert main(["ep", "define", "discount", "--input-graphql", schema]) == OK
    module = str(EXAMPLES / "discount" / "discount.wasm")
    query = str(HERE / "discount" / "run.graphql")
    assert main(["deploy", "discount", "1234", module, "--input-query", query]) == OK
    capsys.readouterr()


def test_the_command_line_defines_deploys_and_shows_a_query(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ep show`` says the EP has a GraphQL schema and its caps; ``deploy --input-query`` says
    the query's digest, size and cost; ``history`` and ``status EP SHOP`` show the same short
    form, and ``--json`` the full text."""
    schema = str(HERE / "discount" / "schema.graphql")
    assert main(["ep", "define", "discount", "--input-graphql", schema, "--max-query-cost", "40"]) == OK
    assert main(["ep", "show", "discount"]) == OK
    assert "input graphql yes (queries up to 3,000 bytes and cost 40)" in capsys.readouterr().out
    module = str(EXAMPLES / "discount" / "discount.wasm")
    query = str(HERE / "discount" / "run.graphql")
    digest = hashlib.sha256(DISCOUNT_QUERY.encode()).hexdigest()
    from scriptpool.config.input_query import query_bytes

    size = query_bytes(DISCOUNT_QUERY)
    short = f"{digest[:12]} {size:,} B cost 8"
    assert main(["deploy", "discount", "1234", module, "--input-query", query]) == OK
    assert capsys.readouterr().out.rstrip().endswith(f"input query {short}")
    assert main(["deploy", "discount", "1234", module]) == OK  # version 2: the whole input
    capsys.readouterr()
    assert main(["history", "discount", "1234"]) == OK
    table = capsys.readouterr().out.splitlines()
    assert "input query" in table[0]
    assert "whole input" in table[2] and table[2].rstrip().endswith("yes")
    assert short in table[3]
    assert main(["history", "discount", "1234", "--json"]) == OK
    versions = json.loads(capsys.readouterr().out)["versions"]
    assert versions[0]["input_query"] is None
    assert versions[1]["input_query"] == {"sha256": digest, "bytes": size, "cost": 8, "text": DISCOUNT_QUERY}
    assert main(["rollback", "discount", "1234"]) == OK
    capsys.readouterr()
    main(["status", "discount", "1234"])
    assert (
        "app default: version 1 (sha256 " in (out := capsys.readouterr().out)
        and f"input query {short}" in out
    )
    main(["status", "discount", "1234", "--json"])
    app = json.loads(capsys.readouterr().out)["binding"]["apps"][0]
    assert app["input_query"]["text"] == DISCOUNT_QUERY and app["input_query"]["cost"] == 8


@pytest.mark.parametrize(("query", "where", "problem"), REFUSED)
def test_every_refusal_on_the_command_line_is_one_line_with_its_place(
    cli_env: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    redis_client: redis.Redis,
    query: str,
    where: tuple[int, int],
    problem: str,
) -> None:
    """``deploy`` and ``rollout start`` with a refused query exit 1 with one line
    ``scriptpool: invalid_input_query: FILE:LINE:COLUMN: input query refused: PROBLEM``, and
    change nothing in Redis; ``--json`` carries the line and column."""
    _define_and_deploy(capsys)
    path = _query_file(tmp_path, query)
    module = str(EXAMPLES / "rollout" / "discount_v2.wasm")
    before = _keys_and_values(redis_client)
    for argv in (
        ["deploy", "discount", "1234", module, "--input-query", path],
        ["deploy", "discount", "1234", module, "--app", "other", "--input-query", path],
        ["rollout", "start", "discount", "1234", module, "--input-query", path],
    ):
        line = one_line(capsys, argv, FAILED)
        assert line.startswith(
            f"scriptpool: invalid_input_query: {path}:{where[0]}:{where[1]}: input query refused: "
        )
        assert problem in line
        assert _keys_and_values(redis_client) == before
    main(["deploy", "discount", "1234", module, "--input-query", path, "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["code"], error["exit_code"]) == ("invalid_input_query", FAILED)


def test_a_query_without_a_schema_and_a_bad_schema_on_the_command_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A query for an EP without a GraphQL schema is refused (exit 1, one line saying so); a
    schema that does not build is a usage mistake (exit 2) naming FILE:LINE:COLUMN; a file that
    is not UTF-8 names the line and column of its first bad byte."""
    assert main(["ep", "define", "plain"]) == OK
    path = _query_file(tmp_path, DISCOUNT_QUERY)
    module = str(EXAMPLES / "discount" / "discount.wasm")
    capsys.readouterr()
    line = one_line(capsys, ["deploy", "plain", "1", module, "--input-query", path], FAILED)
    assert f"{path}:1:1: input query refused: extension point plain has no input schema" in line
    bad = _query_file(tmp_path, "type Input {\n  cart: Cart\n}\n", "schema.graphql")
    line = one_line(capsys, ["ep", "define", "plain", "--input-graphql", bad], USAGE)
    assert line == f"scriptpool: invalid_argument: {bad}:2:9: input schema refused: Unknown type 'Cart'."
    (tmp_path / "latin1.graphql").write_bytes(b"{ cart {\n  lines { id } } }\n# caf\xe9\n")
    latin = str(tmp_path / "latin1.graphql")
    _define_and_deploy(capsys)
    line = one_line(capsys, ["deploy", "discount", "1", module, "--input-query", latin], FAILED)
    assert line.startswith(f"scriptpool: invalid_input_query: {latin}:3:6: not UTF-8 text")


def test_a_breaking_schema_change_on_the_command_line_needs_force(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``ep define`` with a schema the bound query does not pass exits 1 naming the binding,
    line and column; ``--force`` writes it and lists the broken binding among the changes."""
    _define_and_deploy(capsys)
    schema = _query_file(tmp_path, NO_QUANTITY, "schema.graphql")
    line = one_line(capsys, ["ep", "define", "discount", "--input-graphql", schema], FAILED)
    assert line.startswith("scriptpool: extension_point_in_use: extension point discount: 1 input query")
    assert (
        "discount/1234 app default: Cannot query field 'quantity' on type 'CartLine'. (line 7, column 7)"
        in line
    )
    assert main(["ep", "define", "discount", "--input-graphql", schema, "--force"]) == OK
    out = capsys.readouterr().out
    assert "  input_graphql: replaced" in out
    assert "forced: 1 bound input query(ies) no longer pass:" in out and "discount/1234 app default" in out
    main(["history", "discount", "1234", "--json"])
    shown = json.loads(capsys.readouterr().out)["versions"][0]["input_query"]
    assert shown["cost"] is None and "quantity" in shown["problem"]


def test_rollout_start_with_a_query_and_promote_on_the_command_line(
    cli_env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``rollout start --input-query`` says the candidate's query; ``rollout promote`` binds it,
    and ``history`` shows the new live version with it."""
    _define_and_deploy(capsys)
    narrower = "{ cart { lines { id quantity } } }"
    path = _query_file(tmp_path, narrower)
    module = str(EXAMPLES / "rollout" / "discount_v2.wasm")
    assert main(["rollout", "start", "discount", "1234", module, "--input-query", path, "--json"]) == OK
    started = json.loads(capsys.readouterr().out)
    assert started["input_query"]["text"] == narrower and started["input_query"]["cost"] == 2
    assert main(["rollout", "promote", "discount", "1234"]) == OK
    capsys.readouterr()
    assert main(["history", "discount", "1234", "--json"]) == OK
    versions = json.loads(capsys.readouterr().out)["versions"]
    assert [(v["version"], v["active"], v["input_query"]["text"]) for v in versions] == [
        (2, True, narrower),
        (1, False, DISCOUNT_QUERY),
    ]
