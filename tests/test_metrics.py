"""Hand-computed cases for predictor.metrics."""

from functools import partial

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_average_precision, multilabel_f1_score
from torchmetrics.functional.retrieval import retrieval_recall

from predictor.metrics import ExpertMetrics, scalars, targets_multi_hot, to_jsonable


def test_targets_multi_hot_ignores_padding():
    ex = torch.tensor([[[0, 2], [1, -1], [-1, -1]]])  # (N=1, L=3, k=2)
    got = targets_multi_hot(ex, 4)
    assert got.tolist() == [[[True, False, True, False], [False, True, False, False], [False] * 4]]
    with pytest.raises(ValueError, match="out of range"):
        targets_multi_hot(torch.tensor([[[4]]]), 4)


def test_update_names_bad_ids_positions_and_probability_shapes():
    """Only -1 pads an expert list; padded positions must be masked out first; `probs` and `decode_probs`
    must be shaped like the scores: each refused with an error that names it, not scored."""
    scores, experts = torch.zeros(1, 3, 2, 8), torch.tensor([[[[0, 1], [2, 3]]] * 3])  # (B=1, T=3, L=2, k=2)
    m = ExpertMetrics(num_layers=2, num_experts=8, top_k=2, threshold=0.5)
    with pytest.raises(ValueError, match=r"be -1 \(padding\), got -2\.\.3"):
        m.update(scores, experts.masked_fill(experts == 1, -2))
    with pytest.raises(ValueError, match=r"positions must be >= 0: mask padded positions"):
        m.update(scores, experts, positions=torch.tensor([[0, 1, -1]]))
    with pytest.raises(ValueError, match=r"decode_probs must have the scores' shape \(\.\.\., 2, 8\), got \(6, 8\)"):
        m.update(scores, experts, decode_probs=torch.zeros(6, 8))
    with pytest.raises(ValueError, match=r"probs must have the scores' shape"):
        m.update(scores, experts, probs=torch.zeros(1, 2, 2, 8))
    m.update(scores, experts, decode_probs=torch.zeros(3, 2, 8))  # the same cells, another leading shape
    assert m.compute()["recall@2"] > 0


def test_recall_at_k_hand_case():
    # L=2, E=4, k=2; one token
    scores = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]])
    experts = torch.tensor([[[0, 2], [3, 2]]])
    m = ExpertMetrics(num_layers=2, num_experts=4, top_k=2, ks=(1, 3))
    m.update(scores, experts, positions=torch.tensor([0]))
    r = m.compute()
    # layer 0: top2 = {0,1} -> 1/2; layer 1: top2 = {3,2} -> 2/2
    assert r["recall@2"] == pytest.approx(0.75)
    assert r["recall@2/layer"].tolist() == pytest.approx([0.5, 1.0])
    assert r["recall@1"] == pytest.approx((0.5 + 0.5) / 2)
    assert r["recall@3"] == pytest.approx(1.0)
    # decoding top-2: tp=3 fp=1 fn=1 -> precision = recall@2 (k = top_k)
    assert r["precision"] == pytest.approx(0.75) and r["recall"] == pytest.approx(0.75)
    assert r["f1_micro"] == pytest.approx(0.75)
    assert r["f1/layer"].tolist() == pytest.approx([0.5, 1.0])
    assert r["f1_macro_layers"] == pytest.approx(0.75)
    # 8 cells: tp 3, fp 1, fn 1, tn 3
    assert r["moebeyond/accuracy"] == pytest.approx(6 / 8)
    assert r["moebeyond/f1_macro01"] == pytest.approx((0.75 + 0.75) / 2)


def test_all_zero_predictor_scores_recall_zero_but_high_moebeyond_accuracy():
    # DeepSeek-V2-Lite shape: 64 experts, 6 routed; the predictor says "no expert" everywhere
    rng = np.random.default_rng(0)
    N, L, E, k = 50, 3, 64, 6
    experts = torch.tensor(np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(N)]))
    m = ExpertMetrics(num_layers=L, num_experts=E, top_k=k, threshold=0.5)
    m.update(torch.full((N, L, E), -20.0), experts, positions=torch.arange(N))
    r = m.compute()
    assert r["recall"] == 0.0 and r["f1_micro"] == 0.0 and r["f1_macro_layers"] == 0.0
    assert r["moebeyond/accuracy"] == pytest.approx(58 / 64)  # 90.6%
    assert r["moebeyond/f1_macro01"] == pytest.approx((0 + 2 * 58 / (2 * 58 + 6)) / 2)  # ~0.475


