"""relayd: the rendezvous, reflexive-address and fallback relay daemon of p2psync.

Nodes that cannot reach each other directly meet here. relayd

- answers STUN Binding requests (RFC 8489) on its UDP port, so a node learns
  the address its NAT gave it; an optional second port lets a node tell an
  easy NAT from a hard (symmetric) one;
- accepts QUIC connections (ALPN ``p2psync-relay/1``) on the same UDP port
  from nodes that prove their NodeId, forwards relay frames
  ``{dst, payload}`` between connected nodes and answers address lookups;
- optionally admits only an allow-list of NodeIds and/or nodes presenting
  a shared access token (``allow``, ``access_token`` /
  ``--access-token-file``);
- serves ``/health`` and Prometheus ``/metrics`` over HTTP on loopback.

Zero knowledge: everything a node sends through relayd is end-to-end
encrypted between the nodes. relayd sees ciphertext, hashes, sizes, node ids
and addresses — never keys, never plaintext — and it logs none of the
payloads it carries. Relays share no state: more users means more relays.

Layout: :mod:`relayd.state` (pure, clock injected), :mod:`relayd.routing`
(the sans-IO relay router), :mod:`relayd.relay` (the QUIC relay and
:func:`relayd.relay.serve`), :mod:`relayd.server` (STUN and HTTP),
:mod:`relayd.config` and :mod:`relayd.defaults` (every limit, with its
reason), :mod:`relayd.metrics`, :mod:`relayd.cli`.

Operating it: ``relayd --config /etc/relayd/relayd.toml`` (start from
``relayd.example.toml`` beside this file; ``relayd --print-config`` shows
the effective settings). ``relayd.service`` is a hardened systemd unit and
``Dockerfile`` a container image (both untested here). Open UDP 3478 (and
the STUN alternate port if set); keep the HTTP port on loopback or behind a
proxy.
"""
