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

# --- sync -------------------------------------------------------------------
# Largest control-stream frame: holds one ENTRIES batch with slack, and caps
# what one length header can make us buffer.
SYNC_MAX_CONTROL_FRAME = 1 * MiB
# Largest object-stream frame: a full manifest of MAX_BLOB_CHUNKS is ~2.9 MiB
# sealed, the biggest object there is; 4 MiB leaves slack for the envelope.
SYNC_MAX_OBJECT_FRAME = 4 * MiB
# Entries per ENTRIES/ANNOUNCE message: small batches keep per-message work
# (one SQLite transaction) short and interleave fairly with other traffic.
SYNC_MAX_ENTRIES_PER_MESSAGE = 256
# Bytes of raw entries per message: 512 KiB fits the control frame with room.
SYNC_MAX_ENTRIES_BYTES = 512 * KiB
# Authors in a frontier (over all its FRONTIER parts): a group is one user's
# devices; thousands of authors means a bug or an attack.
SYNC_MAX_FRONTIER_AUTHORS = 4096
# Authors per FRONTIER message part (34 + 9 bytes each, ~44 KiB).
SYNC_FRONTIER_AUTHORS_PER_MESSAGE = 1024
# HELLO+AUTH must finish in this time, or the peer is stalling us.
SYNC_HANDSHAKE_TIMEOUT = 10.0
# Anti-entropy: re-send our frontier this often; repairs what gossip missed
# at the cost of one small message per peer per interval.
SYNC_ANTI_ENTROPY_INTERVAL = 30.0
# After a gap (an announced entry whose predecessor we lack) ask for repair
# at most this often, so a burst of out-of-order announces sends one FRONTIER.
SYNC_REPAIR_MIN_INTERVAL = 1.0
# Plan the peer's FRONTIER (re-read and re-send what it lacks) at most this
# often; a sooner one waits for it. An honest peer sends one per anti-entropy
# round or repair (itself >= SYNC_REPAIR_MIN_INTERVAL apart).
SYNC_FRONTIER_MIN_INTERVAL = 1.0
# Objects in flight per peer: 8 x 1 MiB keeps a fast link busy without one
# peer hogging the connection window (NET_CONNECTION_RECEIVE_WINDOW is 8 MiB).
SYNC_OBJECT_WINDOW = 8
# Object replies a node writes at once per peer; the peer's other WANTs wait
# their turn. aioquic visits every stream with unsent data for every packet
# it builds: 8 replies written at once cost the sender ~25% more CPU than one.
SYNC_SERVE_STREAMS = 1
# Object replies of a link that made no progress at all for this long are
# given up and asked for again (a peer or path that went silent must not hold
# the fetch window and the node's claims for ever). Per link, not per reply:
# replies wait their turn behind others (above), which is progress too.
SYNC_OBJECT_STALL_TIMEOUT = 30.0
# A reply hands its turn to the next when fewer than this many of its bytes
# are still unsent (~45 packets, one GSO batch): the next one is queued
# before this one runs dry, so the link never idles between objects, and
# the congestion window alone bounds what is in flight.
SYNC_SERVE_HANDOFF = 64 * KiB
# Object ids queued per session ahead of the window (re-read from the store).
SYNC_WANT_QUEUE = 64
# Objects a peer said it lacks, remembered per session (cleared each
# anti-entropy round, when the peer may have fetched them itself).
SYNC_MAX_UNAVAILABLE = 4096
# Control bytes produced ahead of the transport: data_to_send() refills up to
# this, so a large catch-up streams with bounded memory.
SYNC_SEND_BUFFER = 256 * KiB
# Entry ids remembered by gossip to drop re-announcements (32 B each).
SYNC_GOSSIP_SEEN_CACHE = 16384
# Peer challenges remembered to refuse replayed handshakes (32 B each).
SYNC_REPLAY_CACHE = 4096
# Characters of a BYE reason: enough to say what went wrong, not a payload.
SYNC_MAX_BYE_REASON = 256

