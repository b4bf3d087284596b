"""The one table of ``SCRIPTPOOL_*`` variables: ``Settings.from_env``, ``to_env`` and the README's
configuration table all come from it, so a variable is spelled once.

Public as ``scriptpool.config.environment`` rather than names of ``scriptpool.config``: only the
command-line tool (``config check``), the README generator and tests read the table itself;
everyone else reads :class:`~scriptpool.config.Settings`. It offers :data:`VARIABLES`,
:class:`Variable`, :func:`unknown_variables` and :func:`markdown_table`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scriptpool.config.errors import ConfigurationError

__all__ = ["VARIABLES", "Variable", "markdown_table", "unknown_variables"]


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: the setting it fills and how its text becomes the value.

    ``field`` is a :class:`~scriptpool.config.Settings` attribute, or ``limits.<name>`` for a default limit.
    ``scale`` converts units: the variable's number times ``scale`` is the field's value.
    ``auto``: the text ``auto`` means None, which the setting resolves itself (``auto`` says how,
    for the README).
    """

    name: str
    field: str
    kind: type
    doc: str
    scale: int = 1
    unit: str = ""
    auto: str = ""

    def parse(self, text: str) -> Any:
        """The field's value for the variable's text; a malformed one names the variable."""
        if self.auto and text.strip().lower() == "auto":
            return None
        if self.kind is str:
            return text
        if self.kind is bool:
            word = text.strip().lower()
            if word not in _BOOLEANS:
                raise ConfigurationError(
                    f"{self.name} must be 1 or 0 (on/off, true/false), got {text!r}", variable=self.name
                )
            return _BOOLEANS[word]
        if self.kind is bytes:
            return text.encode()
        try:
            number = self.kind(text.strip())
        except ValueError:
            kind = "an integer" if self.kind is int else "a number"
            if self.auto:
                kind += " or auto"
            raise ConfigurationError(
                f"{self.name} must be {kind}, got {text!r}", variable=self.name
            ) from None
        return number * self.scale

    def render(self, value: Any) -> str:
        """The variable's text for a field value (the inverse of :meth:`parse`)."""
        if value is None and self.auto:
            return "auto"
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, bool):
            return "1" if value else "0"
        if self.scale != 1:
            return str(value // self.scale)
        return str(value)


_BOOLEANS = {
    "1": True,
    "on": True,
    "true": True,
    "yes": True,
    "0": False,
    "off": False,
    "false": False,
    "no": False,
}

_LIMIT_DOCS = {
    "fuel": ("instructions (wasmtime fuel) a run may execute", ""),
    "memory_bytes": ("linear memory per memory of a run", "bytes"),
    "stack_bytes": ("Wasm stack", "bytes"),
    "input_bytes": ("input size", "bytes"),
    "output_bytes": ("output size", "bytes"),
    "log_bytes": ("logs kept before truncation", "bytes"),
    "module_bytes": ("module size accepted at deploy", "bytes"),
    "wall_ms": ("wall-clock time per run", "ms"),
}

VARIABLES: tuple[Variable, ...] = (
    Variable(
        "SCRIPTPOOL_REDIS_URL",
        "redis_url",
        str,
        "Redis URL: `redis://`, `rediss://` for TLS, password in the URL; "
        "`sentinel://[:password@]h1:26379,h2:26379,h3:26379/MASTER/DB` for a Sentinel set "
        "(options in README, Scaling out)",
    ),
    Variable(
        "SCRIPTPOOL_SHARD_GROUPS",
        "shard_groups",
        str,
        "shards per Redis, `0-7=URL;8-15=URL` (each URL as above); every process must agree. "
        "Empty: every shard on `SCRIPTPOOL_REDIS_URL`",
    ),
    Variable(
        "SCRIPTPOOL_DEPLOY_REPLICAS",
        "deploy_replicas",
        int,
        "replicas that must have a deploy, rollback or definition before it is acknowledged "
        "(`WAIT`); `auto`: 1 on a `sentinel://` URL, 0 on a direct one",
        auto="1 on sentinel://, 0 otherwise",
    ),
    Variable(
        "SCRIPTPOOL_DEPLOY_WAIT_MS",
        "deploy_wait_ms",
        int,
        "how long a deploy waits for those replicas before failing with `not_replicated`",
        unit="ms",
    ),
    Variable(
        "SCRIPTPOOL_ARTIFACT_KEY",
        "artifact_key",
        bytes,
        "HMAC key that signs AOT artifacts: 32+ random bytes (`scriptpool key generate`), never a "
        "published one; needed to deploy and by workers, not by `run` or `Client`",
    ),
    Variable(
        "SCRIPTPOOL_ARTIFACT_KEY_FILE",
        "artifact_key_file",
        str,
        "file holding the artifact key instead (`scriptpool key generate --file PATH` writes one; "
        "whitespace around it is ignored); set this or `SCRIPTPOOL_ARTIFACT_KEY`, not both",
    ),
    Variable("SCRIPTPOOL_SHARDS", "shards", int, "number of shards, 1 to 4,096; every process must agree"),
    Variable("SCRIPTPOOL_KEY_PREFIX", "key_prefix", str, "prefix of every Redis key and queue"),
    Variable(
        "SCRIPTPOOL_DEADLINE_MS",
        "default_deadline_ms",
        int,
        "default caller deadline, up to 600,000",
        unit="ms",
    ),
    Variable(
        "SCRIPTPOOL_MODULE_CACHE_MB",
        "module_cache_bytes",
        int,
        "compiled-module cache per worker process",
        scale=2**20,
        unit="MiB",
    ),
    Variable(
        "SCRIPTPOOL_PROVIDER_MAX_KB",
        "provider_max_bytes",
        int,
        "size cap of provider modules",
        scale=1024,
        unit="KiB",
    ),
    Variable(
        "SCRIPTPOOL_INPUT_VALIDATION_RATE",
        "input_validation_rate",
        float,
        "share of inputs validated against the EP's input schema",
    ),
    Variable(
        "SCRIPTPOOL_EPOCH_TICK_MS",
        "epoch_tick_ms",
        int,
        "epoch ticker period: the wall-clock limit's granularity, 1 to 1,000",
        unit="ms",
    ),
    Variable(
        "SCRIPTPOOL_BINDING_CACHE_TTL_S",
        "binding_cache_ttl_s",
        float,
        "backstop expiry of cached bindings and EPs besides pub/sub",
        unit="s",
    ),
    Variable(
        "SCRIPTPOOL_JOIN_THREADS",
        "join_threads",
        int,
        "threads a worker runs a join's scripts on, 1 to 64 (1: one after another; see BENCHMARKS.md)",
    ),
    Variable(
        "SCRIPTPOOL_METRICS_PORT",
        "metrics_port",
        int,
        "worker Prometheus /metrics port (0: off); a worker refuses to start if it cannot open it",
    ),
    Variable(
        "SCRIPTPOOL_CAPTURE",
        "capture",
        bool,
        "workers capture failed runs (and each EP's sampled share of successful ones) for `runs` "
        "and `replay`; 0 turns capture off",
    ),
    Variable(
        "SCRIPTPOOL_CAPTURE_PER_SHOP",
        "capture_per_shop",
        int,
        "captured runs kept per shop, the oldest evicted first",
    ),
    Variable(
        "SCRIPTPOOL_CAPTURE_MAX_KB",
        "capture_max_bytes",
        int,
        "bytes all captured runs may take in Redis, the oldest evicted first",
        scale=1024,
        unit="KiB",
    ),
    Variable(
        "SCRIPTPOOL_CAPTURE_TTL_S",
        "capture_ttl_s",
        int,
        "how long a captured run (input, output and logs) is kept",
        unit="s",
    ),
    Variable(
        "SCRIPTPOOL_USAGE_RETENTION_S",
        "usage_retention_s",
        int,
        "how long per-minute usage counts (`scriptpool usage`) are kept, 60 to 31,622,400",
        unit="s",
    ),
    Variable(
        "SCRIPTPOOL_USAGE_FLUSH_S",
        "usage_flush_s",
        float,
        "how often a worker sends its usage counts to Redis, 0.1 to 60: what a SIGKILLed worker "
        "loses at most",
        unit="s",
    ),
    Variable(
        "SCRIPTPOOL_TRACE_FAILURES",
        "trace_failures",
        bool,
        "a worker that traces (README, Traces) records a failed run's spans even when the caller "
        "did not sample the call",
    ),
    *(
        Variable(
            f"SCRIPTPOOL_LIMIT_{name.upper()}", f"limits.{name}", int, f"default limit: {doc}", unit=unit
        )
        for name, (doc, unit) in _LIMIT_DOCS.items()
    ),
)

BY_NAME: dict[str, Variable] = {variable.name: variable for variable in VARIABLES}
BY_FIELD: dict[str, Variable] = {variable.field: variable for variable in VARIABLES}


def read(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings fields and default-limit fields set in ``environ``: (settings, limits)."""
    fields: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for variable in VARIABLES:
        if variable.name in environ:
            value = variable.parse(environ[variable.name])
            if variable.field.startswith("limits."):
                limits[variable.field.removeprefix("limits.")] = value
            else:
                fields[variable.field] = value
    return fields, limits


# Names of our own tooling, not settings: the test suite's Redis, the compose check's options.
_NOT_SETTINGS = ("SCRIPTPOOL_TEST_", "SCRIPTPOOL_COMPOSE_")


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``SCRIPTPOOL_*`` variables in ``environ`` that are no setting (a typo is otherwise silently
    ignored), each with the setting it most resembles, if any."""
    prefix = "SCRIPTPOOL_"
    known = [variable.name.removeprefix(prefix) for variable in VARIABLES]
    found = []
    for name in sorted(environ):
        rest = name.removeprefix(prefix)
        if rest != name and rest not in known and not name.startswith(_NOT_SETTINGS):
            close = difflib.get_close_matches(rest, known, n=1, cutoff=0.7)  # the prefix matches all
            found.append((name, prefix + close[0] if close else None))
    return found


def markdown_table(defaults: Mapping[str, Any]) -> str:
    """The README's configuration table, defaults taken from ``defaults`` (field -> value)."""
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    for variable in VARIABLES:
        default = defaults[variable.field]
        if variable.kind is bytes:
            shown = "none"
        elif default is None and variable.auto:
            shown = f"auto ({variable.auto})"
        elif default == "":
            shown = "empty"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, int) and not isinstance(default, bool):
            shown = f"{default // variable.scale:,}"
        else:
            shown = str(default)
        unit = f" {variable.unit}" if variable.unit and variable.kind is not bytes else ""
        lines.append(f"| `{variable.name}` | {variable.doc} | {shown}{unit} |")
    return "\n".join(lines)
