"""A call's input, as the runtime carries it from its edge (``Executor.execute``) to the script.

A call gives its input as JSON text (bytes: the pool's jobs, replays) or as a host value (a JSON
value: in-process callers). It is told apart once, at the edge, and each step then asks the
input for what it needs, so nothing is decoded or encoded that no step uses: JSON text bound for
a JSON script goes to the guest as it came, never decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from scriptpool.config.errors import InvalidInput
from scriptpool.config.wire import encode_input
from scriptpool.runtime._codec import json_value


@dataclass(frozen=True, slots=True)
class ScriptInput:
    """One call's input: its JSON text, or the host value it was given, and its JSON value once
    a step has decoded it (:meth:`decoded`).

    ``text`` is the JSON text, None for a host value not encoded yet. ``value`` holds, as a
    1-tuple, the host value (while ``text`` is None) or the decoded JSON value; it is empty for
    text nothing decoded yet (JSON's null is a value, so None cannot say "none"). Immutable: a
    step that decodes gets a new input to pass on. Two fields, as each costs the hot path a
    little to set.
    """

    text: bytes | None
    value: tuple[Any, ...] = ()

    @classmethod
    def of(cls, payload: Any) -> ScriptInput:
        """The input a caller gave: JSON text (bytes, bytearray or memoryview), a host value, or
        an input already made. The one place that tells text from a value."""
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return cls(bytes(payload))  # bytes as they are: no copy
        if isinstance(payload, ScriptInput):
            return payload
        return cls(None, (payload,))

    def json(self) -> bytes:
        """The JSON text: as the call gave it, or the host value encoded (:class:`InvalidInput`
        if it cannot be), minified as ``scriptpool.config.wire.encode_input`` writes it."""
        return self.text if self.text is not None else encode_input(self.value[0])

    def decoded(self) -> ScriptInput:
        """This input with its JSON value at hand (itself if it has it): the JSON text decoded
        strictly (NaN and infinities refused, as the producer does), so a host value becomes
        exactly what a script reading its JSON text would see. :class:`InvalidInput` if it is
        not JSON."""
        if self.text is not None and self.value:
            return self
        text = self.json()
        return ScriptInput(text, (json_value(text),))

    @property
    def json_value(self) -> Any:
        """The value at hand: the host value as given, or the decoded JSON value (of an input
        :meth:`decoded` returned). What scaling counts the lists of, and what a MessagePack
        script gets (decoded, so a host value as its JSON text says)."""
        return self.value[0]

    def for_schema(self) -> Any:
        """The value the EP's input schema checks: the host value, or the decoded value if a
        step decoded it, else the JSON text parsed (leniently: this check only sharpens error
        messages, and a script reads the text as it is)."""
        if self.value:
            return self.value[0]
        assert self.text is not None  # no value: the input is text
        try:
            return json.loads(self.text)
        except ValueError as exc:
            raise InvalidInput(f"input is not JSON: {exc}") from None

    def captured(self) -> bytes:
        """The JSON text a capture keeps (empty when a host value cannot be encoded: that is
        what failed the run, and nothing can replay it)."""
        try:
            return self.json()
        except InvalidInput:
            return b""