# --- net ------------------------------------------------------------------
# Largest UDP payload we send: 1500-byte Ethernet MTU minus IPv6 (40) and UDP
# (8) headers; QUIC's own minimum is 1200 (RFC 9000 §14).
NET_MAX_DATAGRAM_SIZE = 1452
# QUIC idle timeout: long enough to ride out a short network change, short
# enough that a vanished peer is noticed (keep-alives refresh it).
NET_IDLE_TIMEOUT = 30.0
# Connections per endpoint (both roles): bounds TLS state a flood can create.
NET_MAX_CONNECTIONS = 256
# Handshaken connections waiting in accept(); more are refused, not queued.
NET_ACCEPT_BACKLOG = 32
# Concurrent peer-opened streams per connection (QUIC MAX_STREAMS) and the
# accept_stream() queue: bounds per-stream state a peer can make us hold.
NET_MAX_INCOMING_STREAMS = 64
# Per-stream receive window: flow-control credit is re-granted only as the
# application reads, so this bounds unread bytes per stream; 2 MiB covers
# ~160 Mbit/s at 100 ms RTT.
NET_STREAM_RECEIVE_WINDOW = 2 * MiB
# Per-connection receive window over all streams (QUIC MAX_DATA): the real
# memory bound per peer.
NET_CONNECTION_RECEIVE_WINDOW = 8 * MiB
# send_all() blocks while this many bytes of a stream are unacknowledged.
NET_STREAM_SEND_BUFFER = 1 * MiB
# Datagrams read per wake-up before the endpoint transmits: bounds latency
# of outgoing ACKs under a flood.
NET_RECV_BATCH = 256
# Kernel socket buffers requested (the kernel may cap them at rmem_max).
NET_SOCKET_BUFFER = 4 * MiB
# Disco: pings before the first QUIC packet, their spacing, and the total
# wait for a pong before QUIC goes ahead anyway and lets its handshake decide.
DISCO_PING_ATTEMPTS = 3
DISCO_PING_INTERVAL = 0.2
DISCO_PONG_WAIT = 1.0
# Remembered disco nonces for replay detection.
DISCO_REPLAY_WINDOW = 4096
# Cached X25519 shared keys (one scalar multiplication saved per message).
DISCO_MAX_SHARED_KEYS = 1024
# Peers with direct-path state kept in the path table (LRU beyond this).
PATHS_MAX_PEERS = 4096
# Direct addresses remembered per peer.
PATHS_MAX_ADDRESSES_PER_PEER = 16
# A validated path stays trusted this long after its last pong (a backstop:
# the heartbeat's missed pongs end a broken path much sooner; longer than
# three PATHS_KEEPALIVE_INTERVALs, so one lost keep-alive pong is no flap).
PATHS_VALIDITY = 80.0
# Source-address → NodeId mappings learnt from pings, kept this long.
PATHS_SOURCE_MAPPING_TTL = 120.0
# Datagrams held while the kernel send buffer is full; beyond, drop (QUIC
# treats it as loss and backs off).
NET_SEND_BACKLOG = 4096
# receive_some() without max_bytes returns at most this much at once.
NET_READ_COALESCE = 256 * KiB

