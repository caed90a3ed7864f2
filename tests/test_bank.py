"""Routing bank (predictor/bank.py): storage, the vote against a direct computation, exclusion, serving."""

import math

import numpy as np
import pytest
import torch

from predictor.bank import RoutingBank, build_bank
from predictor.state import Context, Routed

V, L, E, K = 7, 4, 6, 2


def routing(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(E)[:K] for _ in range(n * L)]).reshape(n, L, K)


def make_bank(tokens, experts, sequences, size=100, h=1, beta=1.5, decay=0.5, recent=0) -> RoutingBank:
    bank = RoutingBank(V, L, E, K, h, beta, decay, d_out=8, size=size, recent=recent)
    return bank.fill_from_rows(tokens, experts, sequences)


def singles(q_tokens, q_experts, exclude=None, positions=None):
    """Each query its own one-token sequence: the bank's votes (N, L, E) (no recent rows interact)."""
    bank_args = (q_tokens[:, None], q_experts[:, None])
    extra = (exclude, None if positions is None else positions[:, None])
    return bank_args, extra


def whole(bank, q_tokens, q_experts, exclude=None, positions=None):
    args, extra = singles(q_tokens, q_experts, exclude, positions)
    return bank.sequence_votes(*args, *extra)[:, 0]


def served(bank, ids, routed, layer, ring=None):
    """The serving path: this call's tokens ids (B, T) with what is routed of them (B, T, n, k)."""
    T = ids.shape[1]
    prev = torch.full((*ids.shape, L, K), -1)
    positions = (ring.written if ring is not None else 0) + torch.arange(T).expand_as(ids)
    ctx = Context(None, ids, prev, positions, served=True)
    return bank.votes(ctx, routed, layer + 1, ring)[:, :, layer]


def direct_vote(tokens, experts, sequences, tok, cur, layer, h, beta, decay, exclude=None, extra=()):
    """The module docstring's formula, one (token, layer) at a time, in plain Python; `extra`: further
    rows' routing (the prompt's own earlier tokens of the same id) in the same softmax."""
    candidates = [
        experts[r] for r in range(len(tokens)) if tokens[r] == tok and (exclude is None or sequences[r] != exclude)
    ]
    weights, votes = [], []
    for row in [*candidates, *extra]:
        s = sum(
            decay ** (layer - h - lp) * len(set(cur[lp].tolist()) & set(row[lp].tolist()))
            for lp in range(0, layer - h + 1)
        )
        weights.append(math.exp(beta * s))
        v = np.zeros(E)
        v[row[layer]] = 1
        votes.append(v)
    if not weights:
        return np.zeros(E)
    w = np.array(weights) / sum(weights)
    return (w[:, None] * np.array(votes)).sum(0)


