"""The commands on the registry: ``deploy``, ``undeploy``, ``rollback`` and ``history``
(``_deploy_commands``), ``providers`` (``_provider_commands``) and ``ep`` (``_ep_commands``).

The command line (``_cli.COMMANDS``) builds their parsers from here, in this order (the order of
``--help``); the registries they open come from ``_registries``.
"""

from __future__ import annotations

from typing import Any

from scriptpool.cli import _deploy_commands, _ep_commands, _provider_commands


def add_parsers(sub: Any) -> None:
    """The parsers of every registry command."""
    _deploy_commands.add_parsers(sub)
    _provider_commands.add_parsers(sub)
    _ep_commands.add_parsers(sub)
