"""Progress bars for the long loops of the command-line tools (evaluate's scoring and simulation,
`python -m predictor.stats`): rich.progress on a terminal, nothing at all otherwise, so CI logs,
pipes and files get no bar frames.

While a bar is shown, log lines of the root logger's console handlers are printed above it (rich
redirects stdout / stderr; handlers opened before hold the old streams and would tear the bar). A stdout
that is not a terminal (a pipe, a file) is left alone: its lines stay there, none tears a bar on stderr.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bars(console: Console | None = None, enabled: bool = True) -> Iterator[Progress]:
    """A rich `Progress` (use `.track(seq, description=...)`), disabled unless `console` (default:
    stderr) is a terminal and `enabled`; the bars vanish when done."""
    console = console or Console(stderr=True)
    stdout = _original("stdout")  # to a pipe or file it keeps its lines (`| tee`, `> log`); None: detached
    out_tty = stdout is not None and stdout.isatty()
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
        redirect_stdout=out_tty,
    )
    if bars.disable:
        yield bars
        return
    with bars:
        handlers = _console_handlers()
        for handler, old in handlers:  # the old stream is stdout or stderr, now rich's proxies
            to_stdout = old is _original("stdout") or old is sys.__stdout__
            if not to_stdout or out_tty:  # (a stdout that is no terminal is neither redirected nor torn)
                handler.setStream(sys.stdout if to_stdout else sys.stderr)
        try:
            yield bars
        finally:
            for handler, old in handlers:
                handler.setStream(old)


def _original(name: str):
    proxy = getattr(sys, name)
    return getattr(proxy, "rich_proxied_file", proxy)


def _console_handlers() -> list[tuple[logging.StreamHandler, object]]:
    consoles = (_original("stdout"), _original("stderr"), sys.__stdout__, sys.__stderr__)
    return [
        (h, h.stream)
        for h in logging.getLogger().handlers
        if type(h) is logging.StreamHandler and any(h.stream is s for s in consoles)
    ]
