"""Script data: the scopes, the limits, the invalidation message and the one atomic write.

Three scopes of data, each a map of keys to JSON values (README, "Script data and sessions"):

* ``APP``: an app's data for every shop (``Keys.data_app``). Every shard group's Redis holds it,
  as extension points are; partners write it (``scriptpool data set``, ``DataStore``).
* ``SHOP``: an app's data for one shop (``Keys.data_shop``), in the shop's group. Partners and
  scripts (``storeWrites``) write it.
* ``SESSION``: one shop's session for one app (``Keys.data_session``: the token is hashed into the
  key, so any token string is safe and none is stored). Scripts write it; it expires
  ``session_ttl_s`` after its last write.

Limits (constants: an extension point cannot change them): a key is 1..``MAX_KEY_CHARS``
printable characters; a value is JSON, minified to at most ``MAX_VALUE_BYTES`` and nested at
most ``MAX_VALUE_DEPTH`` deep; a scope (one hash) holds at most ``MAX_KEYS_PER_SCOPE`` keys; the
SHOP and live SESSION data of one shop, every app's together, hold at most
``MAX_BYTES_PER_SHOP`` (each entry counts its key's UTF-8 bytes, its value's and
``ENTRY_OVERHEAD_BYTES``; each live session ``SESSION_OVERHEAD_BYTES`` more); a run returns at most
``MAX_WRITES_PER_RUN`` writes. Passing any is :class:`StoreLimitExceeded` naming the limit.

Every write goes through :func:`apply_writes`: one Lua script, so a call's writes are applied all
or none, and the caps on keys and bytes are checked where the writes happen (two writers cannot
race past them). It publishes one invalidation per call, listing every key written, on
``Keys.invalidations()`` (the channel bindings use, so one subscription and its
forget-all-on-resubscribe cover both): ``{"data": 1, "app": A, "shop_id": S or null, "session":
DIGEST or null, "keys": [[SCOPE, KEY], ...]}``. One message per call rather than per key: every
worker of the group decodes every message on one thread, and a burst of one per key (a run
writes up to 64) overflowed Redis's output buffer for the subscriber, which then forgot
everything; a call's message stays bounded (at most ``MAX_WRITES_PER_RUN`` keys).

Expired sessions: Redis drops a session when its TTL passes without telling anyone, so each shop
keeps its sessions' expiry times and sizes (``Keys.data_sessions``, ``Keys.data_session_sizes``);
the shop's next write gives an expired session's bytes back to its counter (``Keys.data_bytes``)
before checking the cap. Until then ``status`` may count bytes a session no longer holds.
"""

from __future__ import annotations

from scriptpool.config.store._apply import (
    Refusal,
    Write,
    apply_writes,
    hash_sizes,
    recount_shop,
    scope_hash,
)
from scriptpool.config.store._limits import (
    APP,
    DEFAULT_SESSION_TTL_S,
    ENTRY_OVERHEAD_BYTES,
    MAX_BYTES_PER_SHOP,
    MAX_KEY_CHARS,
    MAX_KEYS_PER_SCOPE,
    MAX_SESSION_TOKEN_CHARS,
    MAX_SESSION_TTL_S,
    MAX_VALUE_BYTES,
    MAX_VALUE_DEPTH,
    MAX_WRITES_PER_RUN,
    MIN_SESSION_TTL_S,
    SCOPES,
    SCRIPT_SCOPES,
    SESSION,
    SESSION_OVERHEAD_BYTES,
    SHOP,
    check_key,
    check_scope,
    check_session_token,
    check_session_ttl,
    decode_value,
    encode_value,
    entry_bytes,
)
from scriptpool.config.store._messages import (
    DataInvalidation,
    invalidation_message,
    parse_invalidation,
)
from scriptpool.config.store._sizes import (
    DataSizes,
    data_sizes,
)

__all__ = [
    "APP",
    "DEFAULT_SESSION_TTL_S",
    "ENTRY_OVERHEAD_BYTES",
    "MAX_BYTES_PER_SHOP",
    "MAX_KEYS_PER_SCOPE",
    "MAX_KEY_CHARS",
    "MAX_SESSION_TOKEN_CHARS",
    "MAX_SESSION_TTL_S",
    "MAX_VALUE_BYTES",
    "MAX_VALUE_DEPTH",
    "MAX_WRITES_PER_RUN",
    "MIN_SESSION_TTL_S",
    "SCOPES",
    "SCRIPT_SCOPES",
    "SESSION",
    "SESSION_OVERHEAD_BYTES",
    "SHOP",
    "DataInvalidation",
    "DataSizes",
    "Refusal",
    "Write",
    "apply_writes",
    "check_key",
    "check_scope",
    "check_session_token",
    "check_session_ttl",
    "data_sizes",
    "decode_value",
    "encode_value",
    "entry_bytes",
    "hash_sizes",
    "invalidation_message",
    "parse_invalidation",
    "recount_shop",
    "scope_hash",
]
