"""The predictor in a worker process, off the runtime's host thread.

At batch 1 the offloading runtime is bound by its host thread (docs/RESULTS.md: on the H100 replay
the host spends about 1.3 ms per layer launching work while the GPU computes 0.2 ms), so every
millisecond a predictor call blocks that thread is a millisecond per token lost; the simulator finds
predictor prefetch slower than LRU for any per-layer call above about 0.1 ms. In a worker process the
calls run on another core: the host thread only sends each token's id and each layer's routing (a
few hundred bytes through a pipe) and picks up the top-k picks when they are back, so what it pays is
the messages, whatever the predictor costs, as long as the picks come back before their layer.

Messages to the worker (tuples; numpy arrays): ("reset",) a new sequence; ("prompt", token_ids (B, S),
routing (B, S, L, k)) a prompt enters a new state; ("token", step, token_ids (B,), prev (B, L, k)) a decode token: its step, and
the picks it can give at once (token_ahead: every layer; layer_ahead: layers < h); ("routed", step,
layer, routing (B, k)) layer l routed: the picks for l + h; ("stop",). Replies: ("picks", step, layer,
values (B, budget), ids (B, budget)), ("ready",) once loaded, ("error", text) for any failure (the
worker then exits). Picks are predicted as `PredictorDriver` predicts them (predictor/layer_steps.py
for a layer_ahead predictor without depth attention, else `model.logits`).
"""

from __future__ import annotations

import traceback

import torch
import torch.multiprocessing as mp


def _serve(conn, predictor, budget: int, threads: int) -> None:
    """The worker's loop: one message at a time, in order."""
    try:
        from predictor.layer_steps import LayerSteps, supports

        torch.set_num_threads(threads)
        model = predictor.eval()
        c = model.config
        h = c.lookahead if c.mode == "layer_ahead" else None
        layer_logits = LayerSteps(model) if supports(model) else (
            lambda ctx, routed, layer, state: model.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0])
        state = ctx = known = None

        def send(step: int, layer: int, logits: torch.Tensor) -> None:
            top = logits.topk(budget, dim=-1)
            conn.send(("picks", step, layer, top.values.float().numpy(), top.indices.numpy()))

        conn.send(("ready",))
        with torch.no_grad():
            while True:
                msg = conn.recv()
                kind = msg[0]
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
                    ctx = model.step(state, ids, prev if state.position else None)
                    known = torch.full((len(ids), 1, c.num_layers, c.top_k), -1, dtype=torch.long)
                    if h is None:
                        logits = model.logits(ctx, known[:, :, :0], None, state)[:, 0]  # (B, L, E)
                        for layer in range(c.num_layers):
                            send(step, layer, logits[:, layer])
                    for layer in range(min(h or 0, c.num_layers)):
                        send(step, layer, layer_logits(ctx, known[:, :, :0], layer, state))
                elif kind == "routed":
                    step, layer, routing = msg[1], msg[2], torch.as_tensor(msg[3])
                    known[:, 0, layer] = routing
                    send(step, layer + h, layer_logits(ctx, known[:, :, : layer + 1], layer + h, state))
                else:
                    raise ValueError(f"predictor worker: unknown message {kind!r}")
    except (EOFError, KeyboardInterrupt):  # the runtime went away
        return
    except Exception:  # noqa: BLE001  (reported to the runtime, which raises it)
        conn.send(("error", traceback.format_exc()))


class PredictorWorker:
    """A started worker process serving `predictor` (an ExpertPredictor; its tensors are shared with the
    process, not copied). `send` and `replies` never wait; `wait_for` blocks until a given reply."""

    def __init__(self, predictor, budget: int, threads: int = 1, timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")  # forking a process that has started torch threads can deadlock
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, predictor.cpu(), budget, threads), daemon=True)
        self.proc.start()
        child.close()
        self.timeout_s = timeout_s
        if not self.conn.poll(timeout_s):
            self.close()
            raise RuntimeError(f"predictor worker: not ready after {timeout_s:.0f} s")
        self._check(self.conn.recv())

    def send(self, *msg) -> None:
        self.conn.send(msg)

    def replies(self, wait: bool = False) -> list[tuple]:
        """The replies that have arrived (with `wait`, at least one)."""
        out = []
        while self.conn.poll(self.timeout_s if wait and not out else 0):
            out.append(self._check(self.conn.recv()))
        if wait and not out:
            raise RuntimeError(f"predictor worker: no reply in {self.timeout_s:.0f} s")
        return out

    @staticmethod
    def _check(reply: tuple) -> tuple:
        if reply[0] == "error":
            raise RuntimeError(f"predictor worker failed:\n{reply[1]}")
        return reply

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        self.conn.close()

