"""The predictor worker process (integrate/runtime/predictor_worker.py) and its shared-memory ring
(shm_ring.py): it skips what is stale when it falls behind, never deadlocks, drops only the replies the
host leaves unread too long, and its failures reach the host with their traceback."""

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch.multiprocessing as mp
from synthetic import tiny_predictor

from integrate.runtime import predictor_worker
from integrate.runtime.async_prefetch import AsyncPredictor
from integrate.runtime.counters import Counters
from integrate.runtime.interrupts import deferred_interrupt
from integrate.runtime.predictor_worker import PredictorWorker
from integrate.runtime.shm_ring import Ring

L, E, K, V = 4, 10, 2, 40


def worker(**kw):
    model = tiny_predictor(vocab_size=V, num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=1, **kw)
    return PredictorWorker(model, budget=K, timeout_s=60)


def _echo(ring_in: Ring, ring_out: Ring) -> None:
    """In another process: copy records from one ring to the other, each plus one, until a record -1."""
    while (rec := ring_in.get(None))[0] != -1:
        ring_out.put(tuple(rec + 1), timeout=None)


def test_a_ring_keeps_order_and_bounds_across_processes():
    ctx = mp.get_context("spawn")
    a, b = Ring(ctx, 4, 3), Ring(ctx, 4, 3)
    assert all(a.put((i, 2 * i), (np.array([7]),)) for i in range(4))
    assert not a.put((9, 9))  # full: refused at once, nothing overwritten
    with pytest.raises(TypeError):  # a record that cannot be written is refused before it takes a slot
        b.put((1, None))
    assert b.free.get_value() == 4
    assert b.get(0) is None  # empty
    p = ctx.Process(target=_echo, args=(a, b), daemon=True)
    p.start()
    try:
        got = [b.get(30).tolist() for _ in range(4)]
        assert got == [[i + 1, 2 * i + 1, 8] for i in range(4)]
        for i in range(10):  # more records than slots: each slot reused in order
            assert a.put((100 + i, 0, 0), timeout=30)
            assert b.get(30).tolist() == [101 + i, 1, 1]
        a.put((-1, 0, 0), timeout=30)
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.terminate()


def token_messages(step: int, B: int, rng) -> list[tuple]:
    """A decode token's messages as the async driver sends them: the token, then layers 0..L-2 routed."""
    msgs = [("token", step, rng.integers(0, V, B), rng.integers(0, E, (B, L, K)))]
    return msgs + [("routed", step, layer, rng.integers(0, E, (B, K))) for layer in range(L - 1)]


def send_token(w: PredictorWorker, step: int, B: int, rng) -> None:
    for msg in token_messages(step, B, rng):
        w.send(*msg)


def replies_until(w: PredictorWorker, step: int) -> list[tuple]:
    """Every reply that arrives until all L of token `step`'s picks have."""
    got = []
    while sum(r[1] == step for r in got) < L:
        got += w.replies(wait=True)
    return got


def wait_answered(w: PredictorWorker, n: int) -> None:
    """Until the worker has sent or dropped n replies in all (at most 30 s)."""
    deadline = time.monotonic() + 30
    while w._replies.used.get_value() + int(w.dropped[0]) < n and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_worker_behind_skips_the_stale_tokens_layers():
    """A prompt and three tokens' messages queue up while the worker is stopped (SIGSTOP: the queue is there
    before it reads, whatever the machine's load): it steps every token (its state needs them) but
    predicts only for the newest, all of whose L picks come back."""
    rng = np.random.default_rng(0)
    w = worker()
    try:
        os.kill(w.proc.pid, signal.SIGSTOP)
        try:
            w.send("prompt", rng.integers(0, V, (2, 100)), rng.integers(0, E, (2, 100, L, K)))  # within a pipe's buffer
            for step in (1, 2, 3):
                send_token(w, step, 2, rng)
        finally:
            os.kill(w.proc.pid, signal.SIGCONT)
        got = replies_until(w, 3)
        assert {r[1] for r in got} == {3} and sorted(r[2] for r in got) == list(range(L))
        assert all(r[3].shape == r[4].shape == (2, K) for r in got)
    finally:
        w.close()
    assert not w.proc.is_alive()


def test_a_terminals_ctrl_c_leaves_the_worker_serving():
    """SIGINT reaches the whole process group; a host that catches it and decodes on keeps its worker."""
    rng = np.random.default_rng(1)
    w = worker()
    try:
        w.send("prompt", rng.integers(0, V, (1, 20)), rng.integers(0, E, (1, 20, L, K)))
        send_token(w, 1, 1, rng)
        replies_until(w, 1)  # serving: the handler is in place
        os.kill(w.proc.pid, signal.SIGINT)
        send_token(w, 2, 1, rng)
        assert {r[1] for r in replies_until(w, 2)} >= {2} and w.proc.is_alive()
    finally:
        w.close()
    assert not w.proc.is_alive()


