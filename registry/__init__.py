"""The deploy stage: extension points, providers, deployments and rollbacks, backed by Redis."""

from scriptpool.registry._bindings import DEFAULT_APP, BindingSet, Deployment
from scriptpool.registry._bounded_compile import start_compile_server
from scriptpool.registry._candidate import ABORTED, CANARY, PROMOTED, SHADOWING, Candidate, RolloutRules
from scriptpool.registry._compile import CompiledScript, compile_provider, compile_script
from scriptpool.registry._definitions import Definition, FieldChange
from scriptpool.registry._groups import Registries
from scriptpool.registry._providers import Provider
from scriptpool.registry._queries import build_input_schema, check_query, query_digest
from scriptpool.registry._registry import Registry
from scriptpool.registry._rollouts import CANDIDATE_ERROR, MATCH, MISMATCH, Rollouts, RolloutStatus, Tally
from scriptpool.registry._schemas import check_schema, compile_validator

__all__ = [
    "ABORTED",
    "CANARY",
    "CANDIDATE_ERROR",
    "DEFAULT_APP",
    "MATCH",
    "MISMATCH",
    "PROMOTED",
    "SHADOWING",
    "BindingSet",
    "Candidate",
    "CompiledScript",
    "Definition",
    "Deployment",
    "FieldChange",
    "Provider",
    "Registries",
    "Registry",
    "RolloutRules",
    "RolloutStatus",
    "Rollouts",
    "Tally",
    "build_input_schema",
    "check_query",
    "check_schema",
    "compile_provider",
    "compile_script",
    "compile_validator",
    "query_digest",
    "start_compile_server",
]
