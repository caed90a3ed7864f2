"""LayerSteps (predictor/layer_steps.py): every per-layer call of a decode equals model.logits, also when a
call has less routing than its layer reads, asks for an earlier layer, or gets another routing."""

import pytest
import torch

from predictor.layer_steps import LayerSteps, supports
from tests.test_model import L, V, batch, make

VARIANTS = [
    (1, {}),
    (1, {"depth_last": True}),
    (2, {"depth_last": True}),
    (3, {"skip_tables": False}),
    (1, {"bank": True}),
    (1, {"bank": True, "depth_last": True, "bank_recent": 3}),  # the Puffin experiment's shape, no depth attention
    (2, {"bank": True, "bank_recent": 3, "skip_tables": False}),
]


@pytest.mark.parametrize("h,kw", VARIANTS)
def test_every_call_of_a_decode_equals_model_logits(h, kw):
    """Decode 7 tokens of 2 sequences as the runtime does (integrate/runtime/prefetch.py LayerAhead): per
    token the step, then layers < h with no routing, then layer l + h once layer l has routed (-1 beyond)."""
    model = make("layer_ahead", h, depth_blocks=0, **kw)
    assert supports(model)
    steps = LayerSteps(model)
    ids, ex = batch(B=2, T=7)
    ring_rows = 0  # candidate rows from the prompt's own earlier tokens (bank_recent), over the decode
    with torch.no_grad():
        full = model(ids, ex)
        state = model.init_state(batch_size=2)
        for t in range(ids.shape[1]):
            ctx = model.step(state, ids[:, t], ex[:, t - 1] if t else None)
            known = torch.full_like(ex[:, t : t + 1], -1)  # (B, 1, L, k)
            for layer in range(L):
                if layer >= h:
                    known[:, :, layer - h] = ex[:, t : t + 1, layer - h]
                routed = known[:, :, : max(0, layer - h + 1)] if layer >= h else known[:, :, :0]
                got = steps(ctx, routed, layer, state)
                want = model.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got, full[:, t, layer], atol=1e-5, rtol=1e-4)
            if kw.get("bank_recent"):
                ring_rows += int(torch.isfinite(steps._mask[:, -3:]).sum())
    if kw.get("bank_recent"):
        assert ring_rows > 0  # the repeated ids (batch()) made the ring's rows candidates


@pytest.mark.parametrize("h,kw", [v for v in VARIANTS if v[1].get("bank")])
def test_one_sequence_reads_its_bank_rows_in_place(h, kw):
    """Batch 1, the serving case, takes its token's bank rows as a slice of the bank and only the recent rows
    it may read: still model.logits, also for a token with no bank rows, a padding id (-1), and bank rows
    holding -1."""
    model = make("layer_ahead", h, depth_blocks=0, **kw)
    bank = model.bank
    v = int(torch.nonzero(bank.offsets[1:] > bank.offsets[:-1])[0, 0])  # the first id with bank rows
    bank.experts[bank.offsets[v], 1] = -1  # one of its rows lacks layer 1's routing
    steps = LayerSteps(model)
    ids, ex = batch(B=1, T=9)
    ids[0, 2], ids[0, 3], ids[0, 5] = v, V - 1, -1  # V - 1: no bank rows (tests/test_model.bank_data)
    with torch.no_grad():
        state = model.init_state(batch_size=1)
        for t in range(ids.shape[1]):
            ctx = model.step(state, ids[:, t], ex[:, t - 1] if t else None)
            known = torch.full_like(ex[:, t : t + 1], -1)
            for layer in range(L):
                if layer >= h:
                    known[:, :, layer - h] = ex[:, t : t + 1, layer - h]
                routed = known[:, :, : max(0, layer - h + 1)] if layer >= h else known[:, :, :0]
                want = model.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]
                torch.testing.assert_close(steps(ctx, routed, layer, state), want, atol=1e-5, rtol=1e-4)


def test_calls_the_running_sums_cannot_answer():
    """Less routing than the layer reads, an earlier layer after a later one, a routing that changes an
    already summed layer, and a new token: each equals model.logits on a fresh context."""
    h = 1
    model = make("layer_ahead", h, depth_blocks=0, depth_last=True, bank=True, bank_recent=3)
    steps = LayerSteps(model)
    ids, ex = batch(B=2, T=2)
    with torch.no_grad():
        state = model.init_state(batch_size=2)
        for t in range(2):
            ctx = model.step(state, ids[:, t], ex[:, t - 1] if t else None)
            cur = ex[:, t : t + 1]
            other = cur.clone()
            other[:, :, 0] = (other[:, :, 0] + 1) % 12
            for layer, routed in ((L - 1, cur[:, :, :1]), (2, cur[:, :, :2]), (3, other[:, :, :3]),
                                  (L - 1, cur[:, :, : L - 1]), (2, cur[:, :, :2]), (4, cur)):
                got = steps(ctx, routed, layer, state)
                want = model.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_refuses_what_it_does_not_compute():
    for kw in ({"depth_blocks": 1}, {"depth_blocks": 0, "memory": True}, {"depth_blocks": 1, "bank": True}):
        model = make("layer_ahead", 1, **kw)
        assert not supports(model)
        with pytest.raises(ValueError, match="depth_blocks=0"):
            LayerSteps(model)
    assert not supports(make("token_ahead", 1))