def test_padding_never_counts_and_positions_default():
    # (B=1, T=3, L=1, E=3), k=1; token 2 is padding
    scores = torch.tensor([[[[5.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]], [[5.0, 0.0, 0.0]]]])
    experts = torch.tensor([[[[0]], [[2]], [[-1]]]])
    m = ExpertMetrics(num_layers=1, num_experts=3, top_k=1, position_edges=(0, 1, 2))
    m.update(scores, experts)
    r = m.compute()
    assert r["rows"] == 2.0
    assert r["recall@1"] == pytest.approx(0.5)
    assert r["recall@1/position"][:2].tolist() == [1.0, 0.0]
    assert np.isnan(r["recall@1/position"][2])  # bucket 2+ only held padding
    assert r["moebeyond/accuracy"] == pytest.approx(4 / 6)
    assert m.position_buckets() == ["0", "1", "2+"]
    assert to_jsonable(r)["recall@1/position"][2] is None
    assert set(scalars(r)) >= {"recall@1", "pr_auc", "moebeyond/accuracy"}


def test_streaming_equals_single_batch_and_pr_auc_matches_exact_average_precision():
    rng = np.random.default_rng(1)
    N, L, E, k = 200, 2, 8, 2
    experts = torch.tensor(np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(N)]))
    target = targets_multi_hot(experts, E)
    scores = torch.randn(N, L, E) + 2.0 * target  # informative but noisy
    full = ExpertMetrics(L, E, k, ks=(4,), pr_bins=10000)
    full.update(scores, experts, torch.arange(N))
    parts = ExpertMetrics(L, E, k, ks=(4,), pr_bins=10000)
    for idx in torch.arange(N).split(37):
        parts.update(scores[idx], experts[idx], idx)
    a, b = full.compute(), parts.compute()
    for key in scalars(a):
        assert a[key] == pytest.approx(b[key]), key
    want = binary_average_precision(torch.sigmoid(scores).flatten(), target.flatten().long())  # unbinned
    assert a["pr_auc"] == pytest.approx(float(want), abs=2e-3)


def test_definitions_equal_torchmetrics_on_random_padded_data():
    # rows of every kind of padding: whole tokens, one (token, layer), single slots (so rows hold 1..k
    # true experts and pooled recall would differ from our per-row mean)
    gen = torch.Generator().manual_seed(3)
    N, L, E, k, bins = 300, 3, 16, 4, 200
    experts = torch.stack([torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(L)]) for _ in range(N)])
    experts[torch.rand(N, L, k, generator=gen) < 0.2] = -1
    experts[:10] = -1
    experts[20:30, 1] = -1
    target = targets_multi_hot(experts, E)
    valid = target.any(-1)
    assert 0 < int(valid.sum()) < N * L and len(set(target.sum(-1)[valid].tolist())) > 1
    scores = torch.randn(N, L, E, generator=gen) + 1.5 * target
    m = ExpertMetrics(L, E, k, ks=(1, 8), pr_bins=bins)
    m.update(scores, experts, torch.arange(N))
    r = m.compute()
    assert r["rows"] == int(valid.sum())
    probs = torch.sigmoid(scores)  # > 0, so retrieval_recall's "score > 0" filter keeps every expert
    for kk in (1, k, 8):  # torchmetrics per (token, layer) query, averaged over the valid rows
        want = torch.stack([retrieval_recall(probs[n, j], target[n, j], top_k=kk) for n, j in valid.nonzero()])
        assert r[f"recall@{kk}"] == pytest.approx(float(want.mean()), abs=1e-6), kk
    # positive-class F1 of the top-k decoding; padded rows carry target -1, torchmetrics' ignore_index
    pred = torch.zeros_like(target).scatter_(-1, scores.topk(k, -1).indices, True).long()
    tgt = target.long().masked_fill(~valid.unsqueeze(-1), -1)
    f1 = partial(multilabel_f1_score, pred, tgt, num_labels=L, ignore_index=-1)
    assert r["f1/layer"].tolist() == pytest.approx(f1(average="none").tolist(), abs=1e-6)
    assert r["f1_micro"] == pytest.approx(float(f1(average="micro")), abs=1e-6)
    assert r["f1_macro_layers"] == pytest.approx(float(f1(average="macro")), abs=1e-6)
    # PR-AUC over valid cells: torchmetrics with our bin edges as thresholds gives the same number
    cells = valid.unsqueeze(-1).expand_as(target)
    p, t = probs[cells], target[cells].long()
    binned = binary_average_precision(p, t, thresholds=torch.arange(bins, dtype=torch.float32) / bins)
    assert r["pr_auc"] == pytest.approx(float(binned), abs=1e-6)
    assert r["pr_auc"] == pytest.approx(float(binary_average_precision(p, t)), abs=5e-3)


