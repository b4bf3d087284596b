"""The deploy stage: extension points, providers, deployments and rollbacks, backed by Redis."""

from registry._groups import Registries
from registry._registry import Deployment, Provider, Registry
from registry._schemas import check_schema, compile_validator

__all__ = ["Deployment", "Provider", "Registries", "Registry", "check_schema", "compile_validator"]
