"""netsim: real kernel NAT in Linux network namespaces, for p2psync's tests.

The model
---------
A :class:`~netsim.topology.Topology` (frozen dataclasses, no I/O) describes
one network:

- **the internet segment**: one namespace (``inet``) holding a bridge with
  203.0.113.1/24 that every public host and every site uplink plugs into
  with a veth. It also routes the public LAN subnets of ``none`` and
  ``firewall`` sites to their routers, and is every public machine's
  default gateway.
- **public hosts** (:class:`~netsim.topology.PublicHost`): relays, STUN
  responders; one namespace each, an address in 203.0.113.10-89.
- **sites** (:class:`~netsim.topology.Site`): a router namespace of one
  :class:`~netsim.nat.NatKind`, a LAN bridge inside it, and one namespace
  per host with a veth into the bridge and a default route via the router.
  Translating sites get a private 10.N.0.0/24, ``none``/``firewall`` sites
  a public /28 from 198.51.100.0/24; a ``cgnat`` site adds a carrier
  router, with 100.64.N.0/24 between carrier and home router.
- **link conditions** (:class:`~netsim.topology.LinkConditions`): delay,
  jitter, loss and rate on a public host's link, a site's uplink or a LAN
  host's cable, in both directions. This kernel has no ``tc netem``, so a
  conditioned link runs through a userspace link emulator
  (:mod:`netsim.linkem`) in a namespace of its own, spliced into the cable.

:func:`~netsim.topology.plan_network` names and numbers everything (the
address plan is in :mod:`netsim.topology`), :mod:`netsim.nat` writes each
router's nft ruleset as text, and :mod:`netsim.netns` - the only module that
runs ``ip``, ``nft`` and ``sysctl`` - applies the plan.

NAT kinds
---------
``none`` (public address, nothing in the way), ``firewall`` (public
address, only replies get in), ``easy`` (endpoint-independent mapping,
address-and-port-dependent filtering), ``hard`` (a new random public port
per destination), ``cgnat`` (easy behind easy), ``udp-blocked`` (UDP only
to port 53); hairpinning on or off per site. How each is built, and what
was measured about endpoint-independent mapping on Linux, is in
:mod:`netsim.nat`. ``python -m netsim selftest`` proves each kind's
mapping and filtering with a STUN-like responder (:mod:`netsim.responder`)
and probes (:mod:`netsim.probe`).

Running things
--------------
:func:`~netsim.build.build` is a context manager returning a
:class:`~netsim.build.Network`: ``net.spawn(host, argv)`` starts a process
in a host's namespace (logs in ``<output>/<run id>/``), ``net.run(host,
argv)`` runs a command to completion, ``wait_until`` (:mod:`netsim.procs`)
polls with a deadline.

Teardown guarantees
-------------------
Namespaces are named ``p2ps-<run id>-...`` (6 random hex digits per run),
so parallel runs never collide. Leaving the ``with`` block - normally, by
an exception, by SIGINT or SIGTERM - stops every process of the run and
deletes every namespace with the run's prefix; nothing is ever created in
the root namespace, so nothing is left there. A run killed with SIGKILL
leaves its namespaces without a live owner; ``python -m netsim cleanup``
removes them (and leaves live runs alone unless ``--force``).

Needs root, iproute2 and nftables (``tc`` is not used).
"""

from __future__ import annotations

from netsim.build import Network, build
from netsim.nat import NatKind
from netsim.procs import Proc, python_module_argv, wait_until
from netsim.topology import (
    Internet,
    LinkConditions,
    PublicHost,
    Site,
    SiteHost,
    Topology,
)

__all__ = [
    "Internet",
    "LinkConditions",
    "NatKind",
    "Network",
    "Proc",
    "PublicHost",
    "Site",
    "SiteHost",
    "Topology",
    "build",
    "python_module_argv",
    "wait_until",
]
