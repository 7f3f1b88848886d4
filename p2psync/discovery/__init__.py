"""Finding group members: LAN mDNS today; relay lookup and static peers beside it.

- :mod:`p2psync.discovery.tags` (sans-IO): rotating window tags and the
  sealed mDNS advert that hides a device's NodeId and group from outsiders.
- :mod:`p2psync.discovery.mdns`: :func:`~p2psync.discovery.mdns.run_mdns`, the
  trio service around python-zeroconf (the only module that imports it).

Nothing is imported here, so using the tags never loads zeroconf.
"""
