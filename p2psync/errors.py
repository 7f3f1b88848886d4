"""The one error tree of p2psync.

Every error the library raises on purpose derives from :class:`P2PSyncError`.
The tree follows trio and aioquic:

- :class:`LocalProtocolError` — *we* were asked to do something the protocol
  or the API does not allow (a bug in the caller, or a bad user request).
- :class:`RemoteProtocolError` — a *peer* sent something it must not; it
  carries the wire error code that goes out in the connection close.
- :class:`BadFrame` — bytes from the network, the disk or the user failed to
  decode. Every ``decode_*_untrusted`` function raises only this.
- :class:`IntegrityError` — data decoded but failed a cryptographic or
  structural check (hash mismatch, bad signature, broken chain).
- :class:`ClosedResourceError` / :class:`BrokenResourceError` — trio's
  distinction: we closed it vs. the peer or the network broke it.

User-facing messages say what happened and what to do; they never contain
key material or plaintext.
"""

from __future__ import annotations


class P2PSyncError(Exception):
    """Base class of every error p2psync raises on purpose."""


class LocalProtocolError(P2PSyncError):
    """We (or our caller) tried something the protocol or API forbids."""


class RemoteProtocolError(P2PSyncError):
    """A peer violated the protocol; ``code`` is the wire error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class BadFrame(P2PSyncError):
    """Untrusted bytes could not be decoded (network, disk or user input)."""


class IntegrityError(P2PSyncError):
    """Decoded data failed a hash, signature, MAC or chain check."""


class NotWanted(P2PSyncError):
    """An object arrived that nothing references any more (its value was deleted or
    overwritten while it was on its way): dropped, and nobody's fault."""


class NotFound(P2PSyncError):
    """The requested key, blob, chunk or peer does not exist here."""


class ConfigError(P2PSyncError):
    """Configuration or home directory is missing, invalid or inconsistent."""


class ClosedResourceError(P2PSyncError):
    """We closed this resource earlier; using it now is a local bug."""


class BrokenResourceError(P2PSyncError):
    """The peer or the network broke this resource; retry or reconnect."""