def test_the_ctrl_c_deferral_leaves_the_programs_handlers_as_they_were():
    """Held to the end of the outermost block and handed to the handler in place, which is back after
    every block: a handler that chains to the one before it, or a saved one restored, works as it would
    without the rings (a deferral that stayed installed broke both: a recursion, a swallowed Ctrl-C)."""
    got = []
    mine = lambda signum, frame: got.append("mine")  # noqa: E731
    usual = signal.signal(signal.SIGINT, mine)
    try:
        with deferred_interrupt():
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            assert got == []
        assert got == ["mine"] and signal.getsignal(signal.SIGINT) is mine
        before = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda signum, frame: got.append("chain") or before(signum, frame))
        with deferred_interrupt():
            pass
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert got == ["mine", "chain", "mine"]
        saved = signal.signal(signal.SIGINT, lambda signum, frame: got.append("temporary"))
        with deferred_interrupt():
            pass
        signal.signal(signal.SIGINT, saved)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert got[-2:] == ["chain", "mine"]
    finally:
        signal.signal(signal.SIGINT, usual)


def test_a_ctrl_c_inside_a_ring_operation_waits_for_its_end():
    """A SIGINT that lands between taking a slot and handing it on is raised once the record is whole, so
    a host that catches it and decodes on finds both rings in step (free + used = slots)."""
    ring = Ring(mp.get_context("spawn"), 4, 3)
    sem_take = ring.free.acquire

    def take_then_interrupt(*args):
        got = sem_take(*args)
        os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of put
        return got

    ring.free = SimpleNamespace(acquire=take_then_interrupt, get_value=ring.free.get_value, release=ring.free.release)
    with pytest.raises(KeyboardInterrupt):
        ring.put((1, 2, 3))
    assert ring.used.get_value() == 1 and ring.free.get_value() == 3 and ring._pos == 1  # the record went in
    ring._pos = 0  # now the reading side (in the runtime, the other process's copy of the ring)
    assert ring.get().tolist() == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back in place
    w = worker()
    w.close()  # a closed worker drops its rings at once and refuses to be used
    assert w._requests is None and w._replies is None and not w.proc.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        w.send("reset")


def test_unread_replies_never_block_the_host():
    """Replies the host does not read for a while, batch-8 tokens (too large for a record: through the pipe),
    then a prompt larger than a pipe holds: the worker never waits for the host to read, so both move."""
    rng = np.random.default_rng(1)
    w = worker()
    done = threading.Event()

    def run():
        for step in range(1, 61):
            send_token(w, step, 8, rng)
        w.send("reset")
        w.send("prompt", rng.integers(0, V, (8, 512)), rng.integers(0, E, (8, 512, L, K)))
        send_token(w, 99, 8, rng)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    try:
        assert done.is_set(), "the host blocked sending to the worker"
        replies_until(w, 99)
    finally:
        w.close()


def test_replies_left_unread_too_long_are_dropped_and_the_worker_goes_on(monkeypatch):
    """A reply ring of 64 records and 20 tokens' replies (80) unread, each token sent once the worker is done
    with the one before: it drops exactly the 16 that do not fit (counted once in the runtime's counters),
    and serves the next token as soon as the host reads again."""
    monkeypatch.setattr(predictor_worker, "RING_BYTES", 1)  # the least ring: 64 records
    rng = np.random.default_rng(2)
    w = worker()
    try:
        for step in range(1, 21):
            send_token(w, step, 1, rng)
            wait_answered(w, L * step)
        assert int(w.dropped[0]) == 20 * L - 64
        # the runtime's driver counts them once each, at its next token and at close
        driver = AsyncPredictor.__new__(AsyncPredictor)
        driver.worker, driver.cache, driver.dropped_seen = w, SimpleNamespace(counters=Counters()), 0
        driver.count_dropped()
        driver.count_dropped()
        assert driver.cache.counters.predictions_dropped == 20 * L - 64
        assert "dropped predictions 16" in driver.cache.counters.summary()
        assert len(w.replies()) == 64
        send_token(w, 21, 1, rng)
        got = replies_until(w, 21)
        assert {r[1] for r in got} == {21} and sorted(r[2] for r in got) == list(range(L))
    finally:
        w.close()


