"""TLS 1.3 for p2psync's QUIC: a node's certificate is its NodeId.

Theory
------
There is no PKI. A node's Ed25519 identity key (the NodeId, see
:mod:`p2psync.crypto.identity`) signs a self-signed X.509 certificate that
carries that same key; TLS 1.3 (RFC 8446 §4.4.3) makes the server prove it
holds the private key by signing the handshake transcript in
CertificateVerify with ``ed25519`` (0x0807, RFC 8446 §4.2.3). aioquic checks
that signature against the certificate's key before it reports the
handshake complete. So the dialer only has to check one thing: **the
certificate's public key is exactly the NodeId it meant to reach**
(:func:`check_peer_certificate`). Names, dates and issuers in the
certificate mean nothing and are not checked.

How the check is wired into aioquic 1.x
---------------------------------------
aioquic has no certificate-verification callback: with
``verify_mode=CERT_REQUIRED`` it validates against a CA store and a host
name, which a self-signed NodeId certificate cannot pass. So the client
runs with ``verify_mode=ssl.CERT_NONE`` and the endpoint
(:mod:`p2psync.net.endpoint`) inspects ``QuicConnection.tls._peer_certificate``
after **every** datagram it feeds a dialing connection, as soon as the
certificate has been parsed, and in any case before it hands the connection
to the application. On a mismatch it closes the connection with
CRYPTO_ERROR ``bad_certificate`` (0x0100 + 42, RFC 9001 §4.8) and raises
:class:`PeerIdentityMismatch`. No application data can have been sent: the
application never saw the connection.

The accepting side does not authenticate the dialer in TLS; the design does
that one layer up (HELLO: signature over a fresh challenge and both ids).

Certificates are deterministic (validity 2020-01-01 .. 9999-12-31, the
RFC 5280 §4.1.2.5 "no expiry" date; serial from the NodeId), so building one
reads no clock and no entropy.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from collections.abc import Sequence
from typing import Final

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import BadFrame, IntegrityError

logger = logging.getLogger(__name__)

# RFC 9001 §4.8: a TLS alert becomes QUIC error 0x0100 + alert; 42 = bad_certificate.
CRYPTO_ERROR_BAD_CERTIFICATE: Final = 0x0100 + 42

_NOT_BEFORE: Final = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER: Final = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class PeerIdentityMismatch(IntegrityError):
    """The peer's TLS certificate key is not the NodeId we dialed (``expected`` None:
    we dialed nobody in particular, and the key is no NodeId we can use)."""

    def __init__(self, expected: NodeId | None, got: str) -> None:
        if expected is None:
            message = f"the peer's certificate names {got}: not a node we can talk to"
        else:
            message = (
                f"dialed {expected.short()} but the peer proved it is {got}; "
                "the address belongs to another device (stale address book or an attack)"
            )
        super().__init__(message)
        self.expected = expected
        self.got = got


def node_certificate(identity: Identity) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """Self-signed certificate whose subject key is ``identity``'s NodeId."""
    private_key = Ed25519PrivateKey.from_private_bytes(identity.seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.node_id))])
    # Serial: positive, at most 20 octets (RFC 5280 §4.1.2.2), stable per node.
    serial = int.from_bytes(hashlib.sha256(identity.node_id.raw).digest()[:16], "big") >> 1
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(serial or 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(private_key, None)  # Ed25519 takes no separate hash (RFC 8410 §6)
    )
    return certificate, private_key


def certificate_node_id(certificate: x509.Certificate) -> NodeId | None:
    """The NodeId a certificate names, or None if its key is not Ed25519."""
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        return NodeId(raw)
    except BadFrame:  # a small-order or otherwise invalid point
        return None


def check_peer_certificate(expected: NodeId, certificate: x509.Certificate) -> NodeId:
    """Return ``expected`` if the certificate carries exactly that key, else raise."""
    got = certificate_node_id(certificate)
    if got != expected:
        shown = got.short() if got is not None else "a non-Ed25519 key"
        logger.warning(
            "peer certificate mismatch: dialed %s, certificate names %s; aborting",
            expected.short(),
            shown,
        )
        raise PeerIdentityMismatch(expected, shown)
    return expected


def server_configuration(
    identity: Identity,
    *,
    alpn: Sequence[str],
    max_datagram_size: int,
    idle_timeout: float,
    max_data: int,
    max_stream_data: int,
) -> QuicConfiguration:
    """aioquic configuration for connections this node accepts."""
    certificate, private_key = node_certificate(identity)
    return QuicConfiguration(
        is_client=False,
        alpn_protocols=list(alpn),
        certificate=certificate,
        private_key=private_key,
        max_datagram_size=max_datagram_size,
        idle_timeout=idle_timeout,
        max_data=max_data,
        max_stream_data=max_stream_data,
    )


def client_configuration(
    *,
    alpn: Sequence[str],
    max_datagram_size: int,
    idle_timeout: float,
    max_data: int,
    max_stream_data: int,
) -> QuicConfiguration:
    """aioquic configuration for dialing; the caller MUST run :func:`check_peer_certificate`.

    ``verify_mode=CERT_NONE`` only disables aioquic's CA/host-name validation;
    the CertificateVerify signature is still checked against the certificate
    key. No SNI is sent: the NodeId we dial is nobody else's business.
    """
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=list(alpn),
        verify_mode=ssl.CERT_NONE,
        max_datagram_size=max_datagram_size,
        idle_timeout=idle_timeout,
        max_data=max_data,
        max_stream_data=max_stream_data,
    )
