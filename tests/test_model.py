"""ExpertPredictor: config validation, causality (no input leaks what it predicts), incremental = full."""

import numpy as np
import pytest
import torch

from predictor.model import ExpertPredictor, PredictorConfig, PredictorConfigError
from predictor.state import Context

V, L, E, K = 50, 5, 12, 2


def make(mode="token_ahead", h=1, memory=False, bank=False, **kw) -> ExpertPredictor:
    if h == 3:  # one variant without the skip tables
        kw.setdefault("skip_tables", False)
    if memory:  # routing memory smaller than the test sequences, so its ring buffer wraps
        kw.update(memory_heads=2, memory_head_dim=4, memory_size=4)
    torch.manual_seed(0)
    cfg = PredictorConfig(
        vocab_size=V,
        num_layers=L,
        num_experts=E,
        top_k=K,
        mode=mode,
        lookahead=h,
        d_model=32,
        n_heads=4,
        n_blocks=2,
        depth_blocks=kw.pop("depth_blocks", 2),
        d_depth=16,
        depth_heads=2,
        bank_size=3 if bank else 0,  # at most 3 rows per token: the cap binds for some
        **kw,
    )
    model = ExpertPredictor(cfg).eval()
    if bank:
        model.bank.fill_from_rows(*bank_data())
    with torch.no_grad():  # zero-initialised parts (skip tables, start vector) must be exercised too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def bank_data(n=60, seed=0):
    """Random routing rows for a routing bank: token ids (V - 5 and up never occur), experts, sequences."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(n * L)]).reshape(n, L, K)
    return rng.integers(0, V - 5, n), experts, rng.integers(0, 4, n)


def batch(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[:, 4::3] = ids[:, 1:2]  # repeats: 4 and 7 hold token 1's id (the bank's recent rows read them)
    ex = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T * L)]).view(B, T, L, K)
    return ids, ex


MODELS = [
    ("token_ahead", 1),
    ("layer_ahead", 1),
    ("layer_ahead", 2),
    ("layer_ahead", 3),
    ("layer_ahead", 4),
    ("token_ahead", "memory"),  # routing memory (predictor/memory.py)
    ("layer_ahead", "memory"),  # h = 2, with routing memory
    ("layer_ahead", "memory-no-skip"),  # h = 3: memory without the skip tables
    ("layer_ahead", "last"),  # h = 1, depth positions also embed layer l - h alone
    ("layer_ahead", "memory-last"),  # h = 2, memory and depth_last
    ("layer_ahead", "bank"),  # h = 1 with a routing bank (predictor/bank.py)
    ("layer_ahead", "bank-memory-last"),  # h = 2 with memory and depth_last
    ("layer_ahead", "bank-recent"),  # h = 1: the Puffin layer_ahead experiment's shape (3 recent tokens)
    ("layer_ahead", "depth0-last"),  # h = 1, no depth attention (predictor/layer_steps.py serves it)
    ("layer_ahead", "depth0-bank"),  # h = 2, no depth attention, with a routing bank
]


def unpack(mode, h):
    """MODELS entry -> (lookahead, make() keywords)."""
    if h == "memory":
        return 2, {"memory": True}
    if h == "memory-no-skip":
        return 3, {"memory": True}
    if h == "last":
        return 1, {"depth_last": True}
    if h == "memory-last":
        return 2, {"memory": True, "depth_last": True}
    if h == "bank":
        return 1, {"bank": True}
    if h == "bank-memory-last":
        return 2, {"bank": True, "memory": True, "depth_last": True}
    if h == "depth0-last":
        return 1, {"depth_blocks": 0, "depth_last": True}
    if h == "depth0-bank":
        return 2, {"depth_blocks": 0, "bank": True}
    if h == "bank-recent":
        return 1, {"bank": True, "memory": True, "depth_last": True, "bank_recent": 3}
    return h, {}


@pytest.mark.parametrize("mode,h", MODELS)
def test_shapes(mode, h):
    h, kw = unpack(mode, h)
    model = make(mode, h, **kw)
    ids, ex = batch()
    assert model(ids, ex).shape == (3, 9, L, E)


def test_config_errors_name_the_key():
    with pytest.raises(PredictorConfigError, match="'mode'"):
        PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, mode="sideways").validate()
    with pytest.raises(PredictorConfigError, match="'lookahead'"):
        PredictorConfig(
            vocab_size=V, num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=0
        ).validate()
    with pytest.raises(PredictorConfigError, match="'top_k'"):
        PredictorConfig(vocab_size=V, num_layers=L, num_experts=4, top_k=5).validate()
    with pytest.raises(PredictorConfigError, match="'n_heads'"):
        PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, d_model=30, n_heads=4).validate()
    with pytest.raises(PredictorConfigError, match="'bank_recent'"):
        PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", bank_recent=4).validate()
    with pytest.raises(PredictorConfigError, match="unknown keys"):
        PredictorConfig.from_dict(
            {"vocab_size": V, "num_layers": L, "num_experts": E, "top_k": K, "bogus": 1}
        )


@pytest.mark.parametrize("mode,h", MODELS)
def test_no_leak(mode, h):
    """logits[:, t, l] must not change when anything it may not see changes."""
    h, kw = unpack(mode, h)
    model = make(mode, h, **kw)
    ids, ex = batch(B=2, T=8)
    with torch.no_grad():
        ref = model(ids, ex)
        g = torch.Generator().manual_seed(7)
        T = ids.shape[1]
        for t in range(T):
            # future tokens' ids and experts, and token t's own experts at every layer
            ids2, ex2 = ids.clone(), ex.clone()
            ids2[:, t + 1 :] = torch.randint(0, V, ids2[:, t + 1 :].shape, generator=g)
            ex2[:, t + 1 :] = torch.randint(0, E, ex2[:, t + 1 :].shape, generator=g)
            ex2[:, t + 1 :, :, 1] = -1  # padding in the future must not matter either
            for layer in range(L):
                ex3 = ex2.clone()
                first_hidden = layer - h + 1 if mode == "layer_ahead" else 0
                ex3[:, t, max(first_hidden, 0) :] = (ex3[:, t, max(first_hidden, 0) :] + 3) % E
                out = model(ids2, ex3)
                torch.testing.assert_close(
                    out[:, t, layer], ref[:, t, layer], msg=f"leak at t={t} layer={layer}"
                )
                torch.testing.assert_close(out[:, :t], ref[:, :t])


@pytest.mark.parametrize("mode,h", MODELS)
def test_uses_what_it_may_see(mode, h):
    """Sanity check of the leak test: allowed inputs do change predictions."""
    h, kw = unpack(mode, h)
    model = make(mode, h, **kw)
    ids, ex = batch(B=1, T=6)
    with torch.no_grad():
        ref = model(ids, ex)
        ex2 = ex.clone()
        ex2[:, 2] = (ex2[:, 2] + 1) % E  # token 2's experts: token 3 sees them
        assert not torch.allclose(model(ids, ex2)[:, 3], ref[:, 3])
        ids2 = ids.clone()
        ids2[:, 3] = (ids2[:, 3] + 1) % V  # token 3's own id
        assert not torch.allclose(model(ids2, ex)[:, 3], ref[:, 3])
        if mode == "layer_ahead" and h < L:
            ex3 = ex.clone()
            ex3[:, 3, 0] = (ex3[:, 3, 0] + 1) % E  # token 3's layer 0: layer h sees it
            assert not torch.allclose(model(ids, ex3)[:, 3, h], ref[:, 3, h])


@pytest.mark.parametrize("mode,h", MODELS)
def test_cache_equals_no_cache(mode, h):
    """One forward, with or without a state: whole sequences equal (a) serving one token at a time,
    layer by layer, from only the routing known at that point, (b) chunks of 3 tokens through
    `forward(..., state)` and (c) a prompt in one call then a token per call, as the runtime serves; (b) and
    (c) also with a row left-padded (its padding never attended to, by the trunk nor the routing memory;
    padding enters a state in a call of several tokens, `_served_mask`). MODELS covers each head alone and with each contributor (skip tables,
    routing memory whose ring wraps, routing bank, bank with recent rows)."""
    h, kw = unpack(mode, h)
    model = make(mode, h, **kw)
    plain = batch(B=2, T=7)
    left = plain[0].clone(), plain[1].clone()  # row 1 left-padded by 2 (a batch of prompts of two lengths)
    left[0][1, :2], left[1][1, :2] = -1, -1
    tol = dict(atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for ids, ex in (plain, left):
            full = model(ids, ex)
            state = model.init_state(batch_size=2)
            for t in range(ids.shape[1] if ids is plain[0] else 0):  # (padding enters in a call of several tokens)
                ctx = model.step(state, ids[:, t], ex[:, t - 1] if t else None)
                for layer in range(L):
                    known = max(0, layer - h + 1) if mode == "layer_ahead" else 0
                    cur = torch.full_like(ex[:, t : t + 1], -1)
                    cur[:, :, :known] = ex[:, t : t + 1, :known]  # only what the runtime knows at that point
                    out = model.logits(ctx, cur, slice(layer, layer + 1), state)
                    torch.testing.assert_close(out[:, 0, 0], full[:, t, layer], **tol)
            assert state.position == (ids.shape[1] if ids is plain[0] else 0)
            state = model.init_state(batch_size=2)
            chunks = [model(ids[:, a : a + 3], ex[:, a : a + 3], state) for a in range(0, ids.shape[1], 3)]
            torch.testing.assert_close(torch.cat(chunks, 1), full, **tol)
            # the runtime's way: the prompt in one trunk call, then a token per step (padding in the cache)
            state = model.init_state(batch_size=2)
            head = model(ids[:, :5], ex[:, :5], state)
            tail = [model(ids[:, t : t + 1], ex[:, t : t + 1], state) for t in range(5, ids.shape[1])]
            torch.testing.assert_close(torch.cat([head, *tail], 1), full, **tol)



def test_routing_of_another_top_k_is_refused():
    model = make("token_ahead")
    ids, ex = batch(B=1, T=3)
    with pytest.raises(ValueError, match=r"experts \(B, T, L=\d+, k=\d+\)"):
        model(ids, torch.cat([ex, ex[..., :1]], dim=-1))
    with pytest.raises(ValueError, match="token_ids must hold integer ids, got a torch.float32 tensor"):
        model(ids.float(), ex)  # was an error from inside the embedding, naming neither
    state = model.init_state(batch_size=1)
    model.step(state, ids[:, 0], None)
    with pytest.raises(ValueError, match=r"prev_experts must be \(B=1, L=\d+, k=\d+\)"):
        model.step(state, ids[:, 1], ex[:, 0, :, :1])


def test_kv_cache_grows_past_its_buffer():
    """The trunk's KV cache doubles its buffers when full (predictor/blocks.py append_kv): 150 steps
    (past 64 and 128 positions) equal the whole sequence in one forward; a shallow copy of a cache
    writes past the original's length without changing what the original holds."""
    from predictor.blocks import append_kv

    model = make("token_ahead")
    ids, ex = batch(B=1, T=150)
    with torch.no_grad():
        full = model(ids, ex)
        state = model.init_state(batch_size=1)
        steps = [model(ids[:, t : t + 1], ex[:, t : t + 1], state) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    cache, k = {}, torch.randn(1, 2, 70, 4)
    append_kv(cache, k[:, :, :60], k[:, :, :60])
    scratch = dict(cache)
    append_kv(scratch, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))  # not kept
    keys, _ = append_kv(cache, k[:, :, 60:], k[:, :, 60:])  # grows: 70 > 64
    assert torch.equal(keys, k) and cache["n"] == 70 and cache["k"].shape[2] == 128


