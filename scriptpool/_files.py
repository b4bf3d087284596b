"""Reading what users hand the CLI: module files (.wasm, or .wat text) and JSON documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class UserMistake(Exception):
    """Raised for a mistake the user can fix (a missing file, bad JSON); printed as one line."""


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserMistake(f"cannot read {path}: {exc.strerror}") from None


def read_module(path: str) -> bytes:
    """Module bytes from a .wasm file, or assembled from a .wat text file."""
    data = read_file(path)
    if path.endswith(".wat"):
        import wasmtime

        try:
            return bytes(wasmtime.wat2wasm(data.decode("utf-8", errors="replace")))
        except wasmtime.WasmtimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
            raise UserMistake(f"{path} is not valid WAT: {first}") from None
    return data


def read_json(path: str | None) -> Any:
    if path is None:
        return None
    raw = sys.stdin.buffer.read() if path == "-" else read_file(path)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UserMistake(f"{path} is not JSON: {exc}") from None
