"""A rollout's candidate: the version that runs beside the live one until it is promoted or
aborted, and the rules that decide which. Stored as JSON in the binding hash (``#candidate``),
so every call reads it in the same read as the live apps."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from scriptpool.config.errors import ConfigurationError

SHADOWING, CANARY, PROMOTED, ABORTED = "shadowing", "canary", "promoted", "aborted"


# A rollout's state lasts a week: more runs than this is a typo (and past 2**53 Lua counts inexactly).
MAX_RUNS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RolloutRules:
    """When a candidate is promoted, and when it is aborted.

    ``shadow_rate``: the share of live calls on which the worker also runs the candidate.
    ``promote_after``: compared runs before promotion (or before the canary), at a mismatch rate
    at most ``max_mismatch_rate`` and with no candidate error the live version did not have.
    ``canary_percent``: then that share of calls (by a hash of the input) is served by the
    candidate for ``canary_calls`` calls; if its error rate exceeds the live one's by more than
    ``max_error_increase``, the rollout aborts.
    """

    shadow_rate: float = 1.0
    promote_after: int = 100
    max_mismatch_rate: float = 0.0
    canary_percent: float = 0.0
    canary_calls: int = 100
    max_error_increase: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.shadow_rate <= 1.0:
            raise ConfigurationError(f"the shadow rate must lie in (0, 1], got {self.shadow_rate}")
        if not (1 <= self.promote_after <= MAX_RUNS and 1 <= self.canary_calls <= MAX_RUNS):
            raise ConfigurationError(
                f"promote-after and canary-calls must lie in [1, {MAX_RUNS:,}], "
                f"got {self.promote_after} and {self.canary_calls}"
            )
        if not 0.0 <= self.max_mismatch_rate < 1.0:
            raise ConfigurationError(
                f"the max mismatch rate must lie in [0, 1), got {self.max_mismatch_rate}"
            )
        if not 0.0 <= self.canary_percent <= 100.0:
            raise ConfigurationError(f"the canary percent must lie in [0, 100], got {self.canary_percent}")
        if not 0.0 <= self.max_error_increase <= 1.0:
            raise ConfigurationError(
                f"the max error increase must lie in [0, 1], got {self.max_error_increase}"
            )


@dataclass(frozen=True, slots=True)
class Candidate:
    """The candidate of one (EP, shop): which app it replaces, its deployment (as a deploy
    would bind it, version still 0), its rules and its state (shadowing or canary)."""

    id: str
    app: str
    deployment: dict[str, Any]
    rules: RolloutRules
    state: str
    started_at: float

    @property
    def input_query(self) -> str | None:
        """The candidate's input query (None: it gets the whole input); promotion binds it."""
        query = self.deployment.get("input_query")
        return query if isinstance(query, str) else None

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "app": self.app,
                "deployment": self.deployment,
                "rules": asdict(self.rules),
                "state": self.state,
                "started_at": self.started_at,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Candidate:
        data = json.loads(raw)
        providers = data["deployment"].get("providers") or []
        data["deployment"]["providers"] = [list(p) for p in providers] if providers else []
        query = data["deployment"].get("input_query")
        if query is not None and not isinstance(query, str):
            raise ConfigurationError(f"a candidate's input query is GraphQL text, got {type(query).__name__}")
        return cls(
            id=data["id"],
            app=data["app"],
            deployment=data["deployment"],
            rules=RolloutRules(**data["rules"]),
            state=data["state"],
            started_at=float(data["started_at"]),
        )

    def in_canary(self, stdin: bytes) -> bool:
        """Whether a call with this input is one the canary serves: the same input always is or
        is not (a retry gets the same version), and ``canary_percent`` of inputs are."""
        if self.state != CANARY or self.rules.canary_percent <= 0:
            return False
        # Keyed by the rollout, so each rollout's canary takes its own share of inputs.
        digest = hashlib.blake2b(stdin, digest_size=8, key=self.id.encode()[:64]).digest()
        bucket = int.from_bytes(digest, "little") % 10_000
        return bucket < self.rules.canary_percent * 100
