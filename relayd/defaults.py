"""Every default and every limit of relayd, each with one line of why.

:class:`relayd.config.RelaydConfig` takes its defaults from here; nothing else
spells these numbers. Everything a remote peer can grow (connections, queues,
rate tables, HTTP requests) has a bound named here.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

# --- addresses ------------------------------------------------------------
# UDP 3478 is STUN's IANA port (RFC 8489 §18.4); QUIC shares it, demultiplexed
# by the first byte (p2psync.net.stun), so operators open one UDP port.
LISTEN = "0.0.0.0:3478"
# HTTP (/health, /metrics) on loopback only: metrics reveal traffic volumes;
# expose it through a reverse proxy or scrape it locally. Not 3479: that is
# the conventional STUN alternate port (coturn's listening-port + 1).
HTTP_LISTEN = "127.0.0.1:9478"
# The second STUN port is off unless asked for (3479 is the usual choice): a
# node compares the mappings seen by both ports to tell easy from hard NAT.
STUN_ALT_PORT: int | None = None
# No data directory unless asked for: without one relayd keeps no state on
# disk (an ephemeral identity, no mailbox), so it needs no writable path.
DATA_DIR: str | None = None
LOG_LEVEL = "info"

# --- connections (QUIC relay; enforced once the relay lands) ---------------
# A small VPS holds ~10k idle QUIC connections in well under 1 GiB.
MAX_CONNECTIONS = 10_000
# A household or office behind one NAT has a handful of devices; CGNAT shares
# an address among more, so leave room — but one host cannot take the relay.
MAX_CONNECTIONS_PER_IP = 32
# A TLS 1.3 handshake takes a few RTTs; 10 s covers lossy mobile links.
HANDSHAKE_TIMEOUT_S = 10.0
# Nodes keep-alive every ~25 s (NAT UDP mappings often expire at 30 s), so
# two missed keep-alives plus slack end a dead connection.
IDLE_TIMEOUT_S = 60.0
# A destination that cannot accept a frame for this long loses the frame.
WRITE_TIMEOUT_S = 5.0

# --- relay frames (per node, token buckets) -------------------------------
# Behind hard NATs the relay *is* the path (hard<->hard pairs always relay),
# so a node may relay a sync at about what it syncs directly; a flood beyond
# that is throttled per node and cannot take the relay from the others.
# 16 MiB/s (134 Mbit/s) is ~0.7 of a direct sync on the bench machine and
# costs relayd ~0.2 core on the UDP fast path (11-12 ms CPU per relayed MB,
# netsim.bench relay): five nodes at full speed before one core is busy. It
# was 8 MiB/s while every relayed byte crossed relayd's QUIC stacks (~80 ms
# per MB: 0.7 core per node); a node without the fast path still costs that
# much per byte, so at this rate one such node can keep a core busy.
# Frames follow bytes at the fast path's 1414-byte packets (16 MiB/s is
# ~11.9k of them); a receiver's ACKs count against its own buckets.
# Bursts are two seconds' worth: a sync of ~30 MiB goes at full speed.
FRAMES_PER_SECOND = 12_000
FRAME_BURST = 24_000
BYTES_PER_SECOND = 16 * MiB
BYTE_BURST = 32 * MiB
# 64 KiB holds any QUIC datagram (<= 1500 on real paths) plus framing, and
# bounds what one frame can make us buffer.
MAX_FRAME_SIZE = 64 * KiB
# Per-destination send queue: a slow receiver costs at most 32 frames
# (2 MiB worst case), then frames are dropped (the inner QUIC retransmits).
QUEUE_PER_DESTINATION = 32
# The UDP fast path (p2psync.proto.relay, relayd.routing): relayed datagrams
# as plain UDP between a node's relay-connection address and ours, instead of
# inside its QUIC stream; nodes ask for it, relayd grants it. On: it costs
# relayd a fraction of the CPU per relayed byte; its trust rule (the source
# address of the authenticated connection) is TURN's.
FAST_PATH = True

# --- STUN ------------------------------------------------------------------
# A netcheck sends a few requests per port; 10/s sustained with a burst of 20
# serves any honest client and caps what a spoofed source can reflect.
STUN_PER_IP_RATE = 10.0
STUN_PER_IP_BURST = 20
# Rate state per source IP lives in an LRU table of this many entries
# (~150 bytes each: ~10 MiB); a spoofing flood evicts, never grows memory.
MAX_TRACKED_IPS = 65_536
# One UDP datagram's maximum payload; larger reads would truncate.
MAX_DATAGRAM = 65_535

# --- HTTP ------------------------------------------------------------------
# A GET for /health or /metrics with headers is a few hundred bytes.
HTTP_MAX_REQUEST_BYTES = 8 * KiB
# A request line and headers take one RTT; a slow client is cut at 5 s.
HTTP_REQUEST_TIMEOUT_S = 5.0
# After answering, up to this much unread request is drained before closing,
# so the kernel does not reset the connection under the response.
HTTP_MAX_DRAIN_BYTES = 256 * KiB
# Scrapers and health checks need a few; beyond this, connections are closed.
HTTP_MAX_CONNECTIONS = 64

# --- observability ---------------------------------------------------------
# A flood must not turn into a log flood: one line per reason per 10 s, with
# a count of what was suppressed.
LOG_INTERVAL_S = 10.0
# Each metric keeps at most this many label sets; the rest fold into one
# overflow series, so no peer-chosen value can grow the registry.
METRICS_MAX_LABEL_SETS = 64

# --- invites (short-code tickets, relayd.invites) ---------------------------
# Short codes live 10 minutes; nothing longer is stored (the brute-force
# analysis in docs/pairing-codes.md assumes it).
INVITES_MAX_LIFETIME_S = 600
# A sealed ticket is ~4 KiB at most: 10k of them are ~40 MiB of RAM.
INVITES_MAX_STORED = 10_000
# One household behind one NAT pairs a few devices at a time; a host that
# wants more open invites than this is filling the store.
INVITES_MAX_PER_IP = 16
# Creating: an inviter makes a code now and then; 10 at once, then one per 20 s.
INVITES_CREATE_PER_IP_RATE = 0.05
INVITES_CREATE_PER_IP_BURST = 10
# Fetching: a joiner fetches once; retries after a network hiccup are cheap.
INVITES_LOOKUP_PER_IP_RATE = 1.0
INVITES_LOOKUP_PER_IP_BURST = 10
# Failed fetches (unknown first half, wrong second half): a person mistypes a
# few times; a guesser gets 5 at once, then one a minute: at most
# 5 + 10 = 15 guesses per address in a code's 10-minute life.
INVITES_FAILED_LOOKUP_PER_IP_RATE = 1.0 / 60.0
INVITES_FAILED_LOOKUP_PER_IP_BURST = 5
# Wrong proofs one invite survives (typos), then it is burnt.
INVITES_MAX_WRONG_PROOFS = 3
# The per-IP limits count an IPv6 source by its /64: a host is handed a whole
# /64 (RFC 6177) and may pick a fresh address per request. IPv4 stays per
# address. Shorter (e.g. 56, 48) groups whole sites, at the cost of the
# neighbours sharing them.
INVITES_IPV6_PREFIX = 64

# --- mailbox (store-and-forward; runs when relayd has a --data directory) ----
# The mailbox is what makes relayd stateful, so it is on whenever a data
# directory exists to keep it in; without one there is nowhere to keep it.
MAILBOX_ENABLED = True
# A device asleep over a long weekend, or a week of travel, still gets what
# the others wrote; beyond that the devices meet directly or the data waits
# on the writer (the local store is the source of truth, never the relay).
MAILBOX_RETENTION_S = 7 * 24 * 3600
# Any sealed object (a 1 MiB chunk + 46 bytes, a manifest of the largest
# blob ~2.9 MiB); anything larger is no p2psync item. The config refuses
# less than one sealed chunk (relayd.config.check_mailbox_config).
MAILBOX_MAX_ITEM_BYTES = 3 * MiB
# One group's share: a week of a household's photos, not a backup service.
MAILBOX_GROUP_QUOTA_BYTES = 2 * 1024 * MiB
# All groups together: sized for a small VPS disk; raise it with the disk.
MAILBOX_TOTAL_QUOTA_BYTES = 20 * 1024 * MiB
# Refuse pushes (storage-full) while the data directory's filesystem has less
# than this free: the relay's database, logs and the OS must never hit ENOSPC.
MAILBOX_MIN_FREE_BYTES = 1024 * MiB
# A user's phones, laptops, desktops and servers; more is abuse of one group.
MAILBOX_MAX_DEVICES_PER_GROUP = 32
# Expired items, orphan chunks and stale devices are removed hourly; TTL is
# exact anyway (expired items are never served, whenever cleanup runs).
MAILBOX_CLEANUP_INTERVAL_S = 3600.0
# Items at most this large live inside SQLite, larger ones are files beside
# it: SQLite reads blobs under ~100 KB faster than separate files (sqlite.org
# "Internal Versus External BLOBs"), while big blobs in SQLite are written
# twice (WAL, then checkpoint) and leave free pages instead of freeing disk.
# Entries (<= 8 KiB), manifests and small last chunks stay in the database;
# full 1 MiB chunks become files.
MAILBOX_INLINE_MAX_BYTES = 64 * KiB
# Drop items every registered device has pulled before their TTL? Off: a
# device that never contacted this relay (new, or away since before its
# registration expired) would miss them. Under quota pressure such items
# are evicted first anyway, before a push is refused.
MAILBOX_DROP_DELIVERED = False
# Each stored item costs a row and index entries beyond its bytes; charging
# this much per item keeps a flood of tiny items inside the quota's meaning.
MAILBOX_ITEM_OVERHEAD_BYTES = 128
# Cleanup deletes at most this many rows per transaction, and the service
# releases its store lock between transactions: a push waits for one batch
# (milliseconds), never for a whole cleanup of a large store.
MAILBOX_CLEANUP_BATCH = 1000
# Under quota pressure delivered items go oldest first, this many per step
# until the push fits: room for a 1 MiB chunk in a few steps, without
# evicting far more than the push needs.
MAILBOX_EVICT_STEP = 32
# Free pages handed back to the filesystem per cleanup step (4 KiB pages:
# 8 MiB per step), for the same reason.
MAILBOX_VACUUM_PAGES = 2048
# Mailboxes whose counters cleanup recounts from their rows per step.
MAILBOX_RECOUNT_BATCH = 64
# SQLite waits this long for another writer (a second relayd on the same
# directory, a backup tool) before an operation fails.
MAILBOX_BUSY_TIMEOUT_MS = 10_000
