"""The deploy stage: extension points, providers, deployments and rollbacks, backed by Redis."""

from registry._extension_points import ExtensionPoint, compile_validator
from registry._registry import Deployment, Provider, Registry

__all__ = ["Deployment", "ExtensionPoint", "Provider", "Registry", "compile_validator"]