# --- NAT traversal: path keep-alive, hole punching, netcheck (issue 6) --------
# See p2psync/net/paths.py for the rules these feed.
# A busy peer's direct path is pinged this often; PATHS_MISSED_PONGS pings
# unanswered (the last for a full interval) means the path is dead: ~6 s
# from a break to the relay, "within seconds", for ~60 bytes/s per peer.
PATHS_HEARTBEAT_INTERVAL = 2.0
PATHS_MISSED_PONGS = 3
# A quiet (but connected) peer's direct path is pinged this often: 25 s is
# under the 30 s after which Linux conntrack (nf_conntrack_udp_timeout) and
# many home routers forget a UDP mapping that saw no reply, with a few
# seconds to spare; each ping refreshes our mapping, its pong the peer's
# (RFC 4787 REQ-6: outbound refresh).
PATHS_KEEPALIVE_INTERVAL = 25.0
# "Busy" = a datagram went to the peer this recently (heartbeat pace).
PATHS_BUSY_WINDOW = 5.0
# No datagram to a peer for this long: its connections are gone (twice
# QUIC's idle timeout); stop pinging and punching.
PATHS_IDLE_WINDOW = 60.0
# Hole punching: after a CALL_ME_MAYBE both sides ping all candidates every
# PATHS_PROBE_INTERVAL for PATHS_PUNCH_WINDOW; the first probes of each
# side only open its own NAT, so a few rounds are needed (ten here).
PATHS_PUNCH_WINDOW = 5.0
PATHS_PROBE_INTERVAL = 0.5
# A PING on an unvalidated path is pinged back at once, at most this often
# per address (a ping-pong storm cannot start).
PATHS_PING_BACK_INTERVAL = 0.2
# A failed attempt is retried after a backoff that starts here and doubles:
# cheap (one CALL_ME_MAYBE and a few pings), but a peer that can never be
# reached directly costs one attempt per 5 minutes at most.
PATHS_PUNCH_RETRY_MIN = 10.0
PATHS_PUNCH_RETRY_MAX = 300.0
# Hard NAT on one side: the hard side opens this many ports, the easy side
# sprays at most PATHS_SPRAY_PROBES random ports at PATHS_SPRAY_RATE per
# second (batches of PATHS_SPRAY_BATCH): 2048 probes reach a 256-port target
# among 64512 with 99.97 % odds in 8 s (Tailscale measured ~99.9 % in ~20 s).
# The search gives up after PATHS_HARD_NAT_WINDOW (issue 6: <= 20 s) and is
# not repeated for PATHS_HARD_NAT_RETRY (2048 NAT sessions are not free).
PATHS_HARD_NAT_PORTS = 256
PATHS_SPRAY_PROBES = 2048
PATHS_SPRAY_RATE = 256.0
PATHS_SPRAY_BATCH = 16
PATHS_HARD_NAT_WINDOW = 15.0
PATHS_HARD_NAT_RETRY = 600.0
# Outstanding pings remembered per peer (a punching round pings up to 16
# candidates every 0.5 s); older ones are forgotten, their pongs ignored.
PATHS_MAX_PENDING_PINGS = 64
# Peers with a hard-NAT port fan open at once (256 sockets each), and peers
# being sprayed at once: a CALL_ME_MAYBE can come from any NodeId, so this
# caps what hostile ones can make us send (2 x 256 probes/s at most).
PATHS_MAX_PORT_FANS = 2
PATHS_MAX_SPRAYS = 2
# netcheck: STUN Binding requests per port (the first lost is resent) and the
# wait for answers; the relay's second STUN port is its main port + 1 unless
# told (relayd --stun-alt-port; coturn's convention).
NETCHECK_ATTEMPTS = 3
NETCHECK_RESEND_INTERVAL = 0.5
NETCHECK_TIMEOUT = 3.0
NETCHECK_ALT_PORT_OFFSET = 1
# The daemon re-runs netcheck this often (a laptop changes networks), and
# after a direct path broke, at most once per NETCHECK_MIN_INTERVAL.
NETCHECK_INTERVAL = 300.0
NETCHECK_MIN_INTERVAL = 30.0

# --- node -------------------------------------------------------------------
# Default UDP port of a daemon: fixed so that `--peer NODEID@HOST:PORT` and
# firewall rules have something stable to name (unassigned by IANA).
NODE_PORT = 47300
# Reconnect backoff to a static peer: first retry soon (a restart takes a
# second), then double up to a minute so a dead peer costs little.
RECONNECT_MIN_DELAY = 0.5
RECONNECT_MAX_DELAY = 60.0

