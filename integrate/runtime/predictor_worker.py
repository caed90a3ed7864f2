"""The predictor in a worker process, off the runtime's host thread.

At batch 1 the offloading runtime is bound by its host thread (docs/RESULTS.md: on the H100 replay
the host spends about 1.3 ms per layer launching work while the GPU computes 0.2 ms), so every
millisecond a predictor call blocks that thread is a millisecond per token lost; the simulator finds
predictor prefetch slower than LRU for any per-layer call above about 0.1 ms. In a worker process the
calls run on another core: the host thread only writes each token's id and each layer's routing into
a shared-memory ring (shm_ring.py, some 5-15 us a message) and takes the top-k picks from another ring
when they are back, so what it pays is the messages, as long as the predictor keeps up: picks that
come back after their layer help nothing. A worker that falls behind catches up by skipping what is
stale: every token's step still runs (the predictor's state needs it), but a layer's routing of a
token that a newer one has followed is dropped unread, and such a token's step sends no picks.

Messages to the worker: ("reset",) a new sequence; ("prompt", token_ids (B, S), routing (B, S, L, k))
a prompt enters a new state; ("token", step, token_ids (B,), prev (B, L, k)) a decode token: its step,
and the picks it can give at once (token_ahead: every layer; layer_ahead: layers < h); ("routed",
step, layer, routing (B, k)) layer l routed: the picks for l + h; ("stop",). Replies: ("picks", step,
layer, values (B, budget), ids (B, budget)). Each is one ring record (header: kind, step, layer, B,
n; then n payload ints): replies always (batches up to MAX_BATCH), messages to the worker where they
fit; a larger one (a prompt, a token at batch > 4) goes through a pipe, its place in the order kept
by a PIPED record, and its send waits while the worker finishes what is queued before it. The worker
never waits for the host: a reply the host has left a whole ring of unread is dropped (counted in
`dropped`), so the host's wait is always bounded. A failure in the worker sends
its traceback through the pipe and exits; the host raises that error (or says the worker has gone, if
it sent nothing) at the next `replies` that reads the failure or waits, or at the next token's `send`,
which checks that the process lives (once a token: the per-layer sends stay a few stores). A message
is checked, and a piped one pickled, before it takes a record, so a bad one is refused by name and
leaves the order intact. Picks are predicted as `PredictorDriver` predicts them
(predictor/layer_steps.py for a layer_ahead predictor without depth attention, else `model.logits`).
"""

from __future__ import annotations

import copy
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing as mp

from integrate.runtime import worker_serve as ws
from integrate.runtime.interrupts import deferred_interrupt
from integrate.runtime.shm_ring import Ring

BATCH_INLINE = 4  # a decode token's message fits one request record up to this batch (larger: the pipe)
MAX_BATCH = 256  # the largest batch served: a reply's picks are one record
RING_BYTES = 16 << 20  # about this much shared memory per ring (at least 64 records)


