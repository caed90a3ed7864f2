"""Honest expert-prediction metrics (docs: DESIGN.md "Metrics"), streamed over batches.

- recall@k: of the true routed experts of a (token, layer), the fraction inside the predicted
  top-k; averaged over all (token, layer). With k = top_k it equals precision@k.
- positive-class F1, micro (pooled over layers) and macro over layers, at the chosen decoding:
  top-k per layer (k = top_k or a larger prefetch budget) or a probability threshold.
- PR-AUC of the positive class (average precision over binned thresholds, so memory stays
  bounded however many rows stream through).
- per-layer recall@k and F1, and recall@top_k by position in the sequence (bucketed).
- MoE-Beyond's element-wise accuracy (negatives count as correct) and {0,1}-macro F1, returned
  under `moebeyond/` keys only as a labelled comparison column: an all-zero predictor scores
  1 - k/E on that accuracy (90.6% for DeepSeek-V2-Lite) with recall 0.

Padding (expert id -1) never counts; a (token, layer) with no valid expert is skipped entirely, and a
layer with none at all is NaN per layer and left out of the macro F1.
Ties are shared fairly: where experts tie at the edge of a top-k, each true expert among them counts
as its expected share of the slots left ((k - higher) / tied, clamped to [0, 1]), the value of a
uniformly random tie-break, so a baseline with few distinct scores (counts, zeros) is neither
flattered nor penalised by a sort's order. No row is sorted: a true expert's rank is read from how
many experts score above it (cheaper than sorting the row: docs/RESULTS.md section 4).

What torchmetrics computes and what is ours (tests/test_metrics.py checks every value against
torchmetrics on random padded data, where nothing ties): the per-layer confusion counts equal
torchmetrics' `multilabel_stat_scores` (layers as labels; padded rows masked by its `ignore_index`),
counted from the true experts' ranks instead of a full (N, L, E) prediction mask; F1 is
2tp / (2tp + fp + fn) of those counts, i.e. torchmetrics' `multilabel_f1_score` with average "none"
(per layer) and "micro" (pooled), which has no entry point for counts summed over batches.
recall@k is ours: torchmetrics' `retrieval_recall` takes one query per call and only counts scores
> 0, and its multilabel metrics have no top-k. PR-AUC is ours: it equals torchmetrics'
`binary_average_precision` with `thresholds` = our bin edges b / pr_bins, but that update loops over
every threshold (about 50x slower on an evaluation batch), and without thresholds it keeps every score.

`ExpertMetrics` is a torchmetrics.Metric (sum-reduced states, so it syncs under DDP) and works
without Lightning. Call `update()` per batch and `compute()` once; `forward()` would compute the
whole report per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from predictor.embeddings import expert_multi_hot
from predictor.jsonable import to_jsonable  # noqa: F401  (imported from here)
from predictor.metrics_counts import rank_counts

DEFAULT_POSITION_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def targets_multi_hot(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(…, L, k) long expert ids with -1 padding -> (…, L, E) bool multi-hot; padding sets nothing.

    `predictor.embeddings.expert_multi_hot` with a range check: an id >= E is an error, not dropped."""
    experts = torch.as_tensor(experts).long()
    if experts.numel() and int(experts.max()) >= num_experts:
        raise ValueError(f"expert id {int(experts.max())} out of range [0, {num_experts})")
    return expert_multi_hot(experts, num_experts, torch.bool)


def _f1(tp, fp, fn):
    """Positive-class F1 from confusion counts; 0 where there is nothing to count (torchmetrics' zero_division=0)."""
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom, dtype=torch.float64))


def bin_centres(bins: int) -> np.ndarray:
    """The centres of `bins` equal-width probability bins of [0, 1]."""
    return (np.arange(bins) + 0.5) / bins


