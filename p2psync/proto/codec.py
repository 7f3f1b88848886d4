"""msgpack, typed and bounded: the only place that calls msgpack.

Theory
------
Every structure p2psync puts on the wire or on disk is a msgpack *array* of
fixed field order (never a map), so that one value has one encoding and
signatures over it are well defined. Decoders of untrusted bytes:

- refuse input over a caller-given size before touching it;
- disable every msgpack extension type, and cap string, binary, array and
  map lengths (a 5-byte header must not make us allocate gigabytes);
- check *canonical* form where a signature or hash covers the bytes: the
  value must re-encode to exactly the bytes received, so two spellings of
  one entry can never exist;
- raise only :class:`~p2psync.errors.BadFrame`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from p2psync.errors import BadFrame

# msgpack values as they cross our boundary. Decoders return ``object`` and
# narrow with the helpers below, so ``Any`` never leaks inward.
Packable = Any


def pack(value: Packable) -> bytes:
    """Encode ``value`` (arrays as lists, bytes as bin, str as utf-8 str)."""
    packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=False)
    return packed


def unpack_untrusted(data: bytes | memoryview, *, max_size: int) -> object:
    """Decode one msgpack value from untrusted bytes; raise :class:`BadFrame`."""
    if len(data) > max_size:
        raise BadFrame(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size // 2,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.FormatError, msgpack.StackError) as exc:
        # ExtraData (trailing bytes) is a ValueError subclass.
        raise BadFrame(f"not valid msgpack: {exc.__class__.__name__}") from exc
    except RecursionError as exc:  # deeply nested arrays
        raise BadFrame("msgpack nested too deeply") from exc


def unpack_canonical_untrusted(data: bytes, *, max_size: int) -> object:
    """Like :func:`unpack_untrusted`, and the bytes must be the canonical encoding."""
    value = unpack_untrusted(data, max_size=max_size)
    if pack(value) != bytes(data):
        raise BadFrame("not the canonical encoding of its value")
    return value


# --- narrowing helpers: each names the field it checks --------------------


def as_list(value: object, field: str, *, length: int | None = None) -> list[object]:
    if not isinstance(value, list):
        raise BadFrame(f"{field}: expected an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise BadFrame(f"{field}: expected {length} items, got {len(value)}")
    return value


def as_int(value: object, field: str, *, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadFrame(f"{field}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadFrame(f"{field}: {value} is outside {lo}..{hi}")
    return value


def as_bytes(
    value: object, field: str, *, size: int | None = None, max_size: int | None = None
) -> bytes:
    if not isinstance(value, bytes):
        raise BadFrame(f"{field}: expected bytes, got {type(value).__name__}")
    if size is not None and len(value) != size:
        raise BadFrame(f"{field}: expected {size} bytes, got {len(value)}")
    if max_size is not None and len(value) > max_size:
        raise BadFrame(f"{field}: {len(value)} bytes exceeds the limit of {max_size}")
    return value


def as_str(value: object, field: str, *, max_size: int) -> str:
    if not isinstance(value, str):
        raise BadFrame(f"{field}: expected a string, got {type(value).__name__}")
    if len(value) > max_size:
        raise BadFrame(f"{field}: {len(value)} characters exceeds the limit of {max_size}")
    return value


def as_optional_str(value: object, field: str, *, max_size: int) -> str | None:
    return None if value is None else as_str(value, field, max_size=max_size)