def test_lookahead_and_step_errors():
    with pytest.raises(PredictorConfigError, match="'lookahead' must be below the number of MoE layers"):
        PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, mode="layer_ahead", lookahead=L)
    model = make("layer_ahead", 1)
    ids, ex = batch(B=1, T=2)
    state = model.init_state(1)
    with pytest.raises(ValueError, match="None at the first step"):
        model.step(state, ids[:, 0], ex[:, 0])
    model.step(state, ids[:, 0], None)
    with pytest.raises(ValueError, match="None at the first step"):
        model.step(state, ids[:, 1], None)
    with pytest.raises(IndexError, match="outside"):
        model.logits(state.ctx, ex[:, :1], slice(L, L + 1), state)


def test_padding():
    """Expert id -1 embeds to zero; padded tokens (-1), left or right, leave real predictions unchanged."""
    model = make("layer_ahead", 1)
    ids, ex = batch(B=1, T=6)
    with torch.no_grad():
        ref = model(ids, ex)
        pad = 3
        ids_r = torch.cat([ids, torch.full((1, pad), -1)], dim=1)
        ex_r = torch.cat([ex, torch.full((1, pad, L, K), -1)], dim=1)
        torch.testing.assert_close(model(ids_r, ex_r)[:, :6], ref)
        ids_l = torch.cat([torch.full((1, pad), -1), ids], dim=1)
        ex_l = torch.cat([torch.full((1, pad, L, K), -1), ex], dim=1)
        torch.testing.assert_close(model(ids_l, ex_l)[:, pad:], ref, atol=1e-5, rtol=1e-4)
        # a batch mixing a left-padded and an unpadded row
        ids_b = torch.cat([ids_l, torch.cat([ids, ids[:, :pad]], dim=1)])
        ex_b = torch.cat([ex_l, torch.cat([ex, ex[:, :pad]], dim=1)])
        out = model(ids_b, ex_b)
        torch.testing.assert_close(out[:1, pad:], ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1:, :6], ref, atol=1e-5, rtol=1e-4)
        assert torch.isfinite(out).all()