def reliability(pos: np.ndarray, neg: np.ndarray, p: np.ndarray, groups: int = 10) -> tuple[np.ndarray, float]:
    """Reliability table and expected calibration error of cells histogrammed into bins (routed `pos`,
    unrouted `neg`, (bins,) each) whose probability is `p` (bins,): per equal-width group of p, (mean p,
    share routed, cells) (groups, 3), and the sum over groups of cells / all cells x |share - mean p|."""
    g = np.minimum((np.asarray(p) * groups).astype(int), groups - 1)
    cells, routed, p_sum = (np.bincount(g, w, groups) for w in (pos + neg, pos, p * (pos + neg)))
    n = np.maximum(cells, 1)
    total = cells.sum()
    ece = float((cells * np.abs(routed / n - p_sum / n)).sum() / total) if total else 0.0
    return np.stack([p_sum / n, routed / n, cells], 1), ece


class ExpertMetrics(Metric):
    """Streaming metrics over (token, layer) rows.

    update(scores (…, L, E), experts (…, L, k) with -1 padding, positions (…) optional, probs optional).
    `scores` are logits by default (`scores_are_probs=False`); ranking metrics only use their
    order, threshold decoding and PR-AUC use sigmoid(logits) or the probabilities as given.
    When `positions` is omitted and scores are (B, T, L, E), positions are 0..T-1.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        ks: Sequence[int] = (),
        decode_k: int | None = None,
        threshold: float | None = None,
        scores_are_probs: bool = False,
        pr_bins: int = 1000,
        position_edges: Sequence[int] = DEFAULT_POSITION_EDGES,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if decode_k is not None and threshold is not None:
            raise ValueError("choose one decoding: decode_k (top-k per layer) or threshold, not both")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.ks = tuple(sorted({top_k, *ks}))
        if min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        if decode_k is not None and decode_k < 1:
            raise ValueError(f"decode_k (experts predicted per row) must be >= 1, got {decode_k}")
        self.decode_k = None if threshold is not None else (decode_k if decode_k is not None else top_k)
        self.threshold = threshold
        self.scores_are_probs = scores_are_probs
        self.pr_bins = pr_bins
        self.position_edges = tuple(position_edges)
        if list(self.position_edges) != sorted(set(self.position_edges)) or self.position_edges[0] != 0:
            raise ValueError(f"position_edges must increase strictly from 0, got {self.position_edges}")

        L, nk, nb = num_layers, len(self.ks), len(self.position_edges)
        f64 = torch.float64

        def state(name, shape, dtype):
            self.add_state(name, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

        state("rows", (L,), f64)  # valid (token, layer) rows per layer
        state("recall_sum", (nk, L), f64)  # per-row recall@k summed
        state("tp", (L,), f64)  # confusion counts at the chosen decoding
        state("fp", (L,), f64)
        state("fn", (L,), f64)
        state("pos_hist", (pr_bins,), f64)  # score histograms of positives / negatives, for PR-AUC
        state("neg_hist", (pr_bins,), f64)
        state("pos_rows", (nb,), f64)  # rows and recall@top_k summed per position bucket
        state("pos_recall_sum", (nb,), f64)

    def update(
        self,
        scores: torch.Tensor,
        experts: torch.Tensor,
        positions: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        decode_probs: torch.Tensor | None = None,
    ) -> None:
        """`probs` (same shape as scores) overrides the probabilities used for threshold decoding and
        PR-AUC, for scorers whose raw scores rank well but are not logits or probabilities;
        `decode_probs` those of threshold decoding alone (a calibrated map of `probs`, which PR-AUC and
        the raw ECE keep)."""
        L, E = self.num_layers, self.num_experts
        scores = torch.as_tensor(scores).detach()
        experts = torch.as_tensor(experts, device=scores.device).long()
        if scores.shape[-2:] != (L, E):
            raise ValueError(f"scores must end in (L={L}, E={E}), got shape {tuple(scores.shape)}")
        if experts.shape[:-1] != scores.shape[:-1]:
            raise ValueError(
                f"experts {tuple(experts.shape)} and scores {tuple(scores.shape)} disagree before the last dim"
            )
        lead = scores.shape[:-2]
        if positions is None:
            if len(lead) != 2:
                raise ValueError("pass positions unless scores are (B, T, L, E)")
            positions = torch.arange(lead[1], device=scores.device).expand(lead)
        positions = torch.as_tensor(positions, device=scores.device).long()
        if positions.shape != lead:
            raise ValueError(f"positions must have shape {tuple(lead)}, got {tuple(positions.shape)}")

        scores = scores.reshape(-1, L, E).float()
        ids = experts.reshape(-1, L, experts.shape[-1])  # (N, L, k)
        if ids.numel():  # one read back for the three bounds (a sync on a GPU)
            lo, hi, first = torch.stack([ids.min(), ids.max(), positions.min().to(ids.dtype)]).tolist()
            if hi >= E or lo < -1:
                raise ValueError(f"expert ids must lie in [0, {E}) or be -1 (padding), got {lo}..{hi}")
            if first < 0:
                raise ValueError("positions must be >= 0: mask padded positions (-1) out before updating the metrics")
        K = ids.shape[-1]
        keep = ids >= 0  # a true expert: not padding, and not listed twice in its row
        earlier = torch.ones(K, K, dtype=torch.bool, device=ids.device).tril(-1)
        keep &= ~((ids.unsqueeze(-1) == ids.unsqueeze(-2)) & earlier).any(-1)
        ids = ids.clamp_min(0)
        positions = positions.reshape(-1)
        n_true = keep.sum(-1)  # (N, L)
        valid = n_true > 0
        if not bool(valid.any()):
            return
        vf = valid.double()
        self.rows += vf.sum(0)

        def as_scores(x, name: str) -> torch.Tensor:  # (N, L, E), shaped like the scores
            x = torch.as_tensor(x, device=scores.device)
            if x.shape[-2:] != (L, E) or x.numel() != scores.numel():
                raise ValueError(f"{name} must have the scores' shape (..., {L}, {E}), got {tuple(x.shape)}")
            return x.reshape(-1, L, E)

        if probs is not None:
            probs = as_scores(probs, "probs").float()
        else:
            probs = scores if self.scores_are_probs else torch.sigmoid(scores)
        # where each true expert ranks, without sorting the row: `above` experts score higher, `tied`
        # (itself included) score the same; ties are shared fairly (`in_top`); and the PR-AUC histograms
        above, tied, pos, cells = rank_counts(scores, probs, ids, keep, valid, self.pr_bins)

        def in_top(k: int) -> torch.Tensor:  # (N, L): expected true experts among the top k
            return ((k - above).double() / tied.clamp(min=1)).clamp(0.0, 1.0).mul_(keep).sum(-1)

        denom = n_true.clamp(min=1).double()
        for i, k in enumerate(self.ks):
            row_recall = in_top(k) / denom  # (N, L); 0 on rows without a true expert
            self.recall_sum[i] += row_recall.sum(0)
            if k == self.top_k:
                edges = torch.tensor(self.position_edges, device=positions.device)
                bucket = torch.bucketize(positions, edges, right=True) - 1
                nb = len(self.position_edges)
                self.pos_rows += torch.bincount(bucket, weights=vf.sum(-1), minlength=nb).double()
                self.pos_recall_sum += torch.bincount(bucket, weights=row_recall.sum(-1), minlength=nb).double()

        # confusion counts per layer (layers as labels, torchmetrics' multilabel stat scores): decoding
        # predicts `predicted` experts per row, `tp` of them true
        if self.threshold is not None:
            cut = probs if decode_probs is None else as_scores(decode_probs, "decode_probs")
            pred = cut >= self.threshold
            tp = (pred.gather(-1, ids) & keep).sum(-1).double()
            predicted = pred.sum(-1).double()
        else:
            tp, predicted = in_top(self.decode_k), float(min(self.decode_k, E))
        self.tp += tp.sum(0)
        self.fp += ((predicted - tp) * vf).sum(0)
        self.fn += (n_true - tp).sum(0)

        self.pos_hist += pos.double()
        self.neg_hist += (cells - pos).double()

    def compute(self) -> dict:
        """Flat dict: floats, plus numpy arrays under keys ending in /layer or /position."""
        seen = self.rows > 0  # (L,) layers with a scored row; the others are skipped, NaN per layer
        nan = torch.full_like(self.rows, float("nan"))
        out: dict = {}
        for i, k in enumerate(self.ks):
            out[f"recall@{k}"] = float(self.recall_sum[i].sum() / self.rows.sum().clamp(min=1))
            out[f"recall@{k}/layer"] = torch.where(seen, self.recall_sum[i] / self.rows.clamp(min=1), nan).cpu().numpy()
        tp, fp, fn = self.tp.sum(), self.fp.sum(), self.fn.sum()
        out["precision"] = float(tp / (tp + fp)) if tp + fp > 0 else 0.0
        out["recall"] = float(tp / (tp + fn)) if tp + fn > 0 else 0.0
        out["f1_micro"] = float(_f1(tp, fp, fn))
        f1_layer = _f1(self.tp, self.fp, self.fn)
        out["f1_macro_layers"] = float(f1_layer[seen].mean()) if bool(seen.any()) else 0.0
        out["f1/layer"] = torch.where(seen, f1_layer, nan).cpu().numpy()
        out["pr_auc"] = self._average_precision()
        out["calibration"], out["ece"] = self._calibration()
        pos_rows = self.pos_rows
        out[f"recall@{self.top_k}/position"] = (
            torch.where(
                pos_rows > 0,
                self.pos_recall_sum / pos_rows.clamp(min=1),
                torch.full_like(pos_rows, float("nan")),
            )
            .cpu()
            .numpy()
        )
        out["rows/position"] = pos_rows.cpu().numpy()
        # MoE-Beyond's columns: every non-activated expert that is not predicted counts as correct
        cells = self.rows.sum() * self.num_experts
        tn = cells - tp - fp - fn
        out["moebeyond/accuracy"] = float((tp + tn) / cells) if cells > 0 else 0.0
        out["moebeyond/f1_macro01"] = float((_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2)
        out["rows"] = float(self.rows.sum())
        return out

    def _calibration(self, groups: int = 10) -> tuple[np.ndarray, float]:
        """Reliability of the probabilities, from the PR-AUC histograms: (groups, 3) per equal-width
        probability bin (mean predicted p, each cell read at its histogram bin's centre, within
        1 / (2 pr_bins); share of its (row, expert) cells that are routed; cells),
        and the expected calibration error, sum over bins of cells / all cells x |share - mean p|."""
        pos, neg = self.pos_hist.cpu().double().numpy(), self.neg_hist.cpu().double().numpy()
        return reliability(pos, neg, bin_centres(self.pr_bins), groups)

    def _average_precision(self) -> float:
        # threshold at bin b predicts positive for every score in bins >= b
        tp = self.pos_hist.flip(0).cumsum(0).flip(0)
        fp = self.neg_hist.flip(0).cumsum(0).flip(0)
        total_pos = self.pos_hist.sum()
        if total_pos == 0:
            return 0.0
        recall = tp / total_pos
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1e-300), torch.ones_like(tp))
        recall_next = torch.cat([recall[1:], recall.new_zeros(1)])
        return float(((recall - recall_next) * precision).sum())

    def position_buckets(self) -> list[str]:
        """Human-readable labels of the position buckets, e.g. '0', '2-3', '1024+'."""
        edges = self.position_edges
        labels = []
        for lo, hi in zip(edges, [*edges[1:], None]):
            labels.append(f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"))
        return labels


def scalars(result: dict) -> dict[str, float]:
    """The float entries of `ExpertMetrics.compute()`, e.g. for `LightningModule.log_dict`."""
    return {k: v for k, v in result.items() if isinstance(v, float)}
