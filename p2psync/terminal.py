"""What the CLI draws on a terminal: transfer progress bars and ``status --watch``.

Only for humans at a terminal: bars appear when stderr is a TTY (never in
pipes, logs or ``--json`` output on stdout) and go to stderr, so
``p2psync get KEY > file`` stays byte-exact. Rendering is rich's; this
module only decides what to show. rich is imported on first use, so commands
that draw nothing do not pay for it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from p2psync import defaults


def wants_progress(
    size: int | None, *, disabled: bool = False, stream: IO[str] | None = None
) -> bool:
    """Draw a bar? Only on a TTY, and only for large (or unknown-size) transfers."""
    stream = sys.stderr if stream is None else stream
    if disabled or not stream.isatty():
        return False
    return size is None or size >= defaults.PROGRESS_MIN_BYTES


@contextlib.contextmanager
def transfer_bar(
    label: str, total: int | None, *, enabled: bool, stream: IO[str] | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield ``update(bytes_done)``; draws a bar with bytes, rate and ETA when enabled.

    ``update`` may be called from any thread (rich's progress is thread-safe).
    """
    if not enabled:
        yield lambda done: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(file=sys.stderr if stream is None else stream)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)

        def update(done: int) -> None:
            progress.update(task, completed=done)

        yield update
        if total is not None:
            progress.update(task, completed=total)


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def status_view(state: dict[str, Any]) -> Any:
    """A rich renderable of a status dict (the control API's ``status`` result)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append(f"node  {state['node_id'][:16]}…  {state.get('name') or ''}\n", style="bold")
    head.append(
        f"group {state.get('group_id') or '(none)'}   listening {', '.join(state['listening'])}"
    )
    relay = state.get("relay")
    if relay:
        head.append(f"\nrelay {'connected' if relay['connected'] else 'not connected'}")
        if relay.get("public_address"):
            head.append(f", public address {relay['public_address']}")
    peers = Table(title="peers", title_justify="left", expand=True)
    for column in ("node", "path", "address", "rtt", "in", "out", "rx/s", "tx/s", "last error"):
        peers.add_column(column, no_wrap=column != "last error")
    for peer in state["peers"]:
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer.get("rtt_ms") is not None else "-"
        peers.add_row(
            peer["node_id"][:16],
            peer["path"],
            peer.get("address") or "-",
            rtt,
            _size(peer["bytes_in"]),
            _size(peer["bytes_out"]),
            _size(peer.get("rx_rate", 0)),
            _size(peer.get("tx_rate", 0)),
            peer.get("last_error") or "",
        )
    parts: list[Any] = [head, peers]
    transfers = state.get("transfers") or []
    if transfers:
        table = Table(title="incoming", title_justify="left", expand=True)
        for column in ("key", "progress", "done", "rate"):
            table.add_column(column)
        for transfer in transfers:
            total = max(1, transfer["bytes_total"])
            table.add_row(
                transfer.get("key") or transfer["blob"][:16],
                ProgressBar(total=total, completed=transfer["bytes_done"], width=30),
                f"{_size(transfer['bytes_done'])} / {_size(transfer['bytes_total'])}",
                f"{_size(transfer['rate'])}/s",
            )
        parts.append(table)
    return Group(*parts)


def watch_status(
    fetch: Callable[[], dict[str, Any]],
    *,
    interval: float,
    stream: IO[str] | None = None,
    rounds: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Redraw ``fetch()`` every ``interval`` seconds in place (Ctrl-C stops it)."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=sys.stdout if stream is None else stream)
    with Live(status_view(fetch()), console=console, auto_refresh=False) as live:
        done = 1
        while rounds is None or done < rounds:
            sleep(interval)
            live.update(status_view(fetch()), refresh=True)
            done += 1
