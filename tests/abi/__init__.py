"""Our own providers and guests of the current Shopify ABIs (``examples/abi/``, WAT assembled at
test time), loaded for the tests.

Guests name their provider ``PROVIDER`` where the import-module name is the test's choice.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

HERE = Path(__file__).resolve().parent.parent.parent / "examples" / "abi"


def wat(name: str, provider: str | None = None) -> str:
    text = (HERE / f"{name}.wat").read_text()
    return text.replace('"PROVIDER"', f'"{provider}"') if provider is not None else text


def wasm(name: str, provider: str | None = None) -> bytes:
    """The module ``name``.wat, with its provider import module named ``provider``."""
    return bytes(wasmtime.wat2wasm(wat(name, provider)))
