"""Wire formats shared by nodes and relayd: msgpack codec, entries, messages.

Every parser of bytes from outside is named ``decode_*_untrusted`` and raises
only :class:`p2psync.errors.BadFrame`.
"""
