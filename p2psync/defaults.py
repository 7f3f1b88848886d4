"""Every default and every limit of p2psync, each with one line of why.

Config objects (frozen dataclasses) take their defaults from here; nothing
else in the code base spells these numbers. Limits bound every buffer, queue
and table a peer (or a file on disk) can grow.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- data model -----------------------------------------------------------
# 1 MiB chunks: large enough that per-chunk overhead (hash, AEAD tag, SQLite
# row, one QUIC stream) is noise, small enough that a resumed transfer loses
# little and memory stays bounded while streaming.
CHUNK_SIZE = 1 * MiB
# A blob of more chunks than this is refused (64 GiB): bounds manifest size.
MAX_BLOB_CHUNKS = 64 * 1024
# Encrypted app metadata (key, type, name, app fields) stays small: it rides
# inside every entry and every gossip message.
MAX_META_PLAINTEXT = 4 * KiB
# An app key is a path-like string; long keys are almost always a bug.
MAX_KEY_LENGTH = 1024
# Encoded entry upper bound (meta + signature + fixed fields, with slack).
MAX_ENTRY_SIZE = 8 * KiB
# HLC: refuse entries stamped further than this in the future (clock skew
# beyond a day means a broken clock, not a slow one).
MAX_CLOCK_SKEW_MS = 24 * 3600 * 1000

# --- store ----------------------------------------------------------------
# SQLite waits this long for a lock held by another process (CLI vs daemon).
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Temp object files older than this belong to a writer that died: one chunk
# write takes milliseconds, so ten minutes never races a live writer.
STALE_TEMP_SECONDS = 600.0

# --- passphrases (OWASP 2023 Argon2id guidance: m=64 MiB, t=3, p=1 is a
# comfortable interactive setting on a 2-core laptop) ----------------------
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 1
# Parameters read from untrusted input are capped so a hostile file cannot
# make us allocate gigabytes or spin for minutes.
ARGON2_MAX_MEMORY_KIB = 1024 * 1024
ARGON2_MAX_TIME_COST = 20

# --- tickets and codes ----------------------------------------------------
# Typed-in codes longer than this are refused before decoding.
MAX_CODE_LENGTH = 4096