def test_build_bank_groups_by_token_and_caps():
    tokens = np.array([3, 1, 3, 3, 1, 0, 3])
    experts = routing(7)
    offsets, rows, seqs = build_bank(tokens, experts, np.arange(7) * 10, V, size=2)
    assert offsets.tolist() == [0, 1, 3, 3, 5, 5, 5, 5]  # token 3 keeps 2 of its 4 rows
    assert rows.dtype == np.int16 and rows.shape == (5, L, K)
    np.testing.assert_array_equal(rows[1:3], experts[[1, 4]])  # token 1: both of its rows, in order
    kept3 = seqs[3:5] // 10
    assert set(kept3) <= {0, 2, 3, 6} and len(set(kept3)) == 2
    np.testing.assert_array_equal(rows[3:5], experts[kept3])  # rows travel with their sequence ids
    with pytest.raises(ValueError, match="vocab_size"):
        build_bank(np.array([V]), routing(1), np.zeros(1), V, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        build_bank(tokens, experts[:3], np.zeros(7), V, 4)


@pytest.mark.parametrize("h", [1, 2])
def test_votes_match_the_formula_with_and_without_exclusion(h):
    tokens = np.array([2, 2, 5, 2, 5, 1, 2, 2])
    experts, seqs = routing(8), np.array([0, 1, 1, 2, 0, 3, 1, 0])
    beta, decay = 1.5, 0.5
    bank = make_bank(tokens, experts, seqs, h=h, beta=beta, decay=decay)
    q_tokens = torch.tensor([2, 5, 6, 2, -1, 1])  # 6: never seen; -1: padding
    q_experts = torch.from_numpy(routing(6, seed=1)).long()
    exclude = torch.tensor([1, 0, 0, 2, 0, 3])  # the last query's token has rows in its own sequence only
    for ex in (None, exclude):
        out = whole(bank, q_tokens, q_experts, ex).numpy()
        for i, tok in enumerate(q_tokens.tolist()):
            for layer in range(L):
                want = direct_vote(
                    tokens, experts, seqs, tok, q_experts[i].numpy(), layer, h, beta, decay,
                    None if ex is None else int(ex[i]),
                )
                np.testing.assert_allclose(out[i, layer], want, atol=1e-5, err_msg=f"query {i} layer {layer}")
    assert out[2].sum() == 0 and out[4].sum() == 0 and out[5].sum() == 0  # no rows left: zero vote
    assert np.allclose(whole(bank, q_tokens, q_experts).numpy()[0].sum(-1), K)  # k experts per row


def test_memoised_votes_equal_computed_votes_and_check_the_routing():
    tokens = np.array([2, 2, 5, 2, 5, 1, 2, 2])
    experts, seqs = routing(8), np.array([0, 1, 1, 2, 0, 3, 1, 0])
    bank = make_bank(tokens, experts, seqs)
    q_tokens = torch.tensor([2, 5, 2, 1, -1, 2])
    q_experts = torch.from_numpy(routing(6, seed=1)).long()
    q_seqs = torch.tensor([1, 1, 0, 3, 0, 2])
    q_pos = torch.tensor([0, 1, 4, 0, -1, 2])
    want = whole(bank, q_tokens, q_experts, q_seqs).half().float()  # memo entries are float16
    first = whole(bank, q_tokens, q_experts, q_seqs, q_pos)
    torch.testing.assert_close(first, want)
    assert set(bank._cache["memo"]) == {0, 1, 2, 3}  # the padding row (position -1) stores nothing
    calls = []
    original = bank._grouped
    bank._grouped = lambda *a: calls.append(len(a[0])) or original(*a)
    order = torch.tensor([5, 3, 0, 2, 1, 4])  # same tokens, another batch layout: all read back
    torch.testing.assert_close(whole(bank, q_tokens[order], q_experts[order], q_seqs[order], q_pos[order]), want[order])
    assert calls == []
    changed = q_experts.clone()
    changed[2, 0] = (changed[2, 0] + 1) % E  # same (sequence, position), other routing: recomputed
    again = whole(bank, q_tokens, changed, q_seqs, q_pos)
    assert calls == [1]
    torch.testing.assert_close(again, whole(bank, q_tokens, changed, q_seqs).half().float())


@pytest.mark.parametrize("cap_positions", [0, 1, 3])
def test_memo_cap_holds_and_votes_stay_equal(cap_positions):
    """A capped memo stores entries while they fit and computes the rest each time: same votes, bounded bytes."""
    from predictor.bank import _SequenceVotes

    tokens = np.array([2, 2, 5, 2, 5, 1, 2, 2])
    experts, seqs = routing(8), np.array([0, 1, 1, 2, 0, 3, 1, 0])
    q_tokens = torch.tensor([2, 5, 2, 1, -1, 2])
    q_experts = torch.from_numpy(routing(6, seed=1)).long()
    q_seqs, q_pos = torch.tensor([1, 1, 0, 3, 0, 2]), torch.tensor([0, 1, 4, 0, -1, 2])
    free = make_bank(tokens, experts, seqs)
    want = whole(free, q_tokens, q_experts, q_seqs, q_pos)
    per_position = _SequenceVotes.position_bytes(L, E, (L - 1, K))  # h = 1: layers < L - 1 are read
    # an entry grows to its largest position: sequences 0, 1, 2, 3 take 5, 2, 3, 1 positions
    assert free.memo_used == 11 * per_position
    bank = make_bank(tokens, experts, seqs)
    bank.memo_bytes = cap_positions * per_position
    for _ in range(2):  # the second pass reads back what was stored and recomputes the rest
        torch.testing.assert_close(whole(bank, q_tokens, q_experts, q_seqs, q_pos), want)
        assert bank.memo_used <= bank.memo_bytes
    stored = {s: len(v.ids) for s, v in bank._cache.get("memo", {}).items()}
    assert stored == {0: {}, 1: {3: 1}, 3: {1: 2, 3: 1}}[cap_positions]  # in sequence order, while they fit
    assert sum(stored.values()) * per_position == bank.memo_used
    with pytest.raises(ValueError, match="memo_bytes"):
        RoutingBank(V, L, E, K, 1, 1.5, 0.5, d_out=8, size=10, memo_bytes=-1)


def test_served_vote_equals_whole_sequence_vote():
    """Cache == no cache for the bank's own rows: gathered per token (serving) or grouped by id."""
    tokens = np.array([2, 2, 5, 2, 5, 1, 2, 2])
    bank = make_bank(tokens, routing(8), np.zeros(8, dtype=np.int64), h=1)
    q_tokens = torch.tensor([2, 5, 6, 1])
    q_experts = torch.from_numpy(routing(4, seed=3)).long()
    full = whole(bank, q_tokens, q_experts)
    rows, valid = bank.lookup(q_tokens)
    assert rows.shape == (4, bank.width, L, K) and bank.width == 5  # token 2 has five rows
    assert bank.lookup(torch.tensor([5, 1]))[0].shape[1] == 2  # on CPU: this batch's largest count
    for layer in range(L):
        known = q_experts[:, None, : max(0, layer)]  # h = 1: layers < layer are routed
        torch.testing.assert_close(served(bank, q_tokens[:, None], known, layer)[:, 0], full[:, layer])


def test_fill_checks_offsets_and_load_sizes_the_buffers():
    tokens, experts, seqs = np.array([1, 1, 4]), routing(3), np.arange(3)
    bank = make_bank(tokens, experts, seqs)
    with pytest.raises(ValueError, match="offsets"):
        RoutingBank(V + 1, L, E, K, 1, 1.0, 0.5, 8).fill(*build_bank(tokens, experts, seqs, V, 10))
    other = RoutingBank(V, L, E, K, 1, 1.5, 0.5, 8)  # beta, decay as make_bank: config, not state
    q = torch.tensor([1, 4]), torch.from_numpy(routing(2, seed=2)).long()
    zero = whole(other, *q)  # caches the (empty) bank's multi-hot ...
    assert zero.sum() == 0 and other.rows == 0
    other.load_state_dict(bank.state_dict())  # ... which loading must drop; the buffers take 3 rows
    assert other.rows == 3
    torch.testing.assert_close(whole(other, *q), whole(bank, *q))


def recent_case(recent=2):
    """A bank with `recent` > 0 and two prompts (B = 2, T = 7) whose tokens repeat."""
    tokens = np.array([2, 2, 5, 2, 5, 1, 2, 2])
    experts, seqs = routing(8), np.array([0, 1, 1, 2, 0, 3, 1, 0])
    bank = make_bank(tokens, experts, seqs, recent=recent)
    ids = torch.tensor([[2, 6, 2, 2, 5, 2, -1], [6, 1, 6, 6, 3, 2, 6]])  # 6: no bank rows, 3: none anywhere
    ex = torch.from_numpy(routing(14, seed=4)).long().view(2, 7, L, K)
    return bank, (tokens, experts, seqs), ids, ex


def test_recent_rows_vote_in_the_banks_softmax():
    """With recent = 2, token t's earlier same-id tokens t - 2 <= t' < t join the bank rows' softmax."""
    bank, (tokens, experts, seqs), ids, ex = recent_case()
    exclude = torch.tensor([1, 3])
    positions = torch.arange(7)[None].expand(2, 7)
    for args in ((None, None), (exclude, None), (exclude, positions)):  # plain, excluding, memoised
        out = bank.sequence_votes(ids, ex, *args)
        tol = 1e-5 if args[1] is None else 2e-3  # memoised bank votes are float16
        for b in range(2):
            for t in range(7):
                tok = int(ids[b, t])
                own = [ex[b, j].numpy() for j in range(max(0, t - 2), t) if tok >= 0 and int(ids[b, j]) == tok]
                for layer in range(L):
                    ex_b = None if args[0] is None else int(args[0][b])
                    want = direct_vote(tokens, experts, seqs, tok, ex[b, t].numpy(), layer, 1, 1.5, 0.5, ex_b, own)
                    np.testing.assert_allclose(out[b, t, layer], want, atol=tol, err_msg=f"{args[0] is not None} b{b} t{t} l{layer}")
    assert out[1, 0].sum() == 0 and out[1, 2].sum() > 0  # token 6: no bank rows; the second one reads the first
    assert out[1, 4].sum() == 0 and out[0, 6].sum() == 0  # token 3: no rows at all; padding


def test_served_ring_of_recent_tokens_equals_whole_sequence_vote():
    """Cache == no cache with recent rows: a ring of the last 2 routed tokens (it wraps) plus the call's
    own earlier tokens, against whole sequences; one token per call, then two per call."""
    bank, _, ids, ex = recent_case()
    full = bank.sequence_votes(ids, ex)
    for chunk in (1, 2):
        ring = bank.init_state(2, "cpu")
        for t in range(0, 6, chunk):
            c = slice(t, t + chunk)
            for layer in range(L):
                known = ex[:, c, : max(0, layer)].clone()  # h = 1: layers < layer are routed
                if chunk > 1:  # earlier tokens of the call are read through `completed()`
                    prev = torch.cat([torch.full_like(ex[:, :1], -1), ex[:, c][:, :-1]], 1)
                    positions = ring.written + torch.arange(chunk).expand(2, chunk)
                    ctx = Context(None, ids[:, c], prev, positions, served=True)
                    got = bank.votes(ctx, known, layer + 1, ring)[:, :, layer]
                else:
                    got = served(bank, ids[:, c], known, layer, ring)
                torch.testing.assert_close(got, full[:, c, layer])
            pos = ring.written + torch.arange(chunk).expand(2, chunk)
            bank.append(ring, Routed(None, ids[:, c], ex[:, c], pos))
    plain = make_bank(np.array([2]), routing(1), np.zeros(1, dtype=np.int64))
    assert plain.init_state(2, "cpu") is None


def test_a_predictor_with_a_bank_runs_in_bfloat16():
    """The vote's decay weights are a float buffer, cast with the model; the overlaps stay float32 (the
    einsum refused the mix), on the whole-sequence path and the served one."""
    from synthetic import tiny_predictor

    model = tiny_predictor(mode="layer_ahead", bank_size=3, bank_recent=2)
    c = model.config
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, c.vocab_size, (2, 7), generator=g)
    ex = torch.randint(0, c.num_experts, (2, 7, c.num_layers, c.top_k), generator=g)
    ref = model(tok, ex)
    model = model.to(torch.bfloat16)
    out = model(tok, ex)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
    state = model.init_state(batch_size=2)
    served = torch.cat([model(tok[:, :4], ex[:, :4], state), model(tok[:, 4:], ex[:, 4:], state)], 1)
    assert (served.float() - out.float()).abs().max() < 0.1
