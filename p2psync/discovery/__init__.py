"""Finding group members: LAN mDNS today; relay lookup and static peers beside it.

- :mod:`p2psync.discovery.tags` (sans-IO): rotating window tags and the
  sealed mDNS advert that hides a device's NodeId and group from outsiders.
- :mod:`p2psync.discovery.invites` (sans-IO): the LAN advert of a short-code
  invite (a clear tag from the code's first half, NodeId and port sealed
  under a key from its second half).
- :mod:`p2psync.discovery.mdns`: :func:`~p2psync.discovery.mdns.run_mdns`, the
  trio service around python-zeroconf (the only module that imports it), and
  :func:`~p2psync.discovery.mdns.advertise_invite` /
  :func:`~p2psync.discovery.mdns.find_invite` for short codes.

Nothing is imported here, so using the tags never loads zeroconf.
"""
