"""``p2psync doctor NODEID`` and ``p2psync netcheck``: the "why not direct?" report (pure).

Everything here turns JSON the daemon already serves (``status``: per peer
the path, since when, the last direct failure, and the path table's
``traversal`` details; top-level ``nat``, the background netcheck) or a
netcheck report into a diagnosis and text. No I/O: the CLI fetches and prints.

The verdict, in order of precedence::

    path lan/direct                    -> "direct (lan) since ..."
    not connected                      -> "not connected" + the last connect error
    relayed, an attempt running        -> "hole punching in progress"
    relayed, both sides hard NAT       -> "relay: both behind hard NAT, no direct path possible"
    relayed, our UDP blocked/unknown   -> what netcheck says
    relayed, a failure recorded        -> "relay: <the reason>; next attempt in N s"
    relayed, nothing tried yet         -> "relay: no direct attempt yet"
"""

from __future__ import annotations

import time
from typing import Any

from p2psync.errors import P2PSyncError


class PeerNotFound(P2PSyncError):
    """No peer of the running daemon matches the NodeId given."""


def find_peer(status: dict[str, Any], node_id_prefix: str) -> dict[str, Any]:
    """The status row of the one peer whose NodeId starts with ``node_id_prefix``."""
    prefix = node_id_prefix.strip().lower()
    rows = [p for p in status.get("peers", []) if str(p.get("node_id", "")).startswith(prefix)]
    if not rows:
        known = ", ".join(str(p.get("node_id", ""))[:16] for p in status.get("peers", []))
        raise PeerNotFound(
            f"the daemon knows no peer {node_id_prefix!r}"
            + (f" (it knows {known})" if known else "")
        )
    if len(rows) > 1:
        raise PeerNotFound(f"{node_id_prefix!r} matches {len(rows)} peers: give more of the NodeId")
    row: dict[str, Any] = rows[0]
    return row


def diagnose(status: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Both sides' NAT kinds, the candidates tried, and one verdict line."""
    traversal = peer.get("traversal") or {}
    nat = status.get("nat") or {}
    ours = nat.get("nat") or "unknown"
    theirs = traversal.get("their_nat") or "unknown"
    path = peer.get("path") or "none"
    failure = peer.get("last_direct_failure")
    if path in ("lan", "direct"):
        verdict = f"{path} since {_when(peer.get('path_since'))}"
        if failure:
            verdict += f" (earlier: {failure})"
    elif not peer.get("connected"):
        verdict = "not connected" + (f": {peer['last_error']}" if peer.get("last_error") else "")
    elif traversal.get("punching"):
        verdict = "relay, hole punching in progress"
    elif ours == "hard" and theirs == "hard":
        verdict = "relay: both sides behind hard NAT, no direct path is possible"
    elif nat.get("netcheck") and nat["netcheck"].get("nat") == "udp-blocked":
        verdict = f"relay: {nat.get('explain')}"
    elif failure:
        verdict = f"relay: {failure}"
        wait = traversal.get("next_attempt_in_s")
        if wait is not None:
            verdict += f"; next attempt in {wait:g} s"
    else:
        verdict = "relay: no direct attempt yet"
    return {
        "node_id": peer.get("node_id"),
        "path": path,
        "path_since": peer.get("path_since"),
        "verdict": verdict,
        "our_nat": ours,
        "their_nat": theirs,
        "our_netcheck": nat.get("netcheck"),
        "our_candidates": nat.get("candidates", []),
        "candidates": traversal.get("candidates", []),
        "attempts": traversal.get("attempts", 0),
        "last_direct_failure": failure,
        "direct_after_s": traversal.get("direct_after_s"),
        "relay_bytes_after_direct": traversal.get("relay_bytes_after_direct"),
    }


def format_doctor(report: dict[str, Any]) -> str:
    lines = [
        f"peer      {report['node_id']}",
        f"verdict   {report['verdict']}",
        f"our NAT   {report['our_nat']}" + _netcheck_suffix(report.get("our_netcheck")),
        f"their NAT {report['their_nat']} (from their CALL_ME_MAYBE)",
        f"we offer  {', '.join(report['our_candidates']) or '-'}",
        f"attempts  {report['attempts']}",
    ]
    if report.get("direct_after_s") is not None:
        lines.append(f"direct after {report['direct_after_s']:.2f} s on the relay")
    lines.append("candidates tried:")
    if not report["candidates"]:
        lines.append("  (none known: no CALL_ME_MAYBE, lookup or mDNS answer yet)")
    for c in report["candidates"]:
        rtt = f"{c['rtt_ms']:.1f} ms" if c.get("rtt_ms") is not None else "-"
        via = f" -> {c['via']}" if c.get("via") else ""
        why = f"  ({c['failure']})" if c.get("failure") and c["state"] != "validated" else ""
        lan = " lan" if c.get("lan") else ""
        lines.append(
            f"  {c['address'] + via:<28} {c['state']:<10} {c['origin']:<14}{lan} "
            f"pings {c['pings']} pongs {c['pongs']} rtt {rtt}{why}"
        )
    return "\n".join(lines)


def format_netcheck(report: dict[str, Any], explain: str) -> str:
    public = ", ".join(report["public"]) or "-"
    hairpin = {True: "yes", False: "no", None: "-"}[report["hairpin"]]
    rtt = f"{report['rtt_ms']:.1f} ms" if report["rtt_ms"] is not None else "-"
    alt = report["alt_port"] if report["alt_port"] is not None else "-"
    return "\n".join(
        [
            f"relay      {report['server']} (second STUN port {alt})",
            f"answered   {', '.join(report['answered']) or 'nothing'}",
            f"public     {public}",
            f"NAT        {report['nat']}",
            f"rtt        {rtt}",
            f"hairpin    {hairpin}",
            f"=> {explain}",
        ]
    )


def _netcheck_suffix(netcheck: dict[str, Any] | None) -> str:
    if not netcheck:
        return " (no netcheck yet)"
    public = ", ".join(netcheck.get("public") or []) or "-"
    return f" (netcheck: public {public}, hairpin {netcheck.get('hairpin')})"


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(unix))
