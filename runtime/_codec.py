"""The two codecs a script speaks: JSON, and MessagePack for the Shopify modules that read it.

The host API is JSON either way: a MessagePack script gets the input JSON as MessagePack (as
function-runner encodes it: integers in their most compact form, other numbers as float64,
object keys in their order) and its MessagePack output is decoded back into JSON values.
"""

from __future__ import annotations

import json
from math import isfinite
from typing import Any

import msgpack

from scriptpool.config.errors import InvalidInput, InvalidOutput
from scriptpool.config.wire import MAX_OUTPUT_DEPTH, nested_deeper_than

# What a MessagePack integer can hold; JSON integers past it are sent as float64 (serde_json,
# which function-runner parses the input with, reads them as f64 too).
_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1


def json_value(text: bytes) -> Any:
    """The JSON value of JSON text, refusing NaN and infinities, as the producer does (a host
    value is encoded first: ``ScriptInput.decoded``, so a MessagePack script sees exactly the
    value a JSON script would)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"input is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("input is nested too deeply to decode") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def to_msgpack(value: Any) -> bytes:
    """Encode a JSON value as MessagePack: ``{"b":1,"a":2}`` is ``82 a1 62 01 a1 61 02``."""
    try:
        return bytes(msgpack.packb(value))
    except OverflowError:
        return bytes(msgpack.packb(_wide_ints_as_floats(value)))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input cannot be encoded as MessagePack: {exc}") from None
    except RecursionError:
        raise InvalidInput("input is nested too deeply to encode") from None


def _wide_ints_as_floats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _wide_ints_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wide_ints_as_floats(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _UINT_MAX:
        return float(value)
    return value


def from_json(text: str) -> Any:
    """Decode a script's JSON output, reading numbers as function-runner's parser (serde_json)
    does: an integer past 64 bits is a float64, and a number past float64 is :class:`InvalidOutput`,
    as are ``NaN`` and ``Infinity``, which are not JSON, and a lone surrogate escape (Python's
    parser takes all three)."""
    try:
        value = _OUTPUT_DECODER.decode(text)
    except ValueError as exc:
        raise InvalidOutput(f"output is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidOutput("output is nested too deeply to decode") from None
    if text.count("[") + text.count("{") > MAX_OUTPUT_DEPTH:  # only then can it nest too deeply
        _check_depth(value)
    if "\\ud" in text or "\\uD" in text:  # a surrogate escape: is one of them alone?
        try:
            msgpack.packb(value)  # what the reply does with it: UTF-8 refuses a lone surrogate
        except UnicodeEncodeError:
            raise InvalidOutput(
                "output has a lone surrogate (\\uD800 to \\uDFFF), which is not text"
            ) from None
    return value


def _output_int(text: str) -> int | float:
    value = int(text)
    if len(text) < 19 or _INT_MIN <= value <= _UINT_MAX:  # what MessagePack carries to the host
        return value
    try:
        return float(value)
    except OverflowError:
        raise InvalidOutput(f"output has an integer of {len(text)} digits, past float64") from None


def _output_float(text: str) -> float:
    value = float(text)
    if not isfinite(value):
        raise InvalidOutput(f"output has {text[:40]}, past float64")
    return value


# The hooks cost about 0.1 us a number (0.6 us for a typical discount output).
_OUTPUT_DECODER = json.JSONDecoder(
    parse_int=_output_int, parse_float=_output_float, parse_constant=_no_constant
)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"extension type {code} is not JSON")


def from_msgpack(data: bytes) -> Any:
    """Decode a script's MessagePack output into a JSON value, or :class:`InvalidOutput` when it
    is not one MessagePack value that JSON can hold: trailing bytes, a map key that is not a
    string, binary or extension data, NaN or an infinity."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidOutput(f"output is not MessagePack: {exc}") from None
    except RecursionError:
        raise InvalidOutput("output is nested too deeply to decode") from None
    _check_json(value)
    return value


def _check_depth(value: Any) -> None:
    """Refuse output nested deeper than :data:`MAX_OUTPUT_DEPTH`."""
    if nested_deeper_than(value, MAX_OUTPUT_DEPTH):
        raise InvalidOutput(
            f"output nests arrays and objects more than {MAX_OUTPUT_DEPTH} deep", limit=MAX_OUTPUT_DEPTH
        )


_SCALARS = frozenset({str, int, bool, type(None)})


def _check_json(value: Any) -> None:
    """Refuse what JSON cannot hold: binary values and keys (bytes), timestamps, NaN and
    infinities.
    Iterative, and about three times faster than ``json.dumps`` as a check."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        kind = type(item)
        if kind is dict:
            for key in item:
                if type(key) is not str:
                    raise InvalidOutput(f"output has a map key that is not a string: {key!r}"[:200])
            children = item.values()
        elif kind is list:
            children = item
        else:
            children = (item,)
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                if depth >= MAX_OUTPUT_DEPTH:
                    raise InvalidOutput(
                        f"output nests arrays and objects more than {MAX_OUTPUT_DEPTH} deep",
                        limit=MAX_OUTPUT_DEPTH,
                    )
                pending.append((child, depth + 1))
            elif kind is float:
                if not isfinite(child):
                    raise InvalidOutput(f"output has {child}, which JSON cannot hold")
            elif kind not in _SCALARS:  # binary data, or a timestamp (extension -1)
                raise InvalidOutput(f"output has a {kind.__name__}, which JSON cannot hold")
