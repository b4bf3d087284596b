"""The deploy stage: extension points, providers, deployments and rollbacks, backed by Redis."""

from registry._bindings import DEFAULT_APP, BindingSet, Deployment
from registry._registry import Provider, Registry
from registry._schemas import check_schema, compile_validator

__all__ = [
    "DEFAULT_APP",
    "BindingSet",
    "Deployment",
    "Provider",
    "Registry",
    "check_schema",
    "compile_validator",
]
