"""Calibrated probabilities: a monotone map from the predictor's sigmoid to the share of cells routed.

The scheduler's admission (predictor/simulate/policy.py) weighs a prefetch by its probability, and the
learned eviction an expert's chance of being used: both read the predictor's output as a probability.
Its loss (a listwise softmax term beside the BCE) does not keep the sigmoid calibrated: on Puffin the
layer_ahead predictor is underconfident above p 0.3 (docs/RESULTS.md). `Calibration` is isotonic
regression fitted on prompts the predictor never trained on (`data.calib_fraction` of them, taken
from the train split's share: predictor.splits.carve_split), from the ExpertMetrics histograms of its sigmoid (1,000 bins, every (row,
expert) cell, padding excluded): knots (raw p, calibrated p), read by linear interpolation and
clipped at the ends. The predictor file carries the knots (predictor/export.py); evaluation, the
policy grid and the runtime use the calibrated probability, and rank by the raw logit as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KEYS = ("calibration.raw", "calibration.calibrated")


@dataclass(frozen=True)
class Calibration:
    raw: np.ndarray  # (n,) increasing sigmoid values in [0, 1]
    calibrated: np.ndarray  # (n,) non-decreasing probabilities in [0, 1]

    def __post_init__(self):
        raw, cal = np.asarray(self.raw, np.float64), np.asarray(self.calibrated, np.float64)
        if raw.ndim != 1 or raw.shape != cal.shape or len(raw) < 2:
            raise ValueError(f"calibration knots must be two (n >= 2,) arrays, got {raw.shape} and {cal.shape}")
        if not (raw.min() >= 0 and raw.max() <= 1 and cal.min() >= 0 and cal.max() <= 1):  # also refuses NaN
            raise ValueError("calibration knots must lie in [0, 1]")
        if not (np.all(np.diff(raw) > 0) and np.all(np.diff(cal) >= 0)):
            raise ValueError("calibration knots: raw must increase and calibrated must not decrease")

    @classmethod
    def fit(cls, pos_hist, neg_hist) -> Calibration:
        """Isotonic regression of the routed share on the sigmoid, from histograms (bins,) of the routed
        (positive) and unrouted cells' sigmoid over equal-width bins of [0, 1], read at bin centres."""
        from sklearn.isotonic import IsotonicRegression

        from predictor.metrics import bin_centres

        pos, neg = np.asarray(pos_hist, np.float64), np.asarray(neg_hist, np.float64)
        if pos.shape != neg.shape or pos.ndim != 1:
            raise ValueError(f"calibration histograms must be (bins,) each, got {pos.shape} and {neg.shape}")
        cells = pos + neg
        keep = cells > 0
        if keep.sum() < 2:
            raise ValueError("calibration: fewer than two histogram bins hold cells; fit it on more prompts")
        centres = bin_centres(len(pos))
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(centres[keep], pos[keep] / cells[keep], sample_weight=cells[keep])
        return cls(np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_))

    def __call__(self, p):
        """Calibrated probabilities of sigmoid values `p` (a numpy array or a tensor)."""
        if isinstance(p, torch.Tensor):
            x = torch.as_tensor(self.raw, dtype=torch.float64, device=p.device)
            y = torch.as_tensor(self.calibrated, dtype=torch.float64, device=p.device)
            q = p.double().clamp(float(x[0]), float(x[-1]))
            i = torch.searchsorted(x, q, right=True).clamp(1, len(x) - 1)
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            return (y0 + (y1 - y0) * (q - x0) / (x1 - x0)).to(p.dtype)
        return np.interp(p, self.raw, self.calibrated)

    def min_raw(self, threshold: float) -> float:
        """The least sigmoid value whose calibrated probability reaches `threshold` (2.0: none does), so a
        cut on calibrated probabilities can be applied to raw scores."""
        if threshold <= self.calibrated[0]:
            return 0.0
        if threshold > self.calibrated[-1]:
            return 2.0
        i = int(np.searchsorted(self.calibrated, threshold, side="left"))  # first knot at or above it
        x0, x1, y0, y1 = self.raw[i - 1], self.raw[i], self.calibrated[i - 1], self.calibrated[i]
        return float(x1 if y1 == y0 else x0 + (x1 - x0) * (threshold - y0) / (y1 - y0))

    def ece(self, pos_hist, neg_hist, groups: int = 10) -> float:
        """The expected calibration error of the calibrated probabilities over cells histogrammed by
        their raw sigmoid (as ExpertMetrics' `ece` of the raw ones: equal-width groups of p)."""
        from predictor.metrics import bin_centres, reliability

        pos, neg = np.asarray(pos_hist, np.float64), np.asarray(neg_hist, np.float64)
        return reliability(pos, neg, self(bin_centres(len(pos))), groups)[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {KEYS[0]: torch.from_numpy(np.asarray(self.raw, np.float32)),
                KEYS[1]: torch.from_numpy(np.asarray(self.calibrated, np.float32))}  # fmt: skip


@torch.no_grad()
def split_histograms(net, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """ExpertMetrics' sigmoid histograms (routed, unrouted cells) of `net` over the batches of `loader`
    (a TraceDataModule loader: padding excluded, each prompt kept out of the routing bank's vote)."""
    from predictor.metrics import ExpertMetrics
    from predictor.windows import unpack

    c = net.config
    metrics = ExpertMetrics(c.num_layers, c.num_experts, c.top_k)
    was_training = net.training
    device = next(net.parameters()).device
    net.eval()
    try:
        for batch in loader:
            token_ids, experts, mask, sequences, positions, gate = unpack([t.to(device) if isinstance(t, torch.Tensor) else t for t in batch])
            logits = net(token_ids, experts, exclude=sequences, sample_positions=positions, gate=gate)  # (B, T, L, E)
            metrics.update(logits[mask], experts[mask], positions[mask])
    finally:
        net.train(was_training)
    return metrics.pos_hist, metrics.neg_hist


def fit_calibration(net, datamodule, val_histograms=None, metrics: dict | None = None,
                    device=None) -> Calibration | None:  # fmt: skip
    """The calibration of `net` on the DataModule's `calib_split` (run on `device`), or None, with a
    warning, where it cannot be fitted (a run that stops with a predictor should not lose it). With the
    held-out split's `val_histograms` and `metrics`, its expected calibration error before and after
    (`final/val/ece_raw`, `final/val/ece_calibrated`)."""
    import logging

    here = next(net.parameters()).device
    try:
        net.to(device or here)
        cal = Calibration.fit(*(h.cpu() for h in split_histograms(net, datamodule.split_dataloader(datamodule.calib_split))))
    except Exception as e:  # noqa: BLE001 - the trained predictor is exported without it, not lost
        logging.getLogger(__name__).warning("no calibration fitted on split %r: %s", datamodule.calib_split, e)
        return None
    finally:
        net.to(here)
    if val_histograms is not None and metrics is not None:
        from predictor.metrics import bin_centres, reliability

        pos, neg = val_histograms
        metrics["final/val/ece_raw"] = reliability(pos, neg, bin_centres(len(pos)))[1]
        metrics["final/val/ece_calibrated"] = cal.ece(pos, neg)
    return cal