def test_the_reply_ring_holds_two_tokens_replies_however_many_layers(monkeypatch):
    """With the least ring (64 records) and a predictor of 40 layers, two tokens' 80 replies left unread all
    fit: a ring of fewer records than a token's replies would drop picks of a token the host is decoding."""
    monkeypatch.setattr(predictor_worker, "RING_BYTES", 1)
    layers, rng = 40, np.random.default_rng(4)
    model = tiny_predictor(vocab_size=V, num_layers=layers, num_experts=E, top_k=K, mode="layer_ahead", lookahead=1)
    w = PredictorWorker(model, budget=E, timeout_s=60)
    try:
        assert w._replies.free.get_value() == 2 * layers
        for step in (1, 2):
            w.send("token", step, rng.integers(0, V, 1), rng.integers(0, E, (1, layers, K)))
            for layer in range(layers - 1):
                w.send("routed", step, layer, rng.integers(0, E, (1, K)))
            wait_answered(w, layers * step)
        assert int(w.dropped[0]) == 0
        got = w.replies()
        assert sorted((r[1], r[2]) for r in got) == [(s, j) for s in (1, 2) for j in range(layers)]
    finally:
        w.close()


def test_a_batch_larger_than_a_reply_record_is_refused_and_piped_messages_never_block(monkeypatch):
    """Replies are one record each, so the host refuses a batch they cannot hold, naming it. With every reply
    left unread past a full ring, batch-2 tokens (through the pipe, their layers inline) and a large prompt
    still go out: the worker never waits for the host to read."""
    monkeypatch.setattr(predictor_worker, "MAX_BATCH", 2)
    monkeypatch.setattr(predictor_worker, "BATCH_INLINE", 1)  # a batch-2 token goes through the pipe
    monkeypatch.setattr(predictor_worker, "RING_BYTES", 1)  # the least rings: 64 records
    rng = np.random.default_rng(3)
    w = worker()
    try:
        with pytest.raises(ValueError, match="a batch of 3 sequences; it serves at most 2"):
            w.send(*token_messages(1, 3, rng)[0])
        done = threading.Event()

        def run():
            for step in range(1, 60):  # 236 replies: more than the ring holds, none read
                send_token(w, step, 2, rng)
                wait_answered(w, L * step)  # the worker done with each token, so none is skipped as stale
            w.send("prompt", rng.integers(0, V, (2, 2000)), rng.integers(0, E, (2, 2000, L, K)))
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(60)
        assert done.is_set(), "the host blocked sending to the worker"
        assert int(w.dropped[0]) == 59 * L - 64  # the ring was full: the worker dropped, never waited
        w.replies()
        send_token(w, 500, 2, rng)
        got = replies_until(w, 500)
        assert all(r[3].shape == r[4].shape == (2, K) for r in got if r[1] == 500)
    finally:
        w.close()


def test_a_failed_worker_raises_its_error_at_the_next_call():
    w = worker()
    with pytest.raises(RuntimeError, match="exited"):  # one that has gone without a word
        w.proc.terminate()
        w.proc.join(5)
        for _ in range(3):
            w.send("reset")
            w.replies(wait=True)
    w.close()
    w = worker()
    try:
        w.send("token", 1, np.array([V + 5]), np.zeros((1, L, K), dtype=np.int64))  # a token id outside the vocabulary
        with pytest.raises(RuntimeError, match="(?s)predictor worker failed.*IndexError"):
            w.replies(wait=True)
        with pytest.raises(RuntimeError, match="(?s)predictor worker failed.*IndexError"):  # and at every call after
            w.send("reset")
    finally:
        w.close()


def test_bad_messages_are_refused_by_name_and_leave_the_order_intact():
    """Each refused before it takes a record: a message of the wrong shape, an unknown kind, one that cannot be
    pickled for the pipe, a budget out of range. The worker then serves the next token as if none was sent."""
    rng = np.random.default_rng(4)
    w = worker()
    try:
        token = token_messages(1, 1, rng)[0]
        with pytest.raises(ValueError, match=r"a 'token' message is 4 fields.*\('B', 4, 2\).*got 4 fields, arrays \[\(1,\), 'object'\]"):
            w.send("token", 1, token[2], None)
        with pytest.raises(ValueError, match=r"'routed' message .*\('B', 2\).*arrays \[\(1, 3\)\]"):
            w.send("routed", 1, 0, rng.integers(0, E, (1, 3)))
        with pytest.raises(ValueError, match="unknown message 'bogus'"):
            w.send("bogus")
        with pytest.raises(TypeError, match="pickle"):  # integers, but not a picklable object: for the pipe
            w.send("prompt", memoryview(rng.integers(0, V, (1, 4))), rng.integers(0, E, (1, 4, L, K)))
        assert w._requests.free.get_value() == len(w._requests.table)  # none of them took a record
        send_token(w, 2, 1, rng)
        got = replies_until(w, 2)
        assert {r[1] for r in got} == {2} and sorted(r[2] for r in got) == list(range(L))
    finally:
        w.close()
    for budget in (0, E + 1):
        with pytest.raises(ValueError, match=rf"budget \(picks per layer\) must be in \[1, {E}\], got {budget}"):
            PredictorWorker(tiny_predictor(vocab_size=V, num_layers=L, num_experts=E, top_k=K), budget=budget)
