"""Errors of netsim, under p2psync's one error tree."""

from __future__ import annotations

from p2psync.errors import P2PSyncError


class NetsimError(P2PSyncError):
    """Base of every error netsim raises on purpose."""


class TopologyError(NetsimError, ValueError):
    """A topology description is inconsistent (duplicate names, too many hosts...)."""


class CommandFailed(NetsimError):
    """An ``ip``/``nft``/``tc``/``sysctl`` call or a command in a host failed.

    The message carries the command line, the exit status and its stderr.
    """

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        command = " ".join(argv)
        detail = stderr.strip() or "(no stderr)"
        super().__init__(f"{command!r} exited with {returncode}: {detail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class PrerequisiteMissing(NetsimError):
    """netsim cannot run here: not root, or ip/nft/tc missing, or no netns support."""


class WaitTimeout(NetsimError, TimeoutError):
    """A wait_until predicate did not become true before its deadline."""
