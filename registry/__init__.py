"""The deploy stage: extension points, providers, deployments and rollbacks, backed by Redis."""

from registry._bindings import DEFAULT_APP, BindingSet, Deployment
from registry._compile import CompiledScript, compile_provider, compile_script
from registry._registry import Provider, Registry
from registry._schemas import check_schema, compile_validator

__all__ = [
    "DEFAULT_APP",
    "BindingSet",
    "CompiledScript",
    "Deployment",
    "Provider",
    "Registry",
    "check_schema",
    "compile_provider",
    "compile_script",
    "compile_validator",
]
