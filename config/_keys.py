"""Every Redis key, channel and queue name the project uses, and how long each lives, in one place."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds Redis key names under one prefix, so deployments can share a Redis safely."""

    prefix: str = "sp"

    # The Celery task every job message names (not prefixed: it is a name inside the message).
    TASK: ClassVar[str] = "scriptpool.execute"
    # Replies that nobody collects (the caller died) expire after this long.
    REPLY_TTL_S: ClassVar[int] = 60
    # A worker refreshes its heartbeat every HEARTBEAT_S; it expires HEARTBEAT_TTL_S after the last.
    HEARTBEAT_S: ClassVar[float] = 2.0
    HEARTBEAT_TTL_S: ClassVar[int] = 10
    # Earlier deployments kept per (EP, shop) for rollback.
    HISTORY_DEPTH: ClassVar[int] = 20
    # A rollout's state outlives its end by this long, for `rollout status`; its mismatch
    # samples (at most ROLLOUT_SAMPLES) expire this long after the last one.
    ROLLOUT_RETENTION_S: ClassVar[int] = 7 * 24 * 3600
    ROLLOUT_SAMPLES: ClassVar[int] = 20
    ROLLOUT_SAMPLES_TTL_S: ClassVar[int] = 24 * 3600

    # -- registry ------------------------------------------------------------------------------
    def module(self, sha256: str) -> str:
        """Wasm bytes, content-addressed."""
        return f"{self.prefix}:module:{sha256}"

    def artifact(self, fingerprint: str, sha256: str) -> str:
        """A signed AOT artifact of one module for one engine fingerprint."""
        return f"{self.prefix}:artifact:{fingerprint}:{sha256}"

    def binding(self, ep: str, shop_id: str) -> str:
        """The current deployments of (EP, shop): a hash of app -> deployment JSON, read whole
        in one step, so a reader never sees a mix."""
        return f"{self.prefix}:binding:{ep}:{shop_id}"

    def history(self, ep: str, shop_id: str, app: str = "default") -> str:
        """Earlier deployments of one app at (EP, shop), newest first, for rollback. The default
        app keeps the key it had before apps existed; '#' appears in no EP, shop or app name."""
        base = f"{self.prefix}:history:{ep}:{shop_id}"
        return base if app == "default" else f"{base}#{app}"

    def rollout(self, ep: str, shop_id: str) -> str:
        """A rollout's state and counts at (EP, shop) (a hash; kept a while after it ends)."""
        return f"{self.prefix}:rollout:{ep}:{shop_id}"

    def rollouts_under_way(self) -> str:
        """The rollouts still shadowing or in their canary (a set of ``EP/shop``)."""
        return f"{self.prefix}:rollouts"

    def rollout_samples(self, ep: str, shop_id: str) -> str:
        """Inputs on which a rollout's candidate and the live version disagreed (a list, capped,
        expiring)."""
        return f"{self.prefix}:rollout-samples:{ep}:{shop_id}"

    def extension_point(self, ep: str) -> str:
        """An extension point's definition: limit overrides and schemas."""
        return f"{self.prefix}:ep:{ep}"

    def extension_points(self) -> str:
        """The set of defined extension point names."""
        return f"{self.prefix}:eps"

    def provider(self, name: str) -> str:
        """An installed provider module, by import-module name."""
        return f"{self.prefix}:provider:{name}"

    def providers(self) -> str:
        """The set of installed provider names."""
        return f"{self.prefix}:providers"

    def artifacts_pattern(self, sha256: str) -> str:
        """SCAN pattern matching the artifacts of one module, for every engine fingerprint."""
        return f"{self.prefix}:artifact:*:{sha256}"

    # -- script data (config/store.py) -----------------------------------------------------
    def data_app(self, app: str) -> str:
        """An app's data for every shop (scope APP): a hash of key -> JSON text. Not a shop's key:
        every shard group's Redis holds it, as extension points are."""
        return f"{self.prefix}:data-app:{app}"

    def data_shop(self, app: str, shop_id: str) -> str:
        """An app's data for one shop (scope SHOP): a hash of key -> JSON text."""
        return f"{self.prefix}:data-shop:{app}:{shop_id}"

    @staticmethod
    def session_digest(token: str) -> str:
        """What stands for a session token in key names and messages: any token string (colons,
        spaces, megabytes) becomes 32 hex digits, and the token itself is never stored."""
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def data_session(self, app: str, shop_id: str, token: str) -> str:
        """One shop's session for one app (scope SESSION): a hash of key -> JSON text that expires
        (its TTL is set again by every write)."""
        return self.data_session_of_digest(app, shop_id, self.session_digest(token))

    def data_session_of_digest(self, app: str, shop_id: str, digest: str) -> str:
        """:meth:`data_session` from the token's digest (what invalidation messages carry)."""
        return f"{self.prefix}:data-session:{app}:{digest}:{shop_id}"

    def data_bytes(self, shop_id: str) -> str:
        """A counter: the bytes (keys and values) a shop's SHOP and live SESSION data hold, every
        app's together (what ``MAX_BYTES_PER_SHOP`` bounds)."""
        return f"{self.prefix}:data-bytes:{shop_id}"

    def data_sessions(self, shop_id: str) -> str:
        """A shop's sessions (their key names), scored by when each expires (ms): a session that
        expired gives its bytes back to :meth:`data_bytes` at the shop's next write."""
        return f"{self.prefix}:data-sessions:{shop_id}"

    def data_session_sizes(self, shop_id: str) -> str:
        """A hash of a shop's session key name -> the bytes that session holds (what an expired
        session gives back; Redis drops the session itself without telling anyone)."""
        return f"{self.prefix}:data-session-sizes:{shop_id}"

    def data_app_pattern(self) -> str:
        """SCAN pattern matching every app's APP data."""
        return f"{self.prefix}:data-app:*"

    # -- quotas (config/quotas.py) ------------------------------------------------------------
    def quotas(self, shop_id: str) -> str:
        """A shop's quotas: a hash of target -> quota JSON, the field "" the shop-wide quota and
        any other field an app's quota within the shop."""
        return f"{self.prefix}:quota:{shop_id}"

    def quota_shops(self) -> str:
        """The set of shops that have a quota (what ``quota show`` and ``status`` list, without
        SCAN); rebuilt by a shard copy for the shops it moves."""
        return f"{self.prefix}:quota-shops"

    def quota_in_flight(self, shop_id: str, app: str = "") -> str:
        """The jobs holding a concurrency slot of a target (the shop: ``app`` "", or one app of
        it), scored by their deadline. Transient: never moved with the shop. '#' appears in no
        shop or app name."""
        return f"{self.prefix}:quota-inflight:{shop_id}" + (f"#{app}" if app else "")

    def quota_bucket(self, shop_id: str, app: str = "") -> str:
        """A target's instruction bucket: a hash of ``tokens`` and ``at`` (when last refilled).
        Transient: a shop that changes group starts with a full bucket."""
        return f"{self.prefix}:quota-bucket:{shop_id}" + (f"#{app}" if app else "")

    # -- what belongs to one shop (moves with it when its shard changes group) ---------------
    # Keep these in step with the per-shop keys above: `scriptpool shard move` copies exactly the
    # keys they match, and a per-shop key they miss would be left behind in the old group.
    # Kinds named <kind>:<EP or app>:<shop>, except data-session (<app>:<digest>:<shop>).
    _SHOP_KINDS: ClassVar[tuple[str, ...]] = (
        "binding",
        "history",
        "rollout",
        "rollout-samples",
        "data-shop",
        "data-session",
    )
    # Kinds named <kind>:<shop>: a shop's data bookkeeping, and its quotas.
    _SHOP_ONLY_KINDS: ClassVar[tuple[str, ...]] = (
        "data-bytes",
        "data-sessions",
        "data-session-sizes",
        "quota",
    )
    _DATA_KINDS: ClassVar[frozenset[str]] = frozenset(
        {"data-shop", "data-session", "data-bytes", "data-sessions", "data-session-sizes"}
    )

    def shop_key_patterns(self, shop_id: str = "*") -> tuple[str, ...]:
        """SCAN patterns matching every key of ``shop_id`` (``*``: of every shop): its bindings,
        their apps' history, its rollouts' state and samples, its SHOP and SESSION data with
        their byte counts, and its quotas. Transient keys (deploy locks, quota slots and
        buckets), the sets of rollouts under way and of shops with quotas (rebuilt by the copy)
        and APP data (every group's) are not among them."""
        patterns = [f"{self.prefix}:{kind}:*:{shop_id}" for kind in self._SHOP_KINDS]
        patterns += [f"{self.prefix}:{kind}:{shop_id}" for kind in self._SHOP_ONLY_KINDS]
        return (*patterns, f"{self.prefix}:history:*:{shop_id}#*")

    def shop_of_key(self, key: str) -> str | None:
        """The shop a key matched by :meth:`shop_key_patterns` belongs to (None: not such a key)."""
        parsed = self._parse_shop_key(key)
        return parsed[2] if parsed else None

    def binding_of_key(self, key: str) -> str | None:
        """The binding a key matched by :meth:`shop_key_patterns` goes with: its history and its
        rollout's keys change with it, and move with it (None for data, which goes with none)."""
        parsed = self._parse_shop_key(key)
        if parsed is None or parsed[0] in self._DATA_KINDS or parsed[0] == "quota":
            return None
        return self.binding(parsed[1], parsed[2])

    def is_data(self, key: str) -> bool:
        """Whether ``key`` (one of :meth:`shop_key_patterns`) is a shop's data or its bookkeeping."""
        parsed = self._parse_shop_key(key)
        return parsed is not None and parsed[0] in self._DATA_KINDS

    def is_quota(self, key: str) -> bool:
        """Whether ``key`` (one of :meth:`shop_key_patterns`) is a shop's quotas."""
        parsed = self._parse_shop_key(key)
        return parsed is not None and parsed[0] == "quota"

    def is_binding(self, key: str) -> bool:
        """Whether ``key`` (one of :meth:`shop_key_patterns`) is a current binding."""
        return key.startswith(f"{self.prefix}:binding:")

    def _parse_shop_key(self, key: str) -> tuple[str, str, str] | None:
        """(kind, EP or app, shop) of a per-shop key ("" for the kinds named by their shop only)."""
        for kind in self._SHOP_ONLY_KINDS:
            head = f"{self.prefix}:{kind}:"
            if key.startswith(head) and (shop := key[len(head) :]) and ":" not in shop:
                return kind, "", shop
        for kind in self._SHOP_KINDS:
            head = f"{self.prefix}:{kind}:"
            if not key.startswith(head):
                continue
            rest = key[len(head) :]
            if kind == "data-session":  # <app>:<digest>:<shop>
                app, _, rest = rest.partition(":")
                digest, colon, shop = rest.partition(":")
                if app and digest and colon and shop and ":" not in shop:
                    return kind, app, shop
                continue
            ep, colon, shop = rest.partition(":")
            if kind == "history":
                shop = shop.partition("#")[0]  # an app's history: <shop>#<app>
            if colon and ep and shop and ":" not in shop:
                return kind, ep, shop
        return None

    def deploy_lock(self, ep: str, shop_id: str) -> str:
        """Serialises deploys and rollbacks of one (EP, shop)."""
        return f"{self.prefix}:lock:{ep}:{shop_id}"

    # -- usage accounting (config/usage.py, workers/_usage.py) ------------------------------
    # Not among shop_key_patterns: a worker counts into its own group's Redis, `usage` sums every
    # group's, so counts left in the old group by a shard move still add up (a copy would double them).
    def usage(self, shop_id: str, minute: int) -> str:
        """One shop's usage in one minute (``minute`` = Unix time // 60): a hash of
        ``app|EP|metric`` -> count (``scriptpool.config.usage``), expiring after the retention."""
        return f"{self.prefix}:usage:{shop_id}:{minute}"

    def usage_shops(self, minute: int) -> str:
        """The shops with usage in one minute (a set), so reading every shop needs no SCAN."""
        return f"{self.prefix}:usage-shops:{minute}"

    # -- pool ----------------------------------------------------------------------------------
    def queue(self, shard: int) -> str:
        """The Celery queue (a Redis list) that shard ``shard``'s workers consume."""
        return f"{self.prefix}.shard.{shard}"

    def shard_of_queue(self, queue: str) -> int | None:
        """The shard number of a queue name, or None if it is not one of ours."""
        head, _, number = queue.rpartition(".")
        if head != f"{self.prefix}.shard" or not number.isdigit():
            return None
        return int(number)

    def worker(self, name: str) -> str:
        """A live worker's heartbeat (JSON, expires when the worker stops refreshing it)."""
        return f"{self.prefix}:worker:{name}"

    def workers_pattern(self) -> str:
        """SCAN pattern matching every worker heartbeat."""
        return f"{self.prefix}:worker:*"

    def replies(self, client_id: str) -> str:
        """The list a worker pushes replies onto for one client process; it expires when idle."""
        return f"{self.prefix}:reply:{client_id}"

    def invalidations(self) -> str:
        """Pub/sub channel on which deploys and rollbacks announce changed bindings, and data
        writes changed data (messages with a ``data`` field: ``scriptpool.config.store``)."""
        return f"{self.prefix}:invalidate"

    # -- captured runs (workers/_capture.py) --------------------------------------------------
    def run(self, run_id: str) -> str:
        """One captured run (MessagePack), expiring with the capture TTL."""
        return f"{self.prefix}:run:{run_id}"

    def runs(self) -> str:
        """Every captured run's id, scored by capture time (ms): the order eviction follows."""
        return f"{self.prefix}:runs"

    def runs_expiry(self) -> str:
        """Every captured run's id, scored by when it expires (ms)."""
        return f"{self.prefix}:runs:expiry"

    def runs_summary(self) -> str:
        """A hash of run id -> what ``runs list`` shows (JSON: EP, shop, app, status, sizes)."""
        return f"{self.prefix}:runs:summary"

    def runs_bytes(self) -> str:
        """The bytes every captured run takes, summed (what the byte cap bounds)."""
        return f"{self.prefix}:runs:bytes"

    def runs_of_shop(self, shop_id: str) -> str:
        """One shop's captured runs, scored by capture time (what the per-shop cap bounds)."""
        return f"{self.prefix}:runs:shop:{shop_id}"
