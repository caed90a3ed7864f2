"""What runs in the predictor's worker process: the loop that reads the runtime's messages from a
shared-memory ring and writes the picks back (the protocol: predictor_worker.py, the host's side)."""

from __future__ import annotations

import signal
import traceback
from collections import deque

import numpy as np
import torch
import torch.multiprocessing as mp

from integrate.runtime.shm_ring import Ring

NEWER = ("token", "reset", "prompt", "stop")  # messages after which a queued token's layers are stale
RESET, TOKEN, ROUTED, STOP, PIPED, PICKS, READY, FAILED = range(8)  # record kinds
HEAD = 5  # record header: kind, step, layer, B, n


# each message's integer arrays, by shape (B sequences, S positions: any), after its kind and ints (step, layer)
ARRAYS = {"reset": (), "stop": (), "token": (("B",), ("B", "L", "k")), "routed": (("B", "k"),),
          "prompt": (("B", "S"), ("B", "S", "L", "k"))}  # fmt: skip
FIELDS = {"reset": 1, "stop": 1, "token": 4, "routed": 4, "prompt": 3}


def check_message(msg: tuple, L: int, k: int) -> None:
    """Refuse a message the worker could not serve, naming what is wrong, before any of it is sent."""
    kind = msg[0]
    if kind == "routed" and len(msg) == 4:  # each layer's: the shortest path for the common case
        r = msg[3]
        if isinstance(r, np.ndarray) and r.ndim == 2 and r.shape[1] == k and r.dtype.kind in "iu":
            return
    if kind not in ARRAYS:
        raise ValueError(f"predictor worker: unknown message {kind!r}; one of {sorted(ARRAYS)}")
    want = [tuple({"L": L, "k": k}.get(d, d) for d in shape) for shape in ARRAYS[kind]]
    arrays = [np.asarray(a) for a in msg[FIELDS[kind] - len(want) :]] if len(msg) == FIELDS[kind] else []
    ok = len(msg) == FIELDS[kind] and all(
        a.dtype.kind in "iu" and a.ndim == len(w) and all(d in ("B", "S") or d == n for d, n in zip(w, a.shape))
        for a, w in zip(arrays, want))  # fmt: skip
    if ok and len(arrays) == 2:  # token and prompt: the routing of the same sequences (and positions)
        ok = arrays[0].shape == arrays[1].shape[: arrays[0].ndim]
    if not ok:
        got = [tuple(a.shape) if a.dtype.kind in "iu" else str(a.dtype) for a in arrays]
        raise ValueError(f"predictor worker: a {kind!r} message is {FIELDS[kind]} fields, its arrays integers "
                         f"shaped {want} (L={L} layers, k={k}); got {len(msg)} fields, arrays {got}")


def next_message(ring: Ring, pipe, L: int, timeout: float | None) -> tuple | None:
    """The worker's next message, or None when none comes within `timeout` seconds."""
    rec = ring.get(timeout)
    if rec is None:
        return None
    kind, step, layer, B, n = rec[:HEAD].tolist()
    data = rec[HEAD : HEAD + n]
    if kind == TOKEN:
        return "token", step, data[:B], data[B:].reshape(B, L, -1)
    if kind == ROUTED:
        return "routed", step, layer, data.reshape(B, -1)
    return pipe.recv() if kind == PIPED else {RESET: ("reset",), STOP: ("stop",)}.get(kind, (f"record kind {kind}",))


def serve(requests: Ring, replies: Ring, pipe_in, pipe_out, dropped, predictor, budget: int, threads: int) -> None:
    """The worker's loop: messages in order, the stale ones skipped (predictor_worker.py's docstring)."""
    # a terminal's Ctrl-C reaches the whole process group: the host decides when this worker stops (STOP,
    # or its own exit), so a host that catches the interrupt and decodes on keeps a live worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from predictor.layer_steps import layer_logits

        torch.set_num_threads(threads)
        model = predictor.eval()
        c = model.config
        h = c.lookahead if c.mode == "layer_ahead" else None
        one_layer = layer_logits(model)
        state = ctx = known = None
        pending: deque = deque()
        parent = mp.parent_process()

        def send(step: int, layer: int, logits: torch.Tensor) -> None:
            top = logits.topk(budget, dim=-1)
            values, ids = top.values.float().numpy(), top.indices.numpy()
            # one record (the host refuses batches too large for one); never waiting for the host to read
            if not replies.put((PICKS, step, layer, len(ids), ids.size), (ids, values.astype(np.float64).view(np.int64))):
                dropped[0] += 1  # the host has left a whole ring unread: it is not decoding now

        replies.put((READY, 0, 0, 0, 0))
        with torch.no_grad():
            while True:
                while not pending:  # wait for the next message; a second at a time, so a dead host is noticed
                    msg = next_message(requests, pipe_in, c.num_layers, 1.0)
                    if msg is not None:
                        pending.append(msg)
                    elif not parent.is_alive():
                        return
                while (msg := next_message(requests, pipe_in, c.num_layers, 0)) is not None:  # what has queued up
                    pending.append(msg)
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
        pipe_out.send(("error", traceback.format_exc()[-16000:]))  # within what a pipe holds unread
        replies.put((FAILED, 0, 0, 0, 0), timeout=1.0)