# --- library and control API (p2psync.api, p2psync.control) -------------------
# pull() page size unless the caller says otherwise: one worker-thread hop
# decodes the page, so it stays short enough not to hold the store lock long.
PULL_DEFAULT_LIMIT = 256
# Largest pull() page: bounds one reply's memory (and its control-API line).
PULL_MAX_LIMIT = 1000
# subscribe() reads the store in pages of this many changes.
SUBSCRIBE_PAGE = 256
# subscribe() re-reads the store this often even without a change signal, to
# pick up entries another process wrote to the same home (CLI without daemon).
SUBSCRIBE_POLL_INTERVAL = 2.0
# Status events (peers, paths, progress) queued per reader; a slower reader
# loses the newest and is told how many (they describe the present anyway).
EVENT_QUEUE_MAX = 256
# The node samples peer paths, byte rates and transfer progress this often.
PROGRESS_INTERVAL = 1.0
# Weight of the newest sample in smoothed rates (EWMA): ~3 ticks of memory.
RATE_SMOOTHING = 0.5
# Incoming blobs whose progress is tracked at once; beyond that, progress is
# shown for the first ones only (the store still fetches them all).
TRANSFER_TRACK_MAX = 1024
# The CLI draws a progress bar for files at least this large: smaller ones
# finish before a bar would help.
PROGRESS_MIN_BYTES = 8 * MiB
# Long puts and gets report progress (CLI bars, control-API events) at most
# this often: smooth to the eye, a few lines a second on the socket.
PROGRESS_EVENT_INTERVAL = 0.25
# Control API: `get` without an output path returns the content inline
# (base64 in the reply line) up to this size; larger needs an output path.
CONTROL_INLINE_MAX = 512 * KiB
# Control API: one request line (JSON) from a client, at most.
CONTROL_MAX_REQUEST = 1 * MiB
# Control API: one reply line the client library accepts (an `ls` of a big
# store is one line); the daemon is trusted, this only bounds a runaway.
CONTROL_MAX_REPLY = 64 * MiB
# Control API: concurrent client connections to one daemon.
CONTROL_MAX_CLIENTS = 64
# Control API: after a client half-closed (shut its sending side, as socat and
# `nc -N` do when their input ends) the daemon checks this often whether it
# hung up entirely, to cancel what it was doing for it; it still gets answers.
CONTROL_HANGUP_POLL = 0.5

# --- store: small objects -----------------------------------------------------
# Sealed objects up to this size live inside SQLite instead of one file each:
# notes and settings then cost one commit, not a file + fsync + rename; big
# chunks stay files so the database stays small and streaming stays cheap.
SMALL_OBJECT_MAX = 16 * 1024
# Received entries: Ed25519 checks and meta decryption of a batch run in this
# many worker threads (libsodium releases the GIL) while the store's thread
# decodes and writes SQLite; two keep up with that thread on a 2-core machine.
STORE_VERIFY_THREADS = 2
# Entries per signature-check job: small enough that the first results come
# back while later ones are still being checked (pipelining), large enough
# that the per-job thread hand-off (~20 us) is noise next to ~60 us a check.
STORE_VERIFY_CHUNK = 16
# Two verified links to one peer within this many seconds are a simultaneous
# dial (keep_connection decides); a link newer than that replaces the old one
# (the peer restarted and the old connection is dead until its idle timeout).
DUPLICATE_WINDOW = 10.0

