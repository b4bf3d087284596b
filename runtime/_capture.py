"""Captured runs: a worker records every failed script run, and a sampled share of successful
ones (the EP's ``capture_rate``), after the reply has gone out, so ``scriptpool runs`` can list
them and ``scriptpool replay`` can run them again.

The store, in the deployment's Redis (``scriptpool.config.Keys``):

* ``run:<id>``: the record (MessagePack of :class:`scriptpool.runtime.CapturedRun`), expiring after the TTL;
* ``runs``: every id scored by capture time (µs), the order eviction follows;
* ``runs:expiry``: every id scored by when it expires;
* ``runs:summary``: id -> what a listing shows (JSON, no input, output or logs);
* ``runs:bytes``: the bytes every record and summary take, summed;
* ``runs:shop:<shop>``: one shop's ids by capture time.

Each record is written by one Lua script, together with its index entries and whatever it
evicts, so a worker killed mid-capture leaves the record whole or absent, never half of it
(Redis runs a command only once it has all of it). The script first drops what has expired,
then the shop's oldest runs past the per-shop cap, then the oldest runs anywhere while the byte
cap is exceeded; every index key takes the TTL again, so when captures stop, everything is gone
a TTL after the last. Readers skip whatever they cannot read.

The writing side, the worker's capture thread, is ``scriptpool.runtime._writer``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from scriptpool.config import Settings, check_shop_id
from scriptpool.config.errors import InvalidArgument, RunNotFound, ScriptpoolError
from scriptpool.engine import CODEC_MSGPACK
from scriptpool.runtime._captured import CapturedRun
from scriptpool.runtime._script import decode_output

_RUN_ID = re.compile(r"[0-9a-f]{16}")

# Drop one run everywhere: its record, index entries, summary and bytes.
_DROP = """
local function drop(id)
  local summary = redis.call('HGET', KEYS[3], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('DEL', ARGV[1] .. id)
  if summary then
    local ok, meta = pcall(cjson.decode, summary)
    if ok and type(meta) == 'table' then
      if tonumber(meta['bytes']) then redis.call('DECRBY', KEYS[4], tonumber(meta['bytes'])) end
      if type(meta['shop']) == 'string' then redis.call('ZREM', ARGV[2] .. meta['shop'], id) end
    end
  end
end
"""

# KEYS: runs, runs:expiry, runs:summary, runs:bytes, runs:shop:<shop>, run:<id>
# ARGV: run key prefix, shop index prefix, id, record, summary, now (µs), ttl (ms), per-shop cap,
#       byte cap, size
WRITE_SCRIPT = (
    _DROP
    + """
local now, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do drop(id) end
redis.call('SET', KEYS[6], ARGV[4], 'PX', ttl)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl * 1000, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
redis.call('INCRBY', KEYS[4], tonumber(ARGV[10]))
redis.call('ZADD', KEYS[5], now, ARGV[3])
local evicted = 0
local over = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[8])
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, over - 1)) do
    drop(id)
    redis.call('ZREM', KEYS[5], id)
    evicted = evicted + 1
  end
end
while tonumber(redis.call('GET', KEYS[4]) or '0') > tonumber(ARGV[9]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then
    redis.call('SET', KEYS[4], 0)
    break
  end
  drop(oldest[1])
  evicted = evicted + 1
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ttl) end
return evicted
"""
)

# KEYS: runs, runs:expiry, runs:summary, runs:bytes, and optionally runs:shop:<shop> (every run
# in it is dropped, then the key); ARGV: run key prefix, shop index prefix, then ids to drop.
_FORGET = (
    _DROP
    + """
local dropped = 0
for i = 3, #ARGV do drop(ARGV[i]); dropped = dropped + 1 end
if KEYS[5] then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do drop(id); dropped = dropped + 1 end
  redis.call('DEL', KEYS[5])
end
return dropped
"""
)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One line of ``scriptpool runs list``."""

    id: str
    captured_at: float
    ep: str
    shop_id: str
    app: str
    version: int
    status: str
    error_code: str | None
    instructions: int
    input_bytes: int
    size: int  # what the record and its summary take in Redis
    expires_at: float

    @classmethod
    def from_json(cls, raw: bytes | str) -> RunSummary:
        data = json.loads(raw)
        return cls(
            id=str(data["id"]),
            captured_at=float(data["at"]),
            ep=str(data["ep"]),
            shop_id=str(data["shop"]),
            app=str(data["app"]),
            version=int(data["version"]),
            status=str(data["status"]),
            error_code=None if data.get("code") is None else str(data["code"]),
            instructions=int(data["instructions"]),
            input_bytes=int(data["input_bytes"]),
            size=int(data["bytes"]),
            expires_at=float(data["expires_at"]),
        )


# What a record read back from Redis may raise when decoded: anyone with write access may have put
# anything there (``int(inf)`` is an OverflowError, deep nesting a RecursionError).
_UNREADABLE = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    ArithmeticError,
    RecursionError,
    msgpack.UnpackException,
)


