"""p2psync: peer-to-peer, end-to-end encrypted, local-first sync for your own devices.

Layout (dependencies point down; relayd imports only ``proto`` and ``crypto``):

- :mod:`p2psync.crypto`  identity, group keys, AEAD, passphrases, codes
- :mod:`p2psync.proto`   wire formats: msgpack codec, signed entries
- :mod:`p2psync.store`   the local store: feeds, sealed objects, index
- :mod:`p2psync.home`    a device's home directory: keys, config, store
- :mod:`p2psync.cli`     the command line (the only reader of env and exit codes)
"""

__version__ = "0.1.0"
