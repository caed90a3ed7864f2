"""Which prefetch driver runs: the one place that picks a driver for a prefetch method and loads the
predictor it needs (used by `install` and by benchmarks/bench_replay.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.prefetch import CoOccurrencePrefetcher, LayerAhead, Prefetcher, TokenAhead

PREFETCH = ("none", "cooc", "predictor")


def load_driver_predictor(predictor, num_layers: int, num_experts: int, device: str | torch.device):
    """An ExpertPredictor, or the path of an exported one (`predictor.export.load_predictor`), on
    `device` in eval mode; refuses one made for another number of MoE layers or experts."""
    where = ""
    if isinstance(predictor, (str, Path)):
        from predictor.export import load_predictor

        where = f"{predictor}: "
        predictor = load_predictor(predictor, map_location=device)
    c = predictor.config
    if (c.num_layers, c.num_experts) != (num_layers, num_experts):
        raise ValueError(
            f"{where}predictor is for L={c.num_layers}, E={c.num_experts}; "
            f"the routing has L={num_layers}, E={num_experts}"
        )
    return predictor.to(device).eval()


def make_prefetcher(
    name: str,
    cache: ExpertCache,
    num_layers: int,
    num_experts: int,
    top_k: int,
    *,
    predictor=None,
    budget: int | None = None,
    threshold: float = 0.0,
    cooc_counts: np.ndarray | None = None,
) -> Prefetcher | None:
    """The prefetch driver for `name` (one of PREFETCH) over `cache`, or None for "none".

    cooc       CoOccurrencePrefetcher, starting from `cooc_counts` (L-1, E, E) when given (e.g. counted
               on a train split), then learning online
    predictor  TokenAhead or LayerAhead, as the predictor's mode says; `predictor` is an ExpertPredictor
               or the path of an exported one, loaded onto the cache's device
    budget     experts prefetched per layer (default top_k); threshold: predictor prefetch only for
               experts with predicted probability >= threshold
    """
    if name not in PREFETCH:
        raise ValueError(f"prefetch {name!r}: choose from {PREFETCH}")
    if name == "none":
        return None
    if name == "cooc":
        driver = CoOccurrencePrefetcher(cache, num_layers, num_experts, top_k, budget)
        if cooc_counts is not None:
            driver.counts += cooc_counts
        return driver
    if predictor is None:
        raise ValueError("prefetch='predictor' needs a predictor (module or exported file)")
    predictor = load_driver_predictor(predictor, num_layers, num_experts, cache.device)
    cls = TokenAhead if predictor.config.mode == "token_ahead" else LayerAhead
    return cls(cache, predictor, budget, threshold)