def test_a_layer_without_rows_is_skipped_not_counted_as_zero():
    # L=2, E=3, k=1: layer 0 has one row, predicted right; layer 1 only padding
    m = ExpertMetrics(num_layers=2, num_experts=3, top_k=1)
    m.update(torch.tensor([[[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]]), torch.tensor([[[0], [-1]]]), torch.tensor([0]))
    r = m.compute()
    assert r["rows"] == 1.0 and r["recall@1"] == 1.0  # one row, not a phantom second
    assert r["recall@1/layer"][0] == 1.0 and np.isnan(r["recall@1/layer"][1])
    assert r["f1_macro_layers"] == 1.0 and r["f1/layer"][0] == 1.0 and np.isnan(r["f1/layer"][1])
    assert to_jsonable(r)["f1/layer"][1] is None


def test_larger_decode_budget_and_bad_args():
    scores = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    experts = torch.tensor([[[1]]])
    m = ExpertMetrics(1, 4, 1, decode_k=2)
    m.update(scores, experts, torch.tensor([0]))
    r = m.compute()
    assert r["recall"] == 1.0 and r["precision"] == 0.5 and r["recall@1"] == 0.0
    with pytest.raises(ValueError, match="choose one decoding"):
        ExpertMetrics(1, 4, 1, decode_k=2, threshold=0.5)
    for bad in (0, -1):  # 0 once meant top_k, -1 counted negative false positives
        with pytest.raises(ValueError, match=f"decode_k .* must be >= 1, got {bad}"):
            ExpertMetrics(1, 4, 1, decode_k=bad)
    with pytest.raises(ValueError, match="end in"):
        m.update(torch.zeros(1, 2, 4), torch.zeros(1, 2, 1, dtype=torch.long), torch.tensor([0]))


def test_probs_override_only_affects_threshold_and_pr_auc():
    scores = torch.tensor([[[1e9, 2e9, 0.0]]])  # huge raw scores rank fine but are not logits
    experts = torch.tensor([[[1]]])
    m = ExpertMetrics(1, 3, 1, threshold=0.5)
    m.update(scores, experts, torch.tensor([0]), probs=torch.tensor([[[0.4, 0.9, 0.1]]]))
    r = m.compute()
    assert r["recall@1"] == 1.0  # ranking from the scores
    assert r["precision"] == 1.0 and r["recall"] == 1.0  # threshold on the probs: only expert 1
    assert r["pr_auc"] == pytest.approx(1.0)


def test_ties_are_shared_fairly():
    # E=4, k=1: true expert 2 ties with expert 1 for the top slot (and expert 0 scores below both)
    scores = torch.tensor([[[0.0, 1.0, 1.0, 0.5]]])
    m = ExpertMetrics(1, 4, 1, ks=(2, 3))
    m.update(scores, torch.tensor([[[2]]]), torch.tensor([0]))
    r = m.compute()
    assert r["recall@1"] == pytest.approx(0.5)  # one slot, two tied: half of it
    assert r["recall@2"] == 1.0 and r["recall@3"] == 1.0
    assert r["precision"] == pytest.approx(0.5) and r["f1_micro"] == pytest.approx(0.5)
    # a row of one value: every expert equally likely, k/E of the true experts counted
    m = ExpertMetrics(1, 8, 2)
    m.update(torch.zeros(1, 1, 8), torch.tensor([[[3, 5]]]), torch.tensor([0]))
    assert m.compute()["recall@2"] == pytest.approx(2 / 8)


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_counts_equal_the_torch_broadcast(seed):
    # the CPU pass (numba) against the device-agnostic torch path, on tie-heavy scores, padding,
    # repeated ids and whole padded rows; then the same update either way
    from predictor.metrics_counts import rank_counts

    gen = torch.Generator().manual_seed(seed)
    N, L, E, k, nb = 64, 3, 16, 4, 50
    scores = torch.randint(0, 4, (N, L, E), generator=gen).float()
    probs = torch.rand(N, L, E, generator=gen) * 1.2 - 0.1  # outside [0, 1] too: clamped into the end bins
    ids = torch.randint(-1, E, (N, L, k), generator=gen)
    ids[:5] = -1
    keep = ids >= 0
    keep[:, :, 1] &= ids[:, :, 1] != ids[:, :, 0]
    valid = keep.any(-1)
    ids = ids.clamp_min(0)
    got = rank_counts(scores, probs, ids, keep, valid, nb, compiled=True)
    want = rank_counts(scores, probs, ids, keep, valid, nb, compiled=False)
    for g, w in zip(got, want):
        assert torch.equal(g.long(), w.long())
    assert int(got[3].sum()) == int(valid.sum()) * E and int(got[2].sum()) == int(keep.sum())


def test_nan_scores_are_an_error_not_a_bin():
    m = ExpertMetrics(1, 4, 1)
    with pytest.raises(ValueError, match="NaN"):
        m.update(torch.tensor([[[0.5, float("nan"), 0.1, 0.2]]]), torch.tensor([[[0]]]), torch.tensor([0]))


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_updates_through_the_torch_path_equal_the_compiled_ones(monkeypatch, threshold):
    """The whole update as a GPU (or any non-CPU device) runs it: the torch broadcast of rank_counts."""
    import predictor.metrics as pm
    from predictor.metrics_counts import rank_counts

    gen = torch.Generator().manual_seed(5)
    N, L, E, k = 80, 3, 12, 3
    scores = torch.randint(0, 5, (N, L, E), generator=gen).float()  # ties everywhere
    experts = torch.randint(-1, E, (N, L, k), generator=gen)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(pm, "rank_counts", lambda *a, c=compiled: rank_counts(*a, compiled=c))
        m = ExpertMetrics(L, E, k, ks=(1, 6), threshold=threshold, scores_are_probs=False)
        m.update(scores, experts, torch.arange(N))
        results.append(scalars(m.compute()))
    assert results[0] == pytest.approx(results[1])


def test_calibration_table_and_ece_hand_case():
    # L=1, E=4, two tokens; probabilities 0.875 and 0.125 (exact in binary: histogram bins 875 and 125 of
    # 1000, centres 0.8755 and 0.1255). Token 0 routes {0, 1} at p = .875 .875 .125 .125; token 1 routes
    # {0, 2} at .875 .125 .125 .125. Bin 0.8-0.9: 3 cells, all routed; bin 0.1-0.2: 5 cells, 1 routed
    probs = torch.tensor([[[0.875, 0.875, 0.125, 0.125]], [[0.875, 0.125, 0.125, 0.125]]])
    m = ExpertMetrics(num_layers=1, num_experts=4, top_k=2, scores_are_probs=True)
    m.update(probs, torch.tensor([[[0, 1]], [[0, 2]]]), positions=torch.tensor([0, 1]))
    r = m.compute()
    table = r["calibration"]
    assert table.shape == (10, 3)
    assert table[8].tolist() == pytest.approx([0.8755, 1.0, 3.0]) and table[1].tolist() == pytest.approx([0.1255, 0.2, 5.0])
    assert table[[0, 2, 3, 4, 5, 6, 7, 9], 2].sum() == 0
    assert r["ece"] == pytest.approx((3 * (1 - 0.8755) + 5 * (0.2 - 0.1255)) / 8)
    assert "ece" in scalars(r) and "calibration" not in scalars(r)
