"""The design a user would write without scriptpool, kept only as the benchmark's reference point.

A plain Celery task with default settings and the stock Redis result backend. It fetches the
module bytes from Redis and compiles them on every call, and runs the guest with wasmtime-py's
own WASI, which reads stdin only from a file. Start it with ``celery -A scriptpool.cli._naive worker``.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache

import redis
from celery import Celery

QUEUE = "naive"

app = Celery("naive")
app.conf.update(
    broker_url=os.environ.get("SCRIPTPOOL_REDIS_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("SCRIPTPOOL_REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_default_queue=QUEUE,
)


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


@app.task(name="naive.execute")  # type: ignore[untyped-decorator]
def execute(module_key: str, payload: str) -> str:
    import wasmtime

    wasm = _redis().get(module_key)
    if not isinstance(wasm, bytes):
        raise LookupError(f"no module at {module_key}")
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, wasm)
    with tempfile.TemporaryDirectory() as tmp:
        stdin, stdout = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        with open(stdin, "w") as f:
            f.write(payload)
        wasi = wasmtime.WasiConfig()
        wasi.stdin_file = stdin
        wasi.stdout_file = stdout
        store = wasmtime.Store(engine)
        store.set_wasi(wasi)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        instance = linker.instantiate(store, module)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        with open(stdout) as f:
            return f.read()