def _slots(width: int, least: int = 64) -> int:
    return int(max(least, min(1024, RING_BYTES // (8 * width))))


class PredictorWorker:
    """A started worker process serving `predictor` (an ExpertPredictor; its tensors are shared with the
    process, not copied). `send` and `replies` do not wait on the worker (but a prompt's send, module
    docstring); `replies(wait=True)` waits for one reply, at most `timeout_s`. A failed or vanished worker
    raises RuntimeError (module docstring: when)."""

    def __init__(self, predictor, budget: int, threads: int = 1, timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")  # forking a process that has started torch threads can deadlock
        c = predictor.config
        if not 1 <= budget <= c.num_experts:
            raise ValueError(f"predictor worker: budget (picks per layer) must be in [1, {c.num_experts}], got {budget}")
        self._shape = (c.num_layers, c.top_k)  # a message's routing: (L, k) per sequence and token
        width = ws.HEAD + BATCH_INLINE * (1 + c.num_layers * c.top_k)
        self._requests = Ring(ctx, _slots(width), width)
        self.budget = budget
        width = ws.HEAD + 2 * MAX_BATCH * budget
        # two tokens' replies at least (a token_ahead token sends one per layer at once), however many layers:
        # more shared memory past 32 layers with wide records (L = 94, budget 128: 94 MiB of /dev/shm)
        self._replies = Ring(ctx, _slots(width, least=max(64, 2 * c.num_layers)), width)
        pipe_in, self._pipe_out = ctx.Pipe(duplex=False)  # a message that does not fit a record
        self._pipe_in, pipe_out = ctx.Pipe(duplex=False)  # the worker's error
        self.dropped = torch.zeros(1, dtype=torch.int64).share_memory_()  # replies the host left unread too long
        if next(predictor.parameters()).device.type != "cpu":  # a host copy: the caller's module stays put
            predictor = copy.deepcopy(predictor).cpu()
        args = (self._requests, self._replies, pipe_in, pipe_out, self.dropped, predictor, budget, threads)
        self.proc = ctx.Process(target=ws.serve, args=args, daemon=True)
        self.proc.start()
        pipe_in.close()
        pipe_out.close()
        self.timeout_s = timeout_s
        self._error: str | None = None  # once the worker has failed or gone: every later call raises this
        try:
            self.replies(wait=True)  # READY once loaded
        except BaseException:
            self.close()
            raise

    def send(self, *msg) -> None:
        if self._error is not None:
            raise RuntimeError(self._error)
        kind, payload = msg[0], ()
        ws.check_message(msg, *self._shape)
        if kind in ("token", "prompt"):  # each reply is one record: a batch must fit one
            B, most = len(msg[2 if kind == "token" else 1]), (self._replies.width - ws.HEAD) // (2 * self.budget)
            if B > most:
                raise ValueError(f"predictor worker: a batch of {B} sequences; it serves at most {most} "
                                 f"(predictor_worker.MAX_BATCH)")
        if kind in ("reset", "stop"):
            header = (ws.RESET if kind == "reset" else ws.STOP, 0, 0, 0, 0)
        elif kind == "token":
            ids, prev = np.asarray(msg[2]), np.asarray(msg[3])
            header, payload = (ws.TOKEN, msg[1], 0, len(ids), ids.size + prev.size), (ids, prev)
        elif kind == "routed":
            routing = np.asarray(msg[3])
            header, payload = (ws.ROUTED, msg[1], msg[2], len(routing), routing.size), (routing,)
        else:
            header = None
        if header is None or ws.HEAD + header[4] > self._requests.width:  # the pipe, its place kept by a record
            data = ForkingPickler.dumps(msg)  # first: a message that cannot be pickled leaves no record behind
            with deferred_interrupt():  # the record and its bytes go together, or the worker waits for ever
                self._put((ws.PIPED, 0, 0, 0, 0))
                try:
                    self._pipe_out.send_bytes(data)
                except (BrokenPipeError, OSError):
                    self._dead()
        else:
            self._put(header, payload)
        if kind == "token" and not self.proc.is_alive():  # once a token: a worker gone without a word
            self._dead()

    def _put(self, header: tuple, payload: tuple = ()) -> None:
        """Write a request record, waiting for a free slot only when the worker is a whole ring behind."""
        if self._requests.put(header, payload):  # the usual case: a free slot
            return
        deadline = time.monotonic() + self.timeout_s
        while not self._requests.put(header, payload, timeout=0.25):  # checking that the worker is still there
            if not self.proc.is_alive():
                self._dead()
            if time.monotonic() > deadline:
                raise RuntimeError(f"predictor worker: a whole ring of messages unread for {self.timeout_s:.0f} s")

    def replies(self, wait: bool = False) -> list[tuple]:
        """The replies that have arrived (with `wait`, at least one)."""
        if self._error is not None:
            raise RuntimeError(self._error)
        out = []
        rec = self._replies.get(0)
        deadline = time.monotonic() + self.timeout_s
        while wait and rec is None:  # a quarter second at a time, so a worker that has gone is noticed
            if not self.proc.is_alive():
                self._dead()
            if time.monotonic() > deadline:
                raise RuntimeError(f"predictor worker: no reply in {self.timeout_s:.0f} s")
            rec = self._replies.get(0.25)
        while rec is not None:
            kind, step, layer, B, n = rec[:ws.HEAD].tolist()
            if kind == ws.PICKS:
                ids = rec[ws.HEAD : ws.HEAD + n].reshape(B, -1)
                values = rec[ws.HEAD + n : ws.HEAD + 2 * n].view(np.float64).astype(np.float32).reshape(B, -1)
                out.append(("picks", step, layer, values, ids))
            elif kind == ws.FAILED:
                self._dead()
            elif kind != ws.READY:
                raise RuntimeError(f"predictor worker: a reply of unknown kind {kind}")
            rec = self._replies.get(0)
        return out

    def _dead(self) -> None:
        """Raise the worker's own error if it sent one, else say it has gone."""
        reply = None
        try:
            if self._pipe_in.poll(1.0):
                reply = self._pipe_in.recv()
        except (EOFError, OSError):
            pass
        if reply is not None and reply[0] == "error":
            self._error = f"predictor worker failed:\n{reply[1]}"
        else:
            self.proc.join(1.0)
            self._error = f"predictor worker exited (exit code {self.proc.exitcode})"
        raise RuntimeError(self._error)

    def close(self) -> None:
        if self.proc.is_alive():
            self._requests.put((ws.STOP, 0, 0, 0, 0), timeout=1.0)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        self._pipe_out.close()
        self._pipe_in.close()
        # the shared memory (both rings, about 8 MiB, and their named semaphores) goes now, not when the
        # runtime that held this worker is collected; the count of dropped replies stays readable
        self._requests = self._replies = None
        self.dropped = self.dropped.clone()
        if self._error is None:
            self._error = "predictor worker: closed"
