"""The runtime: deployed scripts run in this process, on the engine (``scriptpool.engine``).

What the layers above use of it:

* ``Executor``: a call end to end (lookup, load, run, decode, report), a single script or the
  parts of a join or chain, on a ``ScriptInput`` (the call's input, decoded once at most);
  ``JUDGED`` / ``CONTROL`` say how a rollout served a call, and ``ShadowJudge`` (with ``Sample``
  and ``compare``) runs and judges a rollout's candidate.
* ``run_loaded``, ``local_script``, ``replay`` (``LocalRun``, ``Replayed``): one script run outside
  the pool, on the pool's own steps (``scriptpool run --local``, ``scriptpool replay``).
* Captured runs: the record (``CapturedRun`` and its ``PART_*`` and ``CAPTURE_FORMAT``), the store
  in Redis (``CaptureStore``, ``RunSummary``, ``valid_run_id``, ``describe``,
  ``recorded_output``) and the worker's writer thread (``CaptureWriter``, which counts what it
  does through a callback: ``CAPTURE_RESULTS``).
* ``ByteLRU`` / ``CacheStats``: the compiled-module cache and its counters.
* ``StoreCache`` / ``StoreStats``: the script data that input queries select with
  ``store(scope:, key:)``, hot in the process, and its per-scope hit counters.
* Writes a script returns (``STORE_WRITES``, the output's ``storeWrites``): taken out of the
  output and checked in the run, handed to the caller as ``AppWrites`` (each a ``StoreWrite``)
  for a successful call, to apply after the reply.

It imports no Celery, kombu or metrics library: the workers layer (``scriptpool.workers``) wraps
it in the Celery pool and its metrics, and local runs and replays need none of that.
"""

from scriptpool.runtime._cache import ByteLRU, CacheStats
from scriptpool.runtime._capture import CaptureStore, RunSummary, describe, recorded_output, valid_run_id
from scriptpool.runtime._captured import (
    CAPTURE_FORMAT,
    PART_CHAIN,
    PART_JOIN,
    PART_REDUCER,
    PART_SINGLE,
    CapturedRun,
)
from scriptpool.runtime._executor import CONTROL, JUDGED, Executor
from scriptpool.runtime._input import ScriptInput
from scriptpool.runtime._judge import Sample, ShadowJudge, compare
from scriptpool.runtime._local import LocalRun, Replayed, local_script, replay, run_loaded
from scriptpool.runtime._script import ScriptTrace, decode_output
from scriptpool.runtime._store import StoreCache, StoreStats
from scriptpool.runtime._writer import CAPTURE_RESULTS, CaptureWriter
from scriptpool.runtime._writes import STORE_WRITES, AppWrites, StoreWrite

__all__ = [
    "CAPTURE_FORMAT",
    "CAPTURE_RESULTS",
    "CONTROL",
    "JUDGED",
    "PART_CHAIN",
    "PART_JOIN",
    "PART_REDUCER",
    "PART_SINGLE",
    "STORE_WRITES",
    "AppWrites",
    "ByteLRU",
    "CacheStats",
    "CaptureStore",
    "CaptureWriter",
    "CapturedRun",
    "Executor",
    "LocalRun",
    "Replayed",
    "RunSummary",
    "Sample",
    "ScriptInput",
    "ScriptTrace",
    "ShadowJudge",
    "StoreCache",
    "StoreStats",
    "StoreWrite",
    "compare",
    "decode_output",
    "describe",
    "local_script",
    "recorded_output",
    "replay",
    "run_loaded",
    "valid_run_id",
]
