"""Signing and verifying AOT artifacts, so a worker never deserializes bytes we did not compile."""

from __future__ import annotations

import hashlib
import hmac

from scriptpool.config.errors import ArtifactRejected

_MAC_BYTES = 32


def _mac(key: bytes, fingerprint: str, sha256: str, artifact: bytes) -> bytes:
    # Binding the fingerprint and module hash into the MAC stops a valid artifact of one module
    # (or one engine) from being replayed under another's key.
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(f"{fingerprint}\0{sha256}\0".encode())
    mac.update(artifact)
    return mac.digest()


def sign(key: bytes, fingerprint: str, sha256: str, artifact: bytes) -> bytes:
    """Return ``artifact`` prefixed with its HMAC-SHA256 tag."""
    return _mac(key, fingerprint, sha256, artifact) + artifact


def verify(key: bytes, fingerprint: str, sha256: str, signed: bytes) -> bytes:
    """Return the artifact inside ``signed``, or raise :class:`ArtifactRejected`."""
    tag, artifact = signed[:_MAC_BYTES], signed[_MAC_BYTES:]
    if len(tag) != _MAC_BYTES or not hmac.compare_digest(tag, _mac(key, fingerprint, sha256, artifact)):
        raise ArtifactRejected("AOT artifact signature does not verify", sha256=sha256)
    return artifact