def test_memory_reads_earlier_routing():
    """The routing memory alone (other paths zeroed) copies an earlier token's routing at the same layer."""
    model = make("token_ahead", memory=True, skip_tables=False)
    with torch.no_grad():
        model.head.out.weight.zero_()
        model.head.out.bias.zero_()
        model.memory.gain_lin.fill_(1.0)  # positive gains: a vote for an expert raises its logit
        model.memory.gain_log.fill_(0.5)
    ids, ex = batch(B=1, T=3)
    with torch.no_grad():
        out = model(ids, ex)  # (1, T, L, E)
        torch.testing.assert_close(out[0, 0], out[0, 0, :, :1].expand(L, E))  # t = 0: nothing to read: flat
        for layer in range(L):  # t = 1 reads token 0 only: its routed experts rank first
            top = set(out[0, 1, layer].topk(K).indices.tolist())
            assert top == set(ex[0, 0, layer].tolist()), layer


def test_memory_config_errors_name_the_key():
    for key, value in (("memory_heads", -1), ("memory_size", 0), ("memory_head_dim", 0)):
        with pytest.raises(PredictorConfigError, match=f"'{key}'"):
            PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, **{key: value}).validate()


@pytest.mark.parametrize("mode,h", [m for m in MODELS if m[0] == "layer_ahead"])
def test_serving_keeps_only_what_the_known_routing_decides(mode, h):
    """A served call given less routing than its targets need, then the same token's call with all of it
    (and layers asked out of order): every answer equals a fresh context's. The incremental serving
    state (bank votes, depth cache) keeps only results whose routing was all known."""
    h, kw = unpack(mode, h)
    model = make(mode, h, **kw)
    ids, ex = batch(B=2, T=3)
    tol = dict(atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        state = model.init_state(batch_size=2)
        for t in range(3):
            ctx = model.step(state, ids[:, t], ex[:, t - 1] if t else None)
            cur = ex[:, t : t + 1]
            for layer, known in ((L - 1, 0), (L - 1, max(0, L - h)), (1, max(0, 2 - h)), (L - 1, 1)):
                got = model.logits(ctx, cur[:, :, :known], slice(layer, layer + 1), state)
                fresh = Context(ctx.h, ctx.token_ids, ctx.prev, ctx.positions, served=True)
                want = model.logits(fresh, cur[:, :, :known], slice(layer, layer + 1), state)
                torch.testing.assert_close(got, want, **tol)


def test_gate_inputs_are_read_for_their_own_layer_only():
    """A predictor with gate_inputs reads, for layer l of token t, the gate's picks of token t at layers
    <= l (layer l's come once layer l - 1 has run) and nothing of other tokens' picks."""
    model = make("layer_ahead", 1, gate_inputs=3)
    ids, ex = batch(B=2, T=6)
    g = torch.Generator().manual_seed(3)
    gate = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(2 * 6 * L)]).view(2, 6, L, 3)
    gate[1, 4:] = -1  # padding picks
    with torch.no_grad():
        ref = model(ids, ex, gate=gate)
        assert model.config.timing == "layer_output"
        for t in range(6):
            for layer in range(L):
                g2 = gate.clone()
                others = torch.arange(6) != t
                g2[:, others] = (g2[:, others] + 5) % E
                g2[:, t, layer + 1 :] = (g2[:, t, layer + 1 :] + 7) % E
                torch.testing.assert_close(model(ids, ex, gate=g2)[:, t, : layer + 1], ref[:, t, : layer + 1])
        g3 = gate.clone()
        g3[:, 3, 2] = (g3[:, 3, 2] + 1) % E  # token 3's picks for layer 2 move its layer-2 logits
        assert not torch.allclose(model(ids, ex, gate=g3)[:, 3, 2], ref[:, 3, 2])
        with pytest.raises(ValueError, match="gate_inputs"):
            model(ids, ex)
        with pytest.raises(ValueError, match="expected gate"):
            model(ids, ex, gate=gate[:, :, :2])
    for kw in ({"mode": "token_ahead"}, {"mode": "layer_ahead", "lookahead": 2}):
        with pytest.raises(PredictorConfigError, match="'gate_inputs'"):
            PredictorConfig(vocab_size=V, num_layers=L, num_experts=E, top_k=K, gate_inputs=2, **kw)


