"""Passphrase to key: Argon2id (RFC 9106), parameters stored beside the salt.

Theory
------
A passphrase is low-entropy, so turning it into a key must be slow and
memory-hard: Argon2id, the RFC 9106 recommendation, via argon2-cffi's raw
API (the reference C implementation). The defaults live in
:mod:`p2psync.defaults` (OWASP 2023: m=64 MiB, t=3, p=1).

Every derivation records its salt *and* parameters (:class:`KdfParams`), so
the cost can be raised later without breaking existing data: old data keeps
the parameters it was made with.

Rules
-----
- A ``str`` passphrase is NFC-normalised, then UTF-8 encoded, so the same
  text typed on different systems (composed vs decomposed accents) gives the
  same key. ``bytes`` are used as they are.
- Parameters read from a file or the network go through
  :meth:`KdfParams.from_dict_untrusted`, which bounds them (a hostile file
  must not make us allocate gigabytes or spin for minutes) and raises only
  :class:`BadFrame`, naming the offending field.
- The same bounds hold for parameters we make, so whatever we write we can
  read back.
- Randomness (the salt) is injected.

Format
------
:meth:`KdfParams.to_dict` (for msgpack/JSON-with-bytes containers)::

    {"salt": 16..64 bytes, "time_cost": 1..ARGON2_MAX_TIME_COST,
     "memory_kib": 8*parallelism..ARGON2_MAX_MEMORY_KIB,
     "parallelism": 1..16, "version": 19}
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Final

from argon2.low_level import Type, hash_secret_raw

from p2psync import defaults
from p2psync.crypto.identity import RandomBytes
from p2psync.errors import BadFrame, LocalProtocolError

SALT_SIZE: Final = 16
MIN_SALT_SIZE: Final = 16
MAX_SALT_SIZE: Final = 64
MAX_PARALLELISM: Final = 16
ARGON2_VERSION: Final = 19  # 0x13, the only version RFC 9106 specifies
MIN_KEY_LENGTH: Final = 16
MAX_KEY_LENGTH: Final = 64

_FIELDS: Final = ("salt", "time_cost", "memory_kib", "parallelism", "version")


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadFrame(f"KDF parameter {name!r} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadFrame(f"KDF parameter {name!r} must be from {low} to {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Salt and Argon2id cost parameters of one passphrase-derived key."""

    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int
    version: int = ARGON2_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.salt, bytes):
            raise BadFrame(f"KDF parameter 'salt' must be bytes, got {type(self.salt).__name__}")
        if not MIN_SALT_SIZE <= len(self.salt) <= MAX_SALT_SIZE:
            raise BadFrame(
                f"KDF parameter 'salt' must be {MIN_SALT_SIZE} to {MAX_SALT_SIZE} bytes, "
                f"got {len(self.salt)}"
            )
        _check_int("time_cost", self.time_cost, 1, defaults.ARGON2_MAX_TIME_COST)
        parallelism = _check_int("parallelism", self.parallelism, 1, MAX_PARALLELISM)
        # Argon2 needs at least 8 KiB (two sync points of 4 blocks) per lane.
        _check_int("memory_kib", self.memory_kib, 8 * parallelism, defaults.ARGON2_MAX_MEMORY_KIB)
        _check_int("version", self.version, ARGON2_VERSION, ARGON2_VERSION)

    def to_dict(self) -> dict[str, int | bytes]:
        return {
            "salt": self.salt,
            "time_cost": self.time_cost,
            "memory_kib": self.memory_kib,
            "parallelism": self.parallelism,
            "version": self.version,
        }

    @classmethod
    def from_dict_untrusted(cls, d: object) -> KdfParams:
        """Validate a decoded mapping; :class:`BadFrame` names the wrong field."""
        if not isinstance(d, dict):
            raise BadFrame(f"KDF parameters must be a mapping, got {type(d).__name__}")
        for name in _FIELDS:
            if name not in d:
                raise BadFrame(f"KDF parameter {name!r} is missing")
        unknown = sorted(repr(key) for key in d if key not in _FIELDS)
        if unknown:
            # A field we do not know might change the derivation; refusing is
            # safer than deriving a wrong key and failing later, obscurely.
            raise BadFrame(f"unknown KDF parameter(s) {', '.join(unknown)}; upgrade p2psync")
        return cls(
            salt=d["salt"],
            time_cost=d["time_cost"],
            memory_kib=d["memory_kib"],
            parallelism=d["parallelism"],
            version=d["version"],
        )

    def __repr__(self) -> str:
        return (
            f"KdfParams(argon2id t={self.time_cost} m={self.memory_kib}KiB "
            f"p={self.parallelism} v={self.version}, salt={self.salt.hex()})"
        )


def new_params(
    random_bytes: RandomBytes,
    *,
    time_cost: int = defaults.ARGON2_TIME_COST,
    memory_kib: int = defaults.ARGON2_MEMORY_KIB,
    parallelism: int = defaults.ARGON2_PARALLELISM,
) -> KdfParams:
    """Fresh parameters with a new random 16-byte salt."""
    return KdfParams(
        salt=random_bytes(SALT_SIZE),
        time_cost=time_cost,
        memory_kib=memory_kib,
        parallelism=parallelism,
    )


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, bytes):
        return passphrase
    try:
        return unicodedata.normalize("NFC", passphrase).encode("utf-8")
    except UnicodeEncodeError as exc:
        # Lone surrogates (e.g. undecodable bytes smuggled in via
        # surrogateescape) have no UTF-8 form.
        raise BadFrame("the passphrase is not valid Unicode text") from exc


def derive_key(passphrase: str | bytes, params: KdfParams, length: int = 32) -> bytes:
    """Argon2id(passphrase, params) -> ``length`` bytes of key."""
    if not MIN_KEY_LENGTH <= length <= MAX_KEY_LENGTH:
        raise LocalProtocolError(
            f"derived key length must be {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} bytes, got {length}"
        )
    return hash_secret_raw(
        secret=_passphrase_bytes(passphrase),
        salt=params.salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=length,
        type=Type.ID,
        version=params.version,
    )