def valid_run_id(run_id: object) -> str:
    """``run_id`` if it is one (16 hex digits), else :class:`InvalidArgument`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InvalidArgument(f"invalid run id {run_id!r}: 16 hex digits, as `runs list` shows them")
    return run_id


class CaptureStore:
    """Writes and reads captured runs in Redis, within the bounds ``settings`` give."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self._keys = settings.keys
        self._write = client.register_script(WRITE_SCRIPT)
        self._forget = client.register_script(_FORGET)
        self._prefixes = [self._keys.run(""), self._keys.runs_of_shop("")]
        self._indexes = [
            self._keys.runs(),
            self._keys.runs_expiry(),
            self._keys.runs_summary(),
            self._keys.runs_bytes(),
        ]

    def write(self, run: CapturedRun) -> int | None:
        """Store ``run``, evicting what the bounds say; how many runs were evicted, or None when
        the run alone is larger than the byte cap (it is not stored)."""
        command = self.write_command(run)
        if command is None:
            return None
        keys, args = command
        return int(self._write(keys=keys, args=args))

    def write_command(self, run: CapturedRun) -> tuple[list[str], list[bytes | str | int]] | None:
        """The keys and arguments of the write script for ``run`` (None: larger than the cap)."""
        record = msgpack.packb(run.to_wire(), use_bin_type=True)
        ttl_ms = self._settings.capture_ttl_s * 1000
        summary = run.summary(0, run.captured_at + self._settings.capture_ttl_s)
        size = len(record) + len(json.dumps(summary)) + 16  # the size field's own digits, at most
        summary["bytes"] = size
        if size > self._settings.capture_max_bytes:
            return None
        keys = [*self._indexes, self._keys.runs_of_shop(run.shop_id), self._keys.run(run.id)]
        args: list[bytes | str | int] = [
            *self._prefixes,
            run.id,
            record,
            json.dumps(summary),
            int(run.captured_at * 1_000_000),
            ttl_ms,
            self._settings.capture_per_shop,
            self._settings.capture_max_bytes,
            size,
        ]
        return keys, args

    def get(self, run_id: str) -> CapturedRun:
        """The captured run ``run_id``, or :class:`RunNotFound`."""
        raw = self._redis.get(self._keys.run(valid_run_id(run_id)))
        if raw is None:
            raise RunNotFound(
                f"run {run_id} is not captured (never, or evicted, or expired: runs are kept "
                f"{self._settings.capture_ttl_s} s)",
                run=run_id,
            )
        try:
            return CapturedRun.from_wire(msgpack.unpackb(raw, raw=False))
        except _UNREADABLE as exc:
            raise RunNotFound(f"run {run_id} cannot be read: {exc}"[:300], run=run_id) from None

    def summaries(
        self,
        *,
        ep: str | None = None,
        shop_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
    ) -> list[RunSummary]:
        """The newest captured runs first, at most ``limit``, of one EP and shop if given.
        Entries that cannot be read, or whose run has expired, are skipped."""
        index = self._keys.runs_of_shop(check_shop_id(shop_id)) if shop_id else self._keys.runs()
        found: list[RunSummary] = []
        now = time.time()
        for ids in self._pages(index):
            for raw in self._redis.hmget(self._keys.runs_summary(), ids):
                if raw is None:
                    continue
                try:
                    summary = RunSummary.from_json(raw)
                except _UNREADABLE:
                    continue
                if summary.expires_at <= now:
                    continue
                if (ep and summary.ep != ep) or (status and summary.status != status):
                    continue
                found.append(summary)
                if len(found) >= limit:
                    return found
        return found

    def _pages(self, index: str, size: int = 200) -> Iterator[list[str]]:
        start = 0
        while True:
            ids = [_text(i) for i in self._redis.zrevrange(index, start, start + size - 1)]
            if not ids:
                return
            yield ids
            start += size

    def forget(self, run_ids: Sequence[str] = (), *, shop_id: str | None = None) -> int:
        """Drop these runs, or every run of one shop; how many were dropped."""
        keys = list(self._indexes)
        if shop_id is not None:
            keys.append(self._keys.runs_of_shop(check_shop_id(shop_id)))
        return int(self._forget(keys=keys, args=[*self._prefixes, *run_ids]))

    def total_bytes(self) -> int:
        """The bytes every captured run takes, as the byte cap counts them."""
        return int(self._redis.get(self._keys.runs_bytes()) or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def recorded_output(run: CapturedRun) -> Any:
    """A successful run's output, decoded from its stdout as the worker decoded it (None for a
    failed run)."""
    if not run.ok:
        return None
    try:
        return decode_output(run.stdout, None, run.codec)
    except ScriptpoolError:  # a successful run's output decoded once: this is not expected
        return None


def describe(run: CapturedRun) -> dict[str, Any]:
    """A run as ``runs show --json`` prints it: the record, with the input and output as JSON
    values where they are JSON, and the raw bytes as text otherwise."""
    data = run.to_wire()
    data.pop("format")
    data["status"] = run.status
    data["output"] = recorded_output(run)
    value = run.input_value()
    data["input"] = value if value is not None else run.input.decode("utf-8", errors="replace")
    data["stdout"] = (
        run.stdout.decode("utf-8", errors="replace") if run.codec != CODEC_MSGPACK else run.stdout.hex()
    )
    return data