@pytest.mark.parametrize("extra", [{}, {"memory": True, "bank": True, "depth_last": True, "bank_recent": 3}])
def test_gate_inputs_cache_equals_no_cache(extra):
    """Serving a predictor with gate_inputs as the runtime does (layer l predicted once layer l - 1 has
    routed and layer l's picks are known, from those alone), and in chunks through a state, equals the
    whole-sequence forward; a call given fewer picks than its layer needs is refused."""
    model = make("layer_ahead", 1, gate_inputs=3, **extra)
    ids, ex = batch(B=2, T=7)
    g = torch.Generator().manual_seed(4)
    gate = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(2 * 7 * L)]).view(2, 7, L, 3)
    tol = dict(atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        full = model(ids, ex, gate=gate)
        state = model.init_state(batch_size=2)
        for t in range(ids.shape[1]):
            ctx = model.step(state, ids[:, t], ex[:, t - 1] if t else None)
            for layer in range(L):
                cur, picks = torch.full_like(ex[:, t : t + 1], -1), torch.full_like(gate[:, t : t + 1], -1)
                cur[:, :, :layer] = ex[:, t : t + 1, :layer]
                out = model.logits(ctx, cur, slice(layer, layer + 1), state, gate=gate[:, t : t + 1, : layer + 1])
                torch.testing.assert_close(out[:, 0, 0], full[:, t, layer], **tol)
            with pytest.raises(ValueError, match="covering layers < 2"):
                model.logits(ctx, cur, slice(1, 2), state, gate=picks[:, :, :1])
        state = model.init_state(batch_size=2)
        chunks = [model(ids[:, a : a + 3], ex[:, a : a + 3], state, gate=gate[:, a : a + 3]) for a in range(0, 7, 3)]
        torch.testing.assert_close(torch.cat(chunks, 1), full, **tol)
