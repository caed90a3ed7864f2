"""The predictor in a worker process, off the runtime's host thread.

At batch 1 the offloading runtime is bound by its host thread (docs/RESULTS.md: on the H100 replay
the host spends about 1.3 ms per layer launching work while the GPU computes 0.2 ms), so every
millisecond a predictor call blocks that thread is a millisecond per token lost; the simulator finds
predictor prefetch slower than LRU for any per-layer call above about 0.1 ms. In a worker process the
calls run on another core: the host thread only sends each token's id and each layer's routing (a
few hundred bytes through a pipe) and picks up the top-k picks when they are back, so what it pays is
the messages, as long as the predictor keeps up: picks that come back after their layer help nothing.
A worker that falls behind catches up by skipping what is stale: every token's step still runs (the
predictor's state needs it), but a layer's routing of a token that a newer one has followed is
dropped unread, and such a token's step sends no picks. A thread on the host side reads the replies
as they come, so neither side ever blocks on a full pipe.

Messages to the worker (tuples; numpy arrays): ("reset",) a new sequence; ("prompt", token_ids (B, S),
routing (B, S, L, k)) a prompt enters a new state; ("token", step, token_ids (B,), prev (B, L, k)) a decode token: its step, and
the picks it can give at once (token_ahead: every layer; layer_ahead: layers < h); ("routed", step,
layer, routing (B, k)) layer l routed: the picks for l + h; ("stop",). Replies: ("picks", step, layer,
values (B, budget), ids (B, budget)), ("ready",) once loaded, ("error", text) for any failure (the
worker then exits); the host raises that error, with the worker's traceback, at its next call. Picks are predicted as `PredictorDriver` predicts them (predictor/layer_steps.py
for a layer_ahead predictor without depth attention, else `model.logits`).
"""

from __future__ import annotations

import copy
import queue
import threading
import traceback
from collections import deque

import torch
import torch.multiprocessing as mp

NEWER = ("token", "reset", "prompt", "stop")  # messages after which a queued token's layers are stale


def _serve(requests, replies, predictor, budget: int, threads: int) -> None:
    """The worker's loop: messages in order, the stale ones skipped (module docstring)."""
    try:
        from predictor.layer_steps import layer_logits

        torch.set_num_threads(threads)
        model = predictor.eval()
        c = model.config
        h = c.lookahead if c.mode == "layer_ahead" else None
        one_layer = layer_logits(model)
        state = ctx = known = None
        pending: deque = deque()

        def send(step: int, layer: int, logits: torch.Tensor) -> None:
            top = logits.topk(budget, dim=-1)
            replies.send(("picks", step, layer, top.values.float().numpy(), top.indices.numpy()))

        replies.send(("ready",))
        with torch.no_grad():
            while True:
                if not pending:
                    pending.append(requests.recv())
                while requests.poll(0):  # what has queued up: is the head already stale?
                    pending.append(requests.recv())
                msg = pending.popleft()
                kind = msg[0]
                behind = any(m[0] in NEWER for m in pending)  # a newer token (or sequence) is waiting
                if kind == "stop":
                    return
                if kind == "reset":
                    state = None
                elif kind == "prompt":
                    ids, routing = (torch.as_tensor(a) for a in msg[1:])
                    state = model.init_state(ids.shape[0])
                    model.context(ids, torch.cat([torch.full_like(routing[:, :1], -1), routing[:, :-1]], 1), state)
                elif kind == "token":
                    step, ids, prev = msg[1], torch.as_tensor(msg[2]), torch.as_tensor(msg[3])
                    if state is None or state.batch_size != len(ids):
                        state, prev = model.init_state(len(ids)), None
                    ctx = model.step(state, ids, prev if state.position else None)  # always: the state needs it
                    known = torch.full((len(ids), 1, c.num_layers, c.top_k), -1, dtype=torch.long)
                    if behind:
                        continue
                    if h is None:
                        logits = model.logits(ctx, known[:, :, :0], None, state)[:, 0]  # (B, L, E)
                        for layer in range(c.num_layers):
                            send(step, layer, logits[:, layer])
                    for layer in range(min(h or 0, c.num_layers)):
                        send(step, layer, one_layer(ctx, known[:, :, :0], layer, state))
                elif kind == "routed":
                    if behind:
                        continue
                    step, layer, routing = msg[1], msg[2], torch.as_tensor(msg[3])
                    known[:, 0, layer] = routing
                    send(step, layer + h, one_layer(ctx, known[:, :, : layer + 1], layer + h, state))
                else:
                    raise ValueError(f"predictor worker: unknown message {kind!r}")
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the runtime went away
        return
    except Exception:  # noqa: BLE001  (reported to the runtime, which raises it)
        replies.send(("error", traceback.format_exc()))


class PredictorWorker:
    """A started worker process serving `predictor` (an ExpertPredictor; its tensors are shared with the
    process, not copied). `send` and `replies` never wait on the worker; `replies(wait=True)` waits for
    one reply, at most `timeout_s`. A failed or vanished worker raises RuntimeError at the next call."""

    def __init__(self, predictor, budget: int, threads: int = 1, timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")  # forking a process that has started torch threads can deadlock
        req_out, self._requests = ctx.Pipe(duplex=False)
        self._replies, rep_in = ctx.Pipe(duplex=False)
        if next(predictor.parameters()).device.type != "cpu":  # a host copy: the caller's module stays put
            predictor = copy.deepcopy(predictor).cpu()
        self.proc = ctx.Process(target=_serve, args=(req_out, rep_in, predictor, budget, threads), daemon=True)
        self.proc.start()
        req_out.close()
        rep_in.close()
        self.timeout_s = timeout_s
        self._error: str | None = None  # once the worker has failed or gone: every later call raises this
        self._inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)  # replies never back up in the pipe
        self._reader.start()
        try:
            self.replies(wait=True)  # ("ready",) once loaded
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        try:
            while True:
                self._inbox.put(self._replies.recv())
        except (EOFError, OSError):
            self._inbox.put(("eof",))

    def send(self, *msg) -> None:
        if self._error is not None:
            raise RuntimeError(self._error)
        try:
            self._requests.send(msg)
        except (BrokenPipeError, OSError):
            self._dead()

    def replies(self, wait: bool = False) -> list[tuple]:
        """The replies that have arrived (with `wait`, at least one)."""
        if self._error is not None:
            raise RuntimeError(self._error)
        out = []
        try:
            if wait:
                out.append(self._inbox.get(timeout=self.timeout_s))
            while True:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            if wait and not out:
                raise RuntimeError(f"predictor worker: no reply in {self.timeout_s:.0f} s") from None
        for reply in out:
            if reply[0] in ("error", "eof"):
                self._dead(reply)
        return [r for r in out if r[0] == "picks"]

    def _dead(self, reply: tuple | None = None) -> None:
        """Raise the worker's own error if it sent one, else say it has gone."""
        while reply is None or reply[0] != "error":
            try:
                reply = self._inbox.get(timeout=1.0)
            except queue.Empty:
                break
            if reply[0] == "eof":
                reply = None
        if reply is not None and reply[0] == "error":
            self._error = f"predictor worker failed:\n{reply[1]}"
        else:
            self.proc.join(1.0)
            self._error = f"predictor worker exited (exit code {self.proc.exitcode})"
        raise RuntimeError(self._error)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self._requests.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        self._requests.close()
        self._reader.join(5)  # it ends at the worker's end of the pipe
        self._replies.close()
