"""Pure rules the sync shell applies; no state, no I/O.

Duplicate connections
---------------------
Two nodes that dial each other at the same moment end up with two
connections. Both must keep the *same* one without talking about it, so
the rule depends only on facts both sides know: the connection **dialed by
the lower NodeId** (byte order of the raw public keys) wins, the other is
closed with ``ErrorCode.DUPLICATE_CONNECTION``. The shell applies it when a
second session to a peer reaches PeerVerified.
"""

from __future__ import annotations

from p2psync.crypto.identity import NodeId
from p2psync.errors import LocalProtocolError


def keep_connection(our: NodeId, their: NodeId, ours_is_outgoing: bool) -> bool:
    """Whether to keep a connection between ``our`` node and ``their`` node.

    ``ours_is_outgoing``: we dialed this connection. The lower NodeId's
    outgoing connection wins; both sides compute the same answer.
    """
    if our == their:
        raise LocalProtocolError("a connection to ourselves is never kept")
    dialer = our if ours_is_outgoing else their
    return dialer == min(our, their)
