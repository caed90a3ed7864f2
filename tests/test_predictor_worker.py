"""The predictor worker process (integrate/runtime/predictor_worker.py): it skips what is stale when it
falls behind, never deadlocks on a full pipe, and its failures reach the host with their traceback."""

import threading

import numpy as np
import pytest
from synthetic import tiny_predictor

from integrate.runtime.predictor_worker import PredictorWorker

L, E, K, V = 4, 10, 2, 40


def worker(**kw):
    model = tiny_predictor(vocab_size=V, num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=1, **kw)
    return PredictorWorker(model, budget=K, timeout_s=60)


def token_messages(step: int, B: int, rng) -> list[tuple]:
    """A decode token's messages as the async driver sends them: the token, then layers 0..L-2 routed."""
    msgs = [("token", step, rng.integers(0, V, B), rng.integers(0, E, (B, L, K)))]
    return msgs + [("routed", step, layer, rng.integers(0, E, (B, K))) for layer in range(L - 1)]


def test_a_worker_behind_skips_the_stale_tokens_layers():
    """A long prompt keeps the worker busy while three tokens' messages queue up: it steps every token (its
    state needs them) but predicts only for the newest, all of whose L picks come back."""
    rng = np.random.default_rng(0)
    w = worker()
    try:
        w.send("prompt", rng.integers(0, V, (2, 3000)), rng.integers(0, E, (2, 3000, L, K)))
        for step in (1, 2, 3):
            for msg in token_messages(step, 2, rng):
                w.send(*msg)
        got = []
        while sum(r[1] == 3 for r in got) < L:
            got += w.replies(wait=True)
        assert {r[1] for r in got} == {3} and sorted(r[2] for r in got) == list(range(L))
        assert all(r[3].shape == r[4].shape == (2, K) for r in got)
    finally:
        w.close()
    assert not w.proc.is_alive()


def test_unread_replies_never_block_the_host():
    """Replies the host does not read for a while (more than a pipe holds), then a prompt larger than a pipe:
    the host's thread that reads replies keeps both sides moving."""
    rng = np.random.default_rng(1)
    w = worker()
    done = threading.Event()

    def run():
        for step in range(1, 61):
            for msg in token_messages(step, 8, rng):
                w.send(*msg)
        w.send("reset")
        w.send("prompt", rng.integers(0, V, (8, 512)), rng.integers(0, E, (8, 512, L, K)))
        for msg in token_messages(99, 8, rng):
            w.send(*msg)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    try:
        assert done.is_set(), "the host blocked sending to the worker"
        got = []
        while sum(r[1] == 99 for r in got) < L:
            got += w.replies(wait=True)
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
        w.send("bogus")
        with pytest.raises(RuntimeError, match="(?s)predictor worker failed.*unknown message 'bogus'"):
            w.replies(wait=True)
        with pytest.raises(RuntimeError, match="unknown message 'bogus'"):  # and at every call after it
            w.send("reset")
    finally:
        w.close()
