"""Heuristic baselines (what each one can learn, strict causality) and the stats report."""

import json

import numpy as np
import pytest

from predictor.baselines import (
    CoOccurrenceToken,
    Frequency,
    PreviousToken,
    RoutingBankVote,
    TokenTable,
    all_baselines,
    stack_rows,
)
from predictor.routing_stats import cooccurrence_counts, layer_frequency, multi_hot, previous_token_overlap
from predictor.stats import compute_stats, gini, main, print_stats
from predictor.traces import TraceMeta, TraceRecord, load_traces, write_traces

L, E, K, V = 4, 8, 2, 12


def meta() -> TraceMeta:
    return TraceMeta(source_model="synthetic", architecture="none", num_layers=L, moe_layers=list(range(L)),
                     num_experts=E, top_k=K, vocab_size=V)


def routed(key: np.ndarray, layer: int) -> np.ndarray:
    """A fixed, distinct-pair expert set for each integer key: (N,) -> (N, K)."""
    first = (key * 3 + layer) % E
    return np.stack([first, (first + 1 + key % (E - 1)) % E], -1)


def records(kind: str, n: int = 40, seed: int = 0) -> list[TraceRecord]:
    """kind: 'token' = experts a function of the token id; 'sticky' = one set per row, every token;
    'chain' = layer 0 random, layer l a function of layer l-1's set (its lowest id)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(4, 10))
        tokens = rng.integers(0, V, T)
        ex = np.zeros((T, L, K), dtype=np.int64)
        for layer in range(L):
            if kind == "token":
                ex[:, layer] = routed(tokens, layer)
            elif kind == "sticky":
                ex[:, layer] = routed(np.full(T, i), layer)
            elif layer == 0:
                ex[:, 0] = np.argsort(rng.random((T, E)), -1)[:, :K]
            else:
                ex[:, layer] = routed(ex[:, layer - 1].min(-1), layer)
        out.append(TraceRecord(prompt_id=i, token_ids=tokens, experts=ex, num_prefill=T))
    return out


def recall(baseline, recs, layers=range(L)) -> float:
    hits = [np.isin(rec.experts[t, layer], np.argsort(-s[t, layer], kind="stable")[:K]).mean()
            for rec in recs for s in [baseline.scores(rec)] for t in range(rec.num_tokens) for layer in layers]
    return float(np.mean(hits))


def test_each_baseline_learns_its_signal():
    tok, sticky, chain = records("token"), records("sticky"), records("chain")
    assert recall(TokenTable(E).fit(tok[:30]), tok[30:]) == 1.0  # all 12 token ids appear in training
    assert recall(Frequency(E).fit(tok[:30]), tok[30:]) < 0.6
    prev = PreviousToken(E).fit(sticky[:30])
    for rec in sticky[30:]:
        top = np.argsort(-prev.scores(rec)[1:], -1)[..., :K]
        np.testing.assert_array_equal(np.sort(top, -1), np.sort(rec.experts[1:], -1))  # every t >= 1
    co = recall(CoOccurrenceToken(E).fit(chain[:30]), chain[30:], layers=range(1, L))  # layer 0 reads nothing
    assert co > 0.9 and co > recall(TokenTable(E).fit(chain[:30]), chain[30:], layers=range(1, L)) + 0.2
    # the bank's vote: earlier occurrences whose layer l-1 set matches route alike at layer l
    bank = recall(RoutingBankVote(E).fit(chain[:30]), chain[30:], layers=range(1, L))
    assert bank > 0.9 and bank > recall(TokenTable(E).fit(chain[:30]), chain[30:], layers=range(1, L)) + 0.2


def test_unseen_token_falls_back_to_frequency():
    recs = records("token")
    table, freq = TokenTable(E).fit(recs), Frequency(E).fit(recs)
    rec = TraceRecord(prompt_id=0, token_ids=np.array([V + 5, 10**6]), experts=recs[0].experts[:2], num_prefill=2)
    np.testing.assert_allclose(table.scores(rec), freq.scores(rec))


@pytest.mark.parametrize("baseline", [*all_baselines(E), *all_baselines(E, lookahead=2)[3:]],
                         ids=lambda b: f"{b.name}-h{b.lookahead}")
def test_scores_are_strictly_causal(baseline):
    recs = records("chain", seed=1)
    baseline.fit(recs)
    rec = recs[0]
    T = rec.num_tokens
    base = baseline.scores(rec)
    assert base.shape == (T, L, E) and base.dtype == np.float32
    rng = np.random.default_rng(2)
    for t in range(T):
        for layer in range(L):
            # everything the baseline may not read for (t, layer) is rerolled
            known = 0 if baseline.mode == "token_ahead" else max(0, layer - baseline.lookahead + 1)
            ex = rec.experts.copy()
            ex[t, known:] = np.argsort(rng.random((L - known, E)), -1)[:, :K]
            ex[t + 1 :] = np.argsort(rng.random((T - t - 1, L, E)), -1)[..., :K]
            ids = rec.token_ids.copy()
            ids[t + 1 :] = rng.integers(0, V, T - t - 1)
            other = TraceRecord(prompt_id=0, token_ids=ids, experts=ex, num_prefill=T)
            np.testing.assert_array_equal(baseline.scores(other)[t, layer], base[t, layer])


def test_scores_are_non_negative_and_estimate_k_routed():
    recs = records("chain")
    for baseline in all_baselines(E):
        s = baseline.fit(recs[:30]).scores(recs[31])
        assert s.min() >= 0, baseline.name  # the evaluation maps s -> s / (1 + s) for PR-AUC
        if baseline.name != "previous_token":  # a ranking only
            np.testing.assert_allclose(s.sum(-1), K, rtol=1e-5, err_msg=baseline.name)
        if baseline.scores_are_probs:  # probabilities: none above 1 (the evaluation would clip it, losing mass)
            assert s.max() <= 1 + 1e-6, (baseline.name, s.max())


def test_the_reports_recall_shares_ties_as_the_metrics_do():
    """Equal scores at the cut share its places (docs/DESIGN.md); a sort would pick by position."""
    import torch

    from predictor.metrics import ExpertMetrics
    from predictor.stats import _recall_sums

    scores = np.zeros((2, 1, 8), dtype=np.float32)
    scores[1, 0, 3] = 1.0  # row 1: expert 3 alone on top, the other seven tied for the second place
    experts = np.array([[[0, 1]], [[3, 6]]])
    sums = _recall_sums(scores, experts, 2)
    np.testing.assert_allclose(sums, [2 / 8 + (1 + 1 / 7) / 2])
    m = ExpertMetrics(num_layers=1, num_experts=8, top_k=2)
    m.update(torch.from_numpy(scores)[None], torch.from_numpy(experts)[None], torch.ones(1, 2, dtype=torch.bool))
    assert abs(float(m.compute()["recall@2"]) - sums[0] / 2) < 1e-6
    scores[0, 0, 4] = np.nan  # it would tie with nothing: refused, as the metrics refuse it
    with pytest.raises(ValueError, match="scores contain NaN"):
        _recall_sums(scores, experts, 2)


def test_capped_probabilities_keep_the_sum_and_the_order():
    from predictor.baselines import capped_probs

    q = np.array([[0.7, 0.2, 0.06, 0.04], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    p = capped_probs(q, 2)
    np.testing.assert_allclose(p[:2].sum(-1), 2, rtol=1e-9)
    assert p[0, 0] < 1  # k * q = 1.4: the clip made it 1, losing 0.4
    c = -np.log1p(-p[0]) / q[0]  # one c for the row: p = 1 - exp(-c q)
    np.testing.assert_allclose(c, c[0], rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.5] * 4)
    np.testing.assert_allclose(p[2], [1.0, 1.0, 0.0, 0.0], atol=1e-5)  # exactly k experts: each certain
    np.testing.assert_allclose(p[3], [1.0, 0.0, 0.0, 0.0], atol=1e-5)  # fewer than k: all it has, 1 each
    rng = np.random.default_rng(0)
    for concentration in (0.05, 0.3, 3.0):  # peaked to flat
        q = rng.dirichlet(np.full(64, concentration), size=(200, 4)).astype(np.float32)
        p = capped_probs(q, 6)
        assert p.dtype == np.float32 and p.max() <= 1
        np.testing.assert_allclose(p.sum(-1), 6, rtol=1e-5)
        order = np.argsort(-q, -1)
        assert (np.diff(np.take_along_axis(p, order, -1), axis=-1) <= 0).all()  # q's order, never reversed


def test_baseline_attributes_and_unfitted_error():
    assert [(b.name, b.mode, b.lookahead) for b in all_baselines(E)] == [
        ("frequency", "token_ahead", None), ("previous_token", "token_ahead", None),
        ("token_table", "token_ahead", None), ("cooccurrence_token", "layer_ahead", 1),
        ("routing_bank", "layer_ahead", 1), ("routing_bank_recent", "layer_ahead", 1)]
    assert [b.lookahead for b in all_baselines(E, lookahead=2)[3:]] == [2, 2, 2]
    for cls in (CoOccurrenceToken, RoutingBankVote):
        with pytest.raises(ValueError, match="lookahead.* must be an int >= 1"):
            cls(E, lookahead=0)
    with pytest.raises(RuntimeError, match="before fit"):
        Frequency(E).scores(records("token", n=1)[0])


def test_stack_follows_select(tmp_path):
    recs = records("token", n=6)
    ts = write_traces(tmp_path / "t", meta(), recs).select([4, 1])
    tokens, experts, lengths = stack_rows(ts)
    assert lengths.tolist() == [recs[4].num_tokens, recs[1].num_tokens]
    np.testing.assert_array_equal(tokens, np.concatenate([recs[4].token_ids, recs[1].token_ids]))
    np.testing.assert_array_equal(experts, np.concatenate([recs[4].experts, recs[1].experts]))


def test_routing_statistics():
    assert gini(np.full(8, 0.125)) == pytest.approx(0.0)
    assert gini(np.eye(8)[0]) == pytest.approx(7 / 8)
    ex = np.array([[[0, 1]], [[0, 1]], [[1, 2]], [[5, 6]]])  # 4 tokens, 1 layer
    # rows [0, 1, 2] and [3]: overlaps 2/2 and 1/2 over the two tokens with a predecessor
    assert previous_token_overlap(ex, np.array([3, 1])).tolist() == [0.75]


def test_compute_stats_and_cli(tmp_path):
    write_traces(tmp_path / "t", meta(), records("sticky", n=30))
    main([str(tmp_path / "t"), "--json", str(tmp_path / "s.json")])
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["dataset"]["tokens"] == sum(r.num_tokens for r in records("sticky", n=30))
    layers = stats["layers"]
    assert all(len(v) == L for v in layers.values())
    assert layers["prev_token_overlap"] == [1.0] * L  # one expert set per row
    assert all(1.0 <= h <= np.log2(E) for h in layers["entropy_bits"])
    assert stats["split"]["train_prompts"] + stats["split"]["val_prompts"] == 30
    assert set(stats["baselines"]) == {
        "frequency", "previous_token", "token_table", "cooccurrence_token", "routing_bank", "routing_bank_recent"
    }
    assert stats["baselines"]["previous_token"][f"recall@{K}"] > 0.8
    main([str(tmp_path / "t"), "--baselines", "token_table", "routing_bank_recent", "--json", str(tmp_path / "o.json")])
    only = json.loads((tmp_path / "o.json").read_text())["baselines"]
    assert set(only) == {"token_table", "routing_bank_recent"} and only["token_table"] == stats["baselines"]["token_table"]
    with pytest.raises(ValueError, match="unknown \\['bogus'\\]"):
        main([str(tmp_path / "t"), "--baselines", "bogus"])
    assert "baselines" not in compute_stats(write_traces(tmp_path / "u", meta(), records("token")), baselines=False)


def test_stats_print_markdown_when_piped_rich_tables_on_a_terminal(tmp_path, capsys):
    import io

    from rich.console import Console

    write_traces(tmp_path / "t", meta(), records("sticky", n=30))
    capsys.readouterr()  # datasets' own progress output while writing
    main([str(tmp_path / "t")])  # pytest's captured stdout / stderr are not terminals
    out, err = capsys.readouterr()
    assert err == ""  # no progress bar frames in logs
    lines = out.splitlines()
    assert "### Baselines on held-out prompts (split seed 0" in out
    header = next(line for line in lines if line.startswith("| baseline"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["baseline", "mode", "lookahead", "recall@2", "recall@4"]
    row = next(line for line in lines if line.startswith("| routing_bank_recent"))
    assert row.count("|") == 6 and row.rstrip().endswith("% |")
    mean = [line for line in lines if line.startswith("|") and line.split("|")[1].strip() == "mean"]
    assert len(mean) == 2 and all(line.count("|") == 8 for line in mean)  # 6 statistics; 6 baselines
    wide = max(len(line) for line in lines)
    assert wide > 80  # Markdown lines are as long as the table needs, not cut to a console width

    stats = compute_stats(load_traces(tmp_path / "t"))
    term = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    print_stats(stats, term)
    text = term.file.getvalue()
    assert "┃ layer ┃" in text and "routing_bank_recent" in text and "| baseline" not in text


@pytest.mark.shared_data
def test_puffin_baselines_rank_in_order(tmp_path, puffin_dir):
    from predictor.moebeyond import import_moebeyond

    stats = compute_stats(import_moebeyond(puffin_dir, tmp_path / "p", limit=150))
    r = {name: res["recall@6"] for name, res in stats["baselines"].items()}
    assert 0.08 < r["frequency"] < r["previous_token"] < r["token_table"] < r["cooccurrence_token"] < 0.8, r
    assert r["token_table"] < r["routing_bank"] < r["routing_bank_recent"] < 0.8, r
    assert 5.5 < stats["mean"]["entropy_bits"] <= 6.0


def test_routing_stats_count_by_hand():
    ex = np.array([[[0, 1], [2, 3], [1, 2]], [[0, 3], [2, -1], [0, 1]]])  # (N=2, L=3, k=2), one padded slot
    hot = multi_hot(ex, 4)
    assert hot.dtype == np.float32 and hot.shape == (2, 3, 4)
    assert hot[1, 1].tolist() == [0, 0, 1, 0]  # padding sets nothing
    assert multi_hot(ex[:1], 4, np.float64)[0].sum(-1).tolist() == [2, 2, 2]
    h1 = cooccurrence_counts(ex, 4)  # layer l -> l + 1
    assert h1.shape == (2, 4, 4) and h1.dtype == np.int64
    assert h1[0, 0, 2] == 2 and h1[0, 1, 3] == 1 and h1[0, 3, 2] == 1 and h1[0].sum() == 4 + 2  # -1 skipped
    h2 = cooccurrence_counts(ex, 4, lookahead=2)  # layer 0 -> 2
    assert h2.shape == (1, 4, 4) and h2[0, 0].tolist() == [1, 2, 1, 0] and h2.sum() == 8
    assert cooccurrence_counts(ex, 4, lookahead=3).shape == (0, 4, 4)
    freq = layer_frequency(ex[:, :1], 4)  # layer 0 of both tokens
    assert freq.tolist() == [[1.0, 0.5, 0.0, 0.5]]