# --- pairing -----------------------------------------------------------------
# An invite ticket is valid this long: enough to walk to the other device,
# short enough that a forgotten ticket in a chat log soon means nothing.
INVITE_LIFETIME = 600
# Open invites per node (tickets and short codes): far more than a person
# makes at once; bounds the invite book.
INVITES_MAX_OPEN = 64
# Tries per invite at the inviter. Every join handshake that gets the
# inviter's MAC is one, however it ends (a wrong proof, a joiner that hangs
# up or times out); a try whose proof was right and whose welcome could not
# be delivered is given back. Handshakes in flight hold a try each, so at
# most this many run at once per invite. Three cover a flaky network; a
# guesser holding a short code's first half gets three online guesses at
# 2^-40 each before the invite is burnt (docs/pairing-codes.md).
JOIN_MAX_TRIES = 3
# JOIN_REQUESTs answered per source (an IP address, IPv6 by JOIN_IPV6_PREFIX;
# a relayed joiner by its NodeId): a joiner sends one and retries a few
# times; more is someone collecting inviter MACs or burning invites.
JOIN_REQUEST_PER_SOURCE_RATE = 0.1
JOIN_REQUEST_PER_SOURCE_BURST = 5
# All JOIN_REQUESTs together, whatever the number of sources (fresh NodeIds
# cost nothing): a person pairs a few devices a minute at most.
JOIN_REQUEST_TOTAL_RATE = 1.0
JOIN_REQUEST_TOTAL_BURST = 20
# Sources remembered for the per-source limit (LRU; an evicted one starts
# full again, which the total limit bounds).
JOIN_REQUEST_MAX_SOURCES = 1024
# An IPv6 host is handed a whole /64 (RFC 6177): limits count it as one.
JOIN_IPV6_PREFIX = 64
# The joiner, having opened the welcome and sent its end of stream (the
# inviter records it only then), waits this long for the inviter's end of
# stream so its own gets out before it closes the connection.
JOIN_ACK_WAIT = 5.0
# A short code's LAN advert that our second half does not open means a typo
# (or a stranger's planted copy): keep looking this long for one that opens
# (a planted copy and the real one are announced alike), then say "check the
# last 8 characters" without asking the relay (that would spend a try).
JOIN_LAN_MISMATCH_GRACE = 1.0
# mDNS: with no record from another host within this long of starting, the
# status says "no multicast heard" (p2psync.discovery.mdns). Another member
# answers our first queries within a few seconds; other devices on a LAN
# (phones, printers, laptops) speak mDNS every few seconds too.
MDNS_SILENCE_TIMEOUT = 15.0
# Last seen of each peer is written to the store at most this often
# (`p2psync devices` reads it without a daemon); a restart loses at most
# this much of it.
PEER_SEEN_WRITE_INTERVAL = 60.0
# Peers whose last seen is kept: far more than a group's devices.
PEER_SEEN_MAX = 1024
# The last write of last-seen times when a node stops: one small transaction;
# a store that hangs must not hang the shutdown.
PEER_SEEN_FINAL_WRITE_TIMEOUT = 2.0
# A LAN address found by mDNS answers within a second or not at all; try the
# next one after this long.
LAN_DIAL_TIMEOUT = 3.0
# A LAN link found by mDNS that ends (a network blip, the peer's restart) is
# dialed again with backoff for this long; mDNS re-reports a peer that comes
# back later (its daemon re-advertises when it starts or its network changes).
LAN_REDIAL_WINDOW = 600.0
# Asking the relay where a peer is should take one round trip; give up on
# the lookup (and dial over the relay anyway) after this long.
RELAY_LOOKUP_TIMEOUT = 2.0
# How often a node compares its interface addresses with what it published
# to its relay; a change costs one new login (AUTH carries the addresses).
RELAY_REPUBLISH_INTERVAL = 10.0
# Asking a relay named by HOST:PORT for its NodeId (one QUIC handshake; a
# relay that is down is retried with the relay client's backoff).
RELAY_IDENTIFY_TIMEOUT = 10.0
# Relays pinned on first use per home (known_relays.json): far more than
# anyone configures; the oldest pin goes.
KNOWN_RELAYS_MAX = 64

# Ask the home relay for the UDP fast path (p2psync.proto.relay): relayed
# datagrams go as plain UDP to the relay instead of inside the relay
# connection's QUIC stream, which cost three extra QUIC stacks per datagram
# (netsim.bench relay measures both; numbers in p2psync/net/endpoint.py).
RELAY_FAST_PATH = True
# Validated NodeIds the endpoint and the relay client keep (an Ed25519 point
# check costs ~0.1 ms; relayed datagrams name their peer in every one).
RELAY_NODE_ID_CACHE = 1024

# --- relay service streams (p2psync.proto.services) ---------------------------
# Streams besides the relay stream a node may hold open on one relay
# connection: one per service in use (mailbox, invites) with room to spare.
RELAY_MAX_SERVICE_STREAMS = 8
# The OPEN frame must arrive this soon after the stream opens.
RELAY_SERVICE_OPEN_TIMEOUT = 10.0
# A service write that does not finish in this long means the node stopped
# reading; the relay ends that stream (not the connection).
RELAY_SERVICE_WRITE_TIMEOUT = 10.0
