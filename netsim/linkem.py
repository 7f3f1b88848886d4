"""A userspace link emulator: delay, jitter, loss and rate between two interfaces.

Why not ``tc netem``: the kernels these tests run on (6.18 "fc" builds) have
no netem (``CONFIG_NET_SCH_NETEM`` unset, no modules, no nft ``queue``, no
``fq``): ``tc qdisc add ... netem`` fails with "Specified qdisc kind is
unknown". So a conditioned link is cut in two and this process sits in the
middle, in its own namespace (role ``l``), as an Ethernet cable with
properties::

    A:ifA ==veth== [link ns: a  <-linkem->  b] ==veth== B:ifB

It reads every frame arriving on ``a`` or ``b`` with an ``AF_PACKET`` socket
and writes it out of the other interface, unchanged (MAC addresses too, so
the link is invisible to IP; checksum-offload state travels along in the
virtio-net header), after applying, in each direction independently:

- loss: each frame is dropped with probability ``loss_percent / 100``;
- rate: frames are serialised at ``rate_mbit`` (FIFO, 1000-frame queue per
  direction, tail drop), like a slow link's transmit queue;
- delay and jitter: each frame is released ``delay_ms`` plus a uniform
  ``±jitter_ms`` later, never before the frame ahead of it (no reordering).

Frames larger than the MTU (offloaded GSO/TSO super-packets) cannot be sent
by a packet socket; the plan keeps them from being built by setting
``gso_max_segs 1`` on the veth ends that face the emulator.

Prints ``ready`` when both sockets are bound; runs until SIGTERM. A seed
makes loss and jitter reproducible.
"""

from __future__ import annotations

import argparse
import heapq
import random
import selectors
import socket
import sys
import time
from dataclasses import dataclass

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET_HEADER_BYTES = 10
"""struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
MAX_FRAME = 65536
QUEUE_LIMIT_FRAMES = 1000
"""Per direction, like netem's default limit: bounded memory, tail drop beyond."""
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class TransmitState:
    """Timing of one direction: when the wire is free, when the last frame left."""

    next_free_s: float = 0.0
    last_release_s: float = 0.0


@dataclass(slots=True)
class Direction:
    """One way through the link: where frames go, its timing and counters."""

    name: str
    output: socket.socket
    timing: TransmitState
    queued: int = 0
    forwarded: int = 0
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class Conditions:
    delay_s: float
    jitter_s: float
    loss: float
    rate_bps: float | None


def release_time(
    now: float, frame_bytes: int, timing: TransmitState, conditions: Conditions, rng: random.Random
) -> float:
    """When a frame entering a direction at ``now`` leaves it; updates ``timing``."""
    start = max(now, timing.next_free_s)
    serialisation = 0.0 if conditions.rate_bps is None else frame_bytes * 8 / conditions.rate_bps
    timing.next_free_s = start + serialisation
    delay = conditions.delay_s
    if conditions.jitter_s:
        delay = max(0.0, delay + rng.uniform(-conditions.jitter_s, conditions.jitter_s))
    release = max(start + serialisation + delay, timing.last_release_s)
    timing.last_release_s = release
    return release


def _packet_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    # Frames from a veth may carry a checksum the sender left for "hardware"
    # to finish (CHECKSUM_PARTIAL). Read and write them with the virtio-net
    # header, which carries that state, so the far end still computes it.
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((interface, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def run(
    interface_a: str, interface_b: str, conditions: Conditions, rng: random.Random
) -> None:  # pragma: no cover - exercised in namespaces by the netsim tests
    sock_a = _packet_socket(interface_a)
    sock_b = _packet_socket(interface_b)
    directions = {
        sock_a.fileno(): Direction(f"{interface_a}->{interface_b}", sock_b, TransmitState()),
        sock_b.fileno(): Direction(f"{interface_b}->{interface_a}", sock_a, TransmitState()),
    }
    selector = selectors.DefaultSelector()
    selector.register(sock_a, selectors.EVENT_READ)
    selector.register(sock_b, selectors.EVENT_READ)
    pending: list[tuple[float, int, Direction, bytes]] = []
    sequence = 0
    print("ready", flush=True)
    while True:
        timeout = None if not pending else max(0.0, pending[0][0] - time.monotonic())
        for key, _ in selector.select(timeout):
            ready = key.fileobj
            if not isinstance(ready, socket.socket):
                continue
            direction = directions[ready.fileno()]
            while True:
                try:
                    frame, address = ready.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue  # our own transmission on this interface
                if rng.random() < conditions.loss or direction.queued >= QUEUE_LIMIT_FRAMES:
                    direction.dropped += 1
                    continue
                now = time.monotonic()
                frame_bytes = len(frame) - VNET_HEADER_BYTES
                release = release_time(now, frame_bytes, direction.timing, conditions, rng)
                sequence += 1
                heapq.heappush(pending, (release, sequence, direction, frame))
                direction.queued += 1
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, direction, frame = heapq.heappop(pending)
            direction.queued -= 1
            try:
                direction.output.send(frame)
                direction.forwarded += 1
            except OSError:
                direction.dropped += 1  # e.g. an oversized frame: the wire loses it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.linkem", description=__doc__)
    parser.add_argument("--a", required=True, help="interface towards one end")
    parser.add_argument("--b", required=True, help="interface towards the other end")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-percent", type=float, default=0.0)
    parser.add_argument("--rate-mbit", type=float)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    conditions = Conditions(
        delay_s=options.delay_ms / 1000,
        jitter_s=options.jitter_ms / 1000,
        loss=options.loss_percent / 100,
        rate_bps=None if options.rate_mbit is None else options.rate_mbit * 1_000_000,
    )
    run(options.a, options.b, conditions, random.Random(options.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
