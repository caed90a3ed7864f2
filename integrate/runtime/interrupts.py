"""`deferred_interrupt`: a Ctrl-C held back to the end of a block whose half-done state no one could undo.

The predictor worker's ring messages (shm_ring.py: a slot taken is always filled and handed on) and the
expert cache's slot changes (cache.py, transfers.py, grouped.py: a slot given to an expert always gets its
copy call) and its prefetch counts where a second Ctrl-C could land (abort_step, close) run inside one: a host that catches the interrupt and decodes on finds both consistent.
"""

from __future__ import annotations

import _signal
import signal
import threading


class deferred_interrupt:
    """`with deferred_interrupt():` holds a Ctrl-C (SIGINT) that arrives inside the block until it ends,
    then hands it to the handler that was in place: a host that catches the interrupt and decodes on must
    not find a slot taken and never filled, or a record announced and never sent (the two processes
    would be out of step for good).

    The block puts a recorder in place of the handler and puts that handler back at its end, so whatever
    a program does with its own handlers (chaining, a saved one restored) is left as it was; a nested
    block hands its signal to the outer one's recorder. Through `_signal`, whose calls skip `signal`'s
    enum conversions, the two swaps cost the host 0.6 us a block (6 us through `signal`, which was a
    message's whole budget). Off the main thread, where Python runs no signal handler, or with no
    Python handler in place (ignored, the default action, or one set outside Python), a block is plain."""

    __slots__ = ("previous", "caught")

    def __enter__(self):
        self.previous = self.caught = None
        if threading.get_ident() == _MAIN and callable(current := _signal.getsignal(_SIGINT)):
            self.previous = current
            _signal.signal(_SIGINT, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.caught = frame

    def __exit__(self, *exc):
        if self.previous is not None:
            _signal.signal(_SIGINT, self.previous)
            if self.caught is not None:
                self.previous(_SIGINT, self.caught)


_MAIN, _SIGINT = threading.main_thread().ident, int(signal.SIGINT)
